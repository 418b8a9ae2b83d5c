"""Pipeline schedules as pure Python: what each stage runs, in order, and one global order.

An `Op` is (kind, stage, micro_batch) with kind 'F' (forward) or 'B' (backward).
- `stage_programs(name, S, M)`: each stage's own op sequence (GPipe or 1F1B).
- `global_order(programs)`: a tick-by-tick merge in which every op runs after its dependencies
  (F(s,m) after F(s-1,m); B(s,m) after F(s,m) and B(s+1,m)); each stage runs at most one op per tick.
  Every process walks this one order, so any two processes meet their shared transfers in the same
  order and blocking point-to-point exchange cannot deadlock.
"""

from __future__ import annotations

import dataclasses

from hetjax.errors import HetjaxError

SCHEDULES = ('gpipe', '1f1b')


@dataclasses.dataclass(frozen=True)
class Op:
  kind: str    # 'F' or 'B'
  stage: int
  micro: int
  tick: int = -1  # filled in by global_order


def stage_programs(name: str, num_stages: int, num_micro: int) -> list[list[Op]]:
  if name not in SCHEDULES:
    raise HetjaxError(f'unknown schedule {name!r}; choose one of {SCHEDULES}')
  if num_stages < 1 or num_micro < 1:
    raise HetjaxError('a schedule needs at least one stage and one micro-batch')
  programs = []
  for s in range(num_stages):
    fwd = [Op('F', s, m) for m in range(num_micro)]
    bwd = [Op('B', s, m) for m in range(num_micro)]
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


def _ready(op: Op, done: set, num_stages: int) -> bool:
  if op.kind == 'F':
    return op.stage == 0 or ('F', op.stage - 1, op.micro) in done
  own_forward = ('F', op.stage, op.micro) in done
  return own_forward and (op.stage == num_stages - 1 or ('B', op.stage + 1, op.micro) in done)


def global_order(programs: list[list[Op]]) -> list[Op]:
  """All ops with their tick, in tick order (stage order within a tick)."""
  num_stages = len(programs)
  cursor = [0] * num_stages
  done: set = set()
  order: list[Op] = []
  tick = 0
  while any(c < len(p) for c, p in zip(cursor, programs)):
    fired = []
    for s, prog in enumerate(programs):
      if cursor[s] < len(prog) and _ready(prog[cursor[s]], done, num_stages):
        fired.append(dataclasses.replace(prog[cursor[s]], tick=tick))
        cursor[s] += 1
    if not fired:
      raise HetjaxError('schedule deadlocks: no stage can make progress')
    done.update((op.kind, op.stage, op.micro) for op in fired)
    order.extend(fired)
    tick += 1
  return order


def in_flight(program: list[Op]) -> int:
  """Most micro-batches whose forward ran but whose backward has not (activation memory)."""
  live = peak = 0
  for op in program:
    live += 1 if op.kind == 'F' else -1
    peak = max(peak, live)
  return peak
