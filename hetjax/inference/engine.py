"""HexGen executed: generation over a serve Plan on the one runtime.

Each replica of the plan is its own chain of stages (layers, devices and TP degree per stage; the
replicas may differ). A round gives each replica some request groups; all replicas' decode
schedules are merged into one global order, so replicas run side by side and, within a replica,
stages work on different groups at the same time (pipelined decode). Activations between stages go
through the exchange and its codec, sampled tokens back to stage 0 in full precision.
"""

from __future__ import annotations

import time

import jax
import numpy as np
from flax import nnx

from hetjax.compression.codecs import Identity
from hetjax.errors import HetjaxError
from hetjax.models.config import ModelConfig
from hetjax.models.model import split_state
from hetjax.parallel.exchange import DevicePutTransport, Exchange
from hetjax.parallel.generation import LOGITS, GenerationHandler, GroupBatch
from hetjax.parallel.meshes import build_replica_groups, place
from hetjax.parallel.runtime import Runtime, sum_over_processes
from hetjax.parallel.schedules import decode, global_order, relabel
from hetjax.parallel.state import StateStore
from hetjax.plan import Plan


def pad_prompts(prompts: list, rows: int = 0, max_width: int = 0, min_width: int = 1) -> GroupBatch:
  """Prompts of different lengths, right-padded with 0 to one length. `rows` adds dummy one-token
  rows up to that many, and `max_width` > 0 rounds the length up to a power of two, at least
  min_width and at most max_width, so that serving reuses compiled programs instead of compiling
  each shape."""
  lengths = np.array([len(p) for p in prompts], np.int32)
  if not len(lengths) or lengths.min() < 1:
    raise HetjaxError('every request needs a non-empty prompt')
  width = int(lengths.max())
  if max_width:
    width = max(width, min(max(1 << (width - 1).bit_length(), min_width), max_width))
  lengths = np.concatenate([lengths, np.ones(max(0, rows - len(lengths)), np.int32)])
  padded = np.zeros((len(lengths), width), np.int32)
  for i, p in enumerate(prompts):
    padded[i, :len(p)] = p
  return GroupBatch(padded, lengths)


class ServeEngine:
  """Generation over `plan` (its replicas serve independently) for model `cfg` with parameters
  `params`: the full model's nnx.State, split here into each stage's part, or (a one-replica plan)
  a list of the stages' states, None for stages this process does not run."""

  def __init__(self, plan: Plan, cfg: ModelConfig, params: nnx.State, *, codec=None,
               transport=None, colocate: bool = False):
    plan.validate(model=cfg)
    self.plan, self.cfg = plan, cfg
    self.replicas = [build_replica_groups(plan, cfg, r, colocate) for r in range(plan.dp)]
    self.stages = []   # flat stage index -> (replica, k, group, params or None)
    for r, groups in enumerate(self.replicas):
      if isinstance(params, (list, tuple)):  # one replica's stage states (None where not held)
        if plan.dp != 1 or len(params) != len(groups):
          raise HetjaxError('per-stage parameters need a one-replica plan with one state per stage')
        cut = params
      else:
        cut = split_state(params, [g.abstract for g in groups])
      for k, (g, p) in enumerate(zip(groups, cut)):
        if g.is_local and p is None:
          raise HetjaxError(f'stage {k} runs on this process but its parameters are not here')
        placed = place(jax.tree.map(np.asarray, p), g.param_sharding) if g.is_local else None
        self.stages.append((r, k, g, placed))
    transport = transport or DevicePutTransport()
    self.exchanges = {'act': Exchange(transport, codec or Identity()),
                      'token': Exchange(transport, Identity())}
    self.runtime = Runtime([g for _, _, g, _ in self.stages], self.exchanges)
    self.offsets = np.cumsum([0] + [len(g) for g in self.replicas])[:-1].tolist()

  def bytes_sent(self) -> int:
    return self.runtime.bytes_sent()

  def run(self, batches: list[list[GroupBatch]], num_tokens: int, *, temperature: float = 0.0,
          top_k: int = 0, top_p: float = 1.0, seed: int = 0, profile: bool = False,
          on_token=None, min_cache_len: int = 0):
    """Generate `num_tokens` tokens for every group; `batches[r]` are replica r's groups (an
    empty list leaves it idle). Returns tokens[r][m] as [B, num_tokens] host arrays on every
    process, and the runtime's timeline when `profile`. KV caches hold at least `min_cache_len`
    positions (one length for every call compiles the decode programs once)."""
    if len(batches) != len(self.replicas):
      raise HetjaxError(f'{len(batches)} replicas of requests for a plan with {len(self.replicas)}')
    cache_len = {}
    for r, groups in enumerate(batches):
      if not groups:
        continue
      width = max(b.prompts.shape[1] for b in groups)
      if width + num_tokens > self.cfg.max_len:
        raise HetjaxError(f'prompt ({width}) + max_new_tokens ({num_tokens}) exceeds the model\'s '
                          f'max length {self.cfg.max_len}')
      cache_len[r] = max(width + num_tokens, min(min_cache_len, self.cfg.max_len))
    order = self._order([len(g) for g in batches], num_tokens, prefill=True)
    if not order:
      return [[] for _ in batches], []
    store = StateStore()
    tokens: dict = {}

    def keep(r, m, t, token):
      tokens[(r, m, t)] = token
      if on_token is not None:
        on_token(r, m, t, token)

    sampling = (float(temperature), int(top_k), float(top_p))
    handler = GenerationHandler(self.stages, batches, cache_len, store, self.cfg.hidden, sampling,
                                seed, keep)
    events = self.runtime.run(order, handler, profile)
    return self._gather(batches, num_tokens, tokens), events

  def prefill_logits(self, batches: list[list[GroupBatch]]):
    """The head's logits [B, V] at each group's last prompt position (checks of what the exchange
    does to the numbers, e.g. a quantizing codec), as host arrays where the head runs."""
    order = self._order([len(g) for g in batches], 1, prefill=True)
    logits: dict = {}
    cache_len = {r: max(b.prompts.shape[1] for b in g) for r, g in enumerate(batches) if g}
    handler = GenerationHandler(self.stages, batches, cache_len, StateStore(), self.cfg.hidden,
                                LOGITS, 0, lambda r, m, t, y: logits.__setitem__((r, m), np.asarray(y)))
    self.runtime.run(order, handler)
    return logits

  def steps(self, groups: list[list], num_steps: int, cache_len: dict, store: StateStore,
            first_step: int, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
            seed: int = 0, on_token=None, profile: bool = False):
    """Continue generation for `num_steps` decode steps of every group (continuous batching):
    `groups[r][m]` has `rows` and `feed(step)`; KV caches and last tokens live in `store` from
    one call to the next, and steps are numbered from `first_step`."""
    order = self._order([len(g) for g in groups], num_steps, prefill=False, hand_back=True)
    sampling = (float(temperature), int(top_k), float(top_p))
    handler = GenerationHandler(self.stages, groups, cache_len, store, self.cfg.hidden, sampling,
                                seed, on_token, first_step)
    return self.runtime.run(order, handler, profile)

  def _order(self, group_counts: list[int], num_tokens: int, prefill: bool,
             hand_back: bool = False):
    """One global order of every busy replica's decode schedule (stage indices stay flat)."""
    programs = []
    for r, count in enumerate(group_counts):
      if count:
        programs += relabel(decode(len(self.replicas[r]), count, num_tokens, prefill, hand_back),
                            self.offsets[r])
    by_stage = {}
    for prog in programs:
      for op in prog:
        by_stage.setdefault(op.stage, []).append(op)
    return global_order([by_stage[s] for s in sorted(by_stage)]) if by_stage else []

  def _gather(self, batches, num_tokens, tokens):
    """Token arrays on every process: the head stage's owner has them; a sum over processes
    (zeros elsewhere) shares them in multi-controller runs."""
    shapes = [(r, m, len(b.lengths)) for r, groups in enumerate(batches) for m, b in enumerate(groups)]
    flat = np.zeros(sum(n * num_tokens for _, _, n in shapes), np.float64)
    pos = 0
    for r, m, n in shapes:
      if (r, m, 0) in tokens:
        block = np.stack([np.asarray(tokens[(r, m, t)]) for t in range(num_tokens)], axis=1)
        flat[pos:pos + n * num_tokens] = block.reshape(-1)
      pos += n * num_tokens
    if jax.process_count() > 1:
      flat = sum_over_processes(flat)
    out = [[] for _ in batches]
    pos = 0
    for r, m, n in shapes:
      out[r].append(np.rint(flat[pos:pos + n * num_tokens]).astype(np.int32).reshape(n, num_tokens))
      pos += n * num_tokens
    return out

  def generate(self, prompts, max_new_tokens: int, **sampling) -> np.ndarray:
    """New ids [B, max_new_tokens] for prompts [B, T] (or a list of id lists): rows are dealt to
    the replicas in turn, and each replica's rows into as many groups as it has stages (so its
    pipeline is full when there are enough rows)."""
    prompts = [np.asarray(p, np.int32).reshape(-1) for p in prompts]
    if max_new_tokens < 1:
      raise HetjaxError(f'max_new_tokens must be >= 1, got {max_new_tokens}')
    for p in prompts:
      if len(p) and (p.min() < 0 or p.max() >= self.cfg.vocab_size):
        raise HetjaxError(f'prompt token ids must lie in [0, {self.cfg.vocab_size})')
    rows = [list(range(r, len(prompts), len(self.replicas))) for r in range(len(self.replicas))]
    layout, batches = [], []
    for r, mine in enumerate(rows):
      groups = [g for g in np.array_split(mine, min(len(mine), len(self.replicas[r])) or 1) if len(g)]
      batches.append([pad_prompts([prompts[i] for i in g]) for g in groups])
      layout.append(groups)
    t0 = time.perf_counter()
    tokens, _ = self.run(batches, max_new_tokens, **sampling)
    self.last_seconds = time.perf_counter() - t0
    out = np.zeros((len(prompts), max_new_tokens), np.int32)
    for r, groups in enumerate(layout):
      for m, g in enumerate(groups):
        out[g] = tokens[r][m]
    return out
