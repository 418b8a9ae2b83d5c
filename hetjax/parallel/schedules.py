"""Schedules as pure Python: ops with explicit dependencies, each stage's program, one global order.

An `Op` is (kind, stage, micro, step) plus the ids of the ops it depends on:
- 'F' forward and 'B' backward of a training micro-batch, or 'F' alone (evaluation);
- 'P' prefill and 'D' decode step `step` of a generation request group (`micro`);
- 'K' keep: stage 0 stores the token sampled at the last step, for a schedule that continues.
A dependency on an op of another stage is a message between stages (an activation, a gradient, a
sampled token); the runtime moves it right after the producing op. Builders:
- `train(name, S, M)`: GPipe or 1F1B;
- `forward(S, M)`: evaluation or a prefill wave;
- `decode(S, M, T)`: prefill, then T - 1 decode steps per group; the token sampled on the last
  stage flows back to stage 0, so with M >= S groups in flight every stage stays busy. With
  `hand_back`, the last step's token flows back too (to a 'K' op), so that the next schedule's
  first step finds it on stage 0 (continuous batching, where stages may live in other processes).
`global_order(programs)` merges the programs tick by tick, running an op only after its
dependencies. Every process walks this one order, so two processes meet their shared transfers in
the same order and blocking point-to-point exchange cannot deadlock.
"""

from __future__ import annotations

import dataclasses

from hetjax.errors import HetjaxError

SCHEDULES = ('gpipe', '1f1b')


@dataclasses.dataclass(frozen=True)
class Op:
  kind: str          # 'F', 'B', 'P', 'D' or 'K'
  stage: int
  micro: int         # micro-batch (training) or request group (generation)
  step: int = 0      # decode step (token index after the prompt)
  deps: tuple = ()   # ids of the ops that must run first
  tick: int = -1     # filled in by global_order

  @property
  def id(self) -> tuple:
    return (self.kind, self.stage, self.micro, self.step)


def _check(num_stages: int, num_micro: int) -> None:
  if num_stages < 1 or num_micro < 1:
    raise HetjaxError('a schedule needs at least one stage and one micro-batch')


def train(name: str, num_stages: int, num_micro: int) -> list[list[Op]]:
  """Each stage's ops: F(s,m) after F(s-1,m); B(s,m) after F(s,m) and B(s+1,m)."""
  if name not in SCHEDULES:
    raise HetjaxError(f'unknown schedule {name!r}; choose one of {SCHEDULES}')
  _check(num_stages, num_micro)
  last = num_stages - 1
  programs = []
  for s in range(num_stages):
    fwd = [Op('F', s, m, deps=(('F', s - 1, m, 0),) if s else ()) for m in range(num_micro)]
    bwd = [Op('B', s, m, deps=(('F', s, m, 0),) + ((('B', s + 1, m, 0),) if s < last else ()))
           for m in range(num_micro)]
    if name == 'gpipe':
      programs.append(fwd + bwd)
      continue
    # 1F1B: warm up with (S - s - 1) forwards, then alternate one forward, one backward.
    warmup = min(num_stages - s - 1, num_micro)
    prog = fwd[:warmup]
    for m in range(num_micro - warmup):
      prog += [fwd[warmup + m], bwd[m]]
    prog += bwd[num_micro - warmup:]
    programs.append(prog)
  return programs


stage_programs = train  # the training builder under its older name


def forward(num_stages: int, num_micro: int, kind: str = 'F') -> list[list[Op]]:
  """Forward only: op(s,m) after op(s-1,m)."""
  _check(num_stages, num_micro)
  return [[Op(kind, s, m, deps=((kind, s - 1, m, 0),) if s else ()) for m in range(num_micro)]
          for s in range(num_stages)]


def decode(num_stages: int, num_groups: int, num_tokens: int, prefill: bool = True,
           hand_back: bool = False) -> list[list[Op]]:
  """Generation of `num_tokens` tokens for each of `num_groups` request groups.

  Step 0 is the prefill ('P', or a decode step when `prefill` is False); step t > 0 is a decode
  step ('D') on stage 0 after the last stage sampled token t - 1. Each stage visits the groups in
  turn, so group m's step t overlaps other groups' steps on the other stages."""
  _check(num_stages, num_groups)
  if num_tokens < 1:
    raise HetjaxError('decode needs at least one token')
  last = num_stages - 1
  kind = lambda t: 'P' if t == 0 and prefill else 'D'
  programs = []
  for s in range(num_stages):
    prog = []
    for t in range(num_tokens):
      for m in range(num_groups):
        if s:
          deps = ((kind(t), s - 1, m, t),)
        else:
          deps = ((kind(t - 1), last, m, t - 1),) if t else ()
        prog.append(Op(kind(t), s, m, t, deps))
    programs.append(prog)
  if hand_back:
    last_step = num_tokens - 1
    programs[0] += [Op('K', 0, m, num_tokens, ((kind(last_step), last, m, last_step),))
                    for m in range(num_groups)]
  return programs


def relabel(programs: list[list[Op]], stage_offset: int) -> list[list[Op]]:
  """The same programs on stages `stage_offset + s` (several pipelines walked in one order)."""
  move = lambda i: (i[0], i[1] + stage_offset, i[2], i[3])
  return [[dataclasses.replace(op, stage=op.stage + stage_offset, deps=tuple(map(move, op.deps)))
           for op in prog] for prog in programs]


def global_order(programs: list[list[Op]]) -> list[Op]:
  """All ops with their tick, in tick order (stage order within a tick). Each stage runs its own
  program in order, at most one op per tick, once that op's dependencies ran in earlier ticks."""
  known = {op.id for prog in programs for op in prog}
  for prog in programs:
    for op in prog:
      missing = [d for d in op.deps if d not in known]
      if missing:
        raise HetjaxError(f'op {op.id} depends on {missing[0]}, which no stage runs')
  cursor = [0] * len(programs)
  done: set = set()
  order: list[Op] = []
  tick = 0
  while any(c < len(p) for c, p in zip(cursor, programs)):
    fired = []
    for s, prog in enumerate(programs):
      if cursor[s] < len(prog) and all(d in done for d in prog[cursor[s]].deps):
        fired.append(dataclasses.replace(prog[cursor[s]], tick=tick))
        cursor[s] += 1
    if not fired:
      raise HetjaxError('schedule deadlocks: no stage can make progress')
    done.update(op.id for op in fired)
    order.extend(fired)
    tick += 1
  return order


def in_flight(program: list[Op]) -> int:
  """Most micro-batches whose forward ran but whose backward has not (activation memory)."""
  live = peak = 0
  for op in program:
    live += 1 if op.kind == 'F' else -1 if op.kind == 'B' else 0
    peak = max(peak, live)
  return peak
