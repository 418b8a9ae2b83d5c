"""Generation over serve-plan stages: the generation workload of the runtime.

Each stage keeps its layers' KV cache for each request group on its own devices, sharded over KV
heads on its TP mesh. Its programs are jitted once per shape: prefill (a group's prompts, padded to
one length) and a decode step (one token per row, at each row's own position); the head stage also
samples the next token. `GenerationHandler` runs the ops of a decode schedule (schedules.decode): a
stage's output travels to the next stage ('act'), the token sampled on the last stage back to
stage 0 ('token').

Slot prefill (continuous batching): a decode step of a group may also prefill the prompts of slots
refilled at that step, one row each, by a program jitted per stage and prompt-length bucket that
writes that row of the group's cache. The row's hidden states ride with the step's activation
message, packed after the decode rows: [B + sum of widths, 1, H].
"""

from __future__ import annotations

import dataclasses
import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from hetjax.parallel.meshes import StageGroup, place
from hetjax.parallel.runtime import Message
from hetjax.sampling import sample_logits


LOGITS = ('logits',)  # a `sampling` value: the head returns logits instead of a token


def cache_sharding(group: StageGroup) -> NamedSharding:
  """[B, S, kv_heads, head_dim], split over KV heads like the attention weights."""
  return NamedSharding(group.mesh, P(None, None, 'tp', None))


@dataclasses.dataclass(frozen=True)
class _Key:
  """Hashable identity of a stage's generation programs (graph, mesh, sampling)."""
  graphdef: nnx.GraphDef
  mesh: object
  has_embed: bool
  has_head: bool
  sampling: tuple
  group: StageGroup = dataclasses.field(compare=False, hash=False)


@functools.lru_cache(maxsize=64)
def _programs(key: _Key):
  group, graphdef, sampling = key.group, key.graphdef, key.sampling
  kv = cache_sharding(group)
  cache_shardings = {str(i): {'k': kv, 'v': kv} for i in range(group.start, group.end)}
  out = group.replicated

  def finish(y, rng):
    """The head samples a token per row (or, with sampling LOGITS, returns the last position's
    logits); other stages pass their hidden states on."""
    if not group.has_head:
      return y
    return y[:, -1] if sampling == LOGITS else sample_logits(y[:, -1], rng, *sampling)

  def prefill(params, x, cache, lengths, rng):
    y, cache = nnx.merge(graphdef, params)(x, 0, cache, last_index=lengths - 1)
    return finish(y, rng), cache

  def decode(params, x, cache, pos, rng, feed, use_feed):
    if group.has_embed:  # rows still reading their prompt take its next token instead
      x = jnp.where(use_feed, feed, x)[:, None]
    y, cache = nnx.merge(graphdef, params)(x, pos, cache)
    return finish(y, rng), cache

  def slot_prefill(params, x, cache, slot, length, rng, tokens):
    """One row's prompt x ([1, W] ids or [1, W, H]) into row `slot` of the cache; the head puts the
    sampled first token into row `slot` of the step's `tokens` [B]."""
    row = jax.tree.map(lambda c: jax.lax.dynamic_slice_in_dim(c, slot, 1), cache)
    y, row = nnx.merge(graphdef, params)(x, 0, row, last_index=(length - 1)[None])
    cache = jax.tree.map(lambda c, r: jax.lax.dynamic_update_slice_in_dim(c, r, slot, 0), cache, row)
    if group.has_head:
      y = tokens.at[slot].set(finish(y, rng)[0])
    return y, cache

  def init_cache(batch, length):
    return group.abstract.init_cache(batch, length)

  return types.SimpleNamespace(
      prefill=jax.jit(prefill, donate_argnums=2, out_shardings=(out, cache_shardings)),
      decode=jax.jit(decode, donate_argnums=2, out_shardings=(out, cache_shardings)),
      slot_prefill=jax.jit(slot_prefill, donate_argnums=2, out_shardings=(out, cache_shardings)),
      init_cache=jax.jit(init_cache, static_argnums=(0, 1), out_shardings=cache_shardings))


def stage_programs(group: StageGroup, sampling: tuple):
  return _programs(_Key(group.graphdef, group.mesh, group.has_embed, group.has_head, sampling, group))


@dataclasses.dataclass
class GroupBatch:
  """One request group of a replica: prompts right-padded to one length, prefilled together."""
  prompts: np.ndarray       # [B, T] int32
  lengths: np.ndarray       # [B] true prompt lengths

  @property
  def rows(self) -> int:
    return len(self.lengths)

  def feed(self, step: int):
    """Decode step `step` (>= 1): each row's position; no row reads a prompt token any more."""
    rows = self.rows
    return ((self.lengths + step - 1).astype(np.int32), np.zeros(rows, bool),
            np.zeros(rows, np.int32))

  def prefills(self, step: int) -> list:
    """(slot, prompt GroupBatch of one row) of the slots whose prompt step `step` prefills."""
    return []


class GenerationHandler:
  """Runs prefill and decode ops. `stages[s]` = (replica, k, group, params) for the runtime's flat
  stage index s; `batches[replica][m]` is request group m of that replica. Sampled tokens are kept
  per group (lifetime 'group') as device arrays [B] on the head stage."""

  def __init__(self, stages, batches, cache_len: dict, store, hidden: int, sampling: tuple,
               seed: int, on_token=None, first_step: int = 0):
    """`batches[r][m]` is a GroupBatch (prefilled) or any group with `rows`, `feed(step)` ->
    (positions, use_feed, feed_tokens) per row and `prefills(step)` -> [(slot, one-row
    GroupBatch)] (continuous batching). `first_step` numbers the steps of a schedule that
    continues an earlier one."""
    self.stages, self.batches, self.cache_len, self.store = stages, batches, cache_len, store
    self.first_step = first_step
    self.hidden, self.sampling = hidden, sampling
    self.key = jax.random.key(seed)
    self.on_token = on_token   # called (replica, group, step, token) on the head stage's process
    self.first = {}            # replica -> flat index of its first stage
    self.last = {}
    for s, (r, k, g, _) in enumerate(stages):
      self.first.setdefault(r, s)
      self.last[r] = s

  def _rng(self, replica, m, t):
    return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(self.key, replica), m), t)

  def compute(self, op, received):
    s, m, t = op.stage, op.micro, op.step + self.first_step
    r, _, group, params = self.stages[s]
    if op.kind == 'K':   # the last step's token, for the next schedule's first step on stage 0
      if op.deps[0] in received:   # (with one stage the head stored it here already)
        self.store.put('group', ('token', r, m), received[op.deps[0]])
      return None
    batch = self.batches[r][m]
    programs = stage_programs(group, self.sampling)
    cache_key = ('cache', s, m)
    cache = self.store.pop('group', cache_key)
    if cache is None:
      cache = programs.init_cache(batch.rows, self.cache_len[r])
    if op.kind == 'P':
      x = (place(batch.prompts, group.replicated) if group.has_embed
           else received[('P', s - 1, m, t)])
      y, cache = programs.prefill(params, x, cache, place(batch.lengths, group.replicated),
                                  self._rng(r, m, t))
    else:
      pos, use_feed, feed = (place(a, group.replicated) for a in batch.feed(t))
      if group.has_embed:
        # The sampled token: a message from the last stage, or this stage's own (one stage), or
        # the last one of an earlier schedule.
        x = received.get(op.deps[0]) if op.deps else None
        if x is None:
          x = self._last_token(r, m, group, batch.rows)
      else:
        x = received[op.deps[0]]
      prefills = batch.prefills(t)
      if prefills and not group.has_embed:   # unpack: decode rows, then each prompt's rows
        x, packed, at = x[:batch.rows], x, batch.rows
        pieces = []
        for _, p in prefills:
          pieces.append(packed[at:at + p.prompts.shape[1], 0][None])
          at += p.prompts.shape[1]
      y, cache = programs.decode(params, x, cache, pos, self._rng(r, m, t), feed, use_feed)
      outs = [y[:, 0]] if prefills and not group.has_head else []
      for i, (slot, p) in enumerate(prefills):
        xi = place(p.prompts, group.replicated) if group.has_embed else pieces[i]
        rng = jax.random.fold_in(self._rng(r, m, t), slot + 1)
        yi, cache = programs.slot_prefill(params, xi, cache, np.int32(slot),
                                          place(p.lengths[0], group.replicated), rng, y)
        if group.has_head:
          y = yi
        else:
          outs.append(yi[0])
      if outs:
        y = jnp.concatenate(outs)[:, None]
    self.store.put('group', cache_key, cache)
    if group.has_head:
      self.store.put('group', ('token', r, m), y)
      if self.on_token is not None:
        self.on_token(r, m, t, y)
    return y

  def _last_token(self, r, m, group, rows):
    """The token the head sampled last for group m (a schedule that continues an earlier one),
    or zeros; moved onto stage 0's devices."""
    token = self.store.get('group', ('token', r, m))
    if token is None:
      token = np.zeros(rows, np.int32)
    return jax.device_put(token, group.replicated)

  def message(self, op, consumer):
    r = self.stages[op.stage][0]
    rows = self.batches[r][op.micro].rows
    if consumer.stage == self.first[r] and op.stage == self.last[r]:
      return Message('token', (rows,), jnp.int32, batch_sharded=False)
    batch = self.batches[r][op.micro]
    if op.kind == 'P':
      return Message('act', (rows, batch.prompts.shape[1], self.hidden), batch_sharded=False)
    packed = sum(p.prompts.shape[1] for _, p in batch.prefills(op.step + self.first_step))
    return Message('act', (rows + packed, 1, self.hidden), batch_sharded=False)
