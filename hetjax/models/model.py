"""A model is embed -> blocks[0:L] -> head; a Stage is any contiguous piece of it.

`Stage(cfg, start, end, has_embed, has_head)` builds and runs alone. The full model is the stage that
covers everything (`build_model`). Blocks are keyed by their global layer index, so the state of a
stage is a subset of the full model's state: splitting and merging states is dictionary work
(`split_state`, `merge_states`). With tied embeddings, a stage that has the head but not the embed
holds its own copy of the token table (the pipeline runtime keeps the copies in sync).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from hetjax.errors import HetjaxError
from hetjax.models.config import ModelConfig
from hetjax.models.layers import Block, make_norm, sharding_scope, _dense


class Stage(nnx.Module):

  def __init__(self, cfg: ModelConfig, start: int, end: int, *, has_embed: bool, has_head: bool,
               rngs: nnx.Rngs):
    if not 0 <= start <= end <= cfg.num_layers:
      raise HetjaxError(f'stage layers [{start}:{end}] outside the model\'s 0..{cfg.num_layers}')
    self.cfg, self.start, self.end = cfg, start, end
    self.has_embed, self.has_head = has_embed, has_head
    with sharding_scope():
      self._build(cfg, start, end, has_embed, has_head, rngs)

  def _build(self, cfg, start, end, has_embed, has_head, rngs):
    emb_init = nnx.with_partitioning(nnx.initializers.normal(0.02), (None, None))
    needs_table = has_embed or (has_head and cfg.tie_embeddings)
    self.token_embed = (nnx.Embed(cfg.vocab_size, cfg.hidden, param_dtype=cfg.param_dtype,
                                  embedding_init=emb_init, rngs=rngs) if needs_table else None)
    self.pos_embed = (nnx.Embed(cfg.max_len, cfg.hidden, param_dtype=cfg.param_dtype,
                                embedding_init=nnx.with_partitioning(nnx.initializers.normal(0.01),
                                                                     (None, None)), rngs=rngs)
                      if has_embed and cfg.family == 'gpt2' else None)
    self.blocks = nnx.Dict({str(i): Block(cfg, rngs) for i in range(start, end)})
    self.final_norm = make_norm(cfg, rngs) if has_head else None
    self.lm_head = (_dense(cfg, cfg.hidden, cfg.vocab_size, (None, None), False, rngs)
                    if has_head and not cfg.tie_embeddings else None)

  def __call__(self, x, start_pos=0, cache=None, last_only=False, last_index=None):
    """x: token ids [B, T] if the stage has the embed, else hidden states [B, T, H]. `start_pos` is
    the position of x's first token: one for the batch, or one per row ([B]).

    Returns (logits [B, T, V] if it has the head, else hidden states; the updated cache).
    `last_only` computes the head for the last position only (prefill needs no more), and
    `last_index` ([B]) for position last_index[b] of row b (prompts padded to one length)."""
    cfg = self.cfg
    t = x.shape[1]
    start = jnp.asarray(start_pos)
    positions = jnp.broadcast_to((start[:, None] if start.ndim else start) + jnp.arange(t),
                                 x.shape[:2])
    if self.has_embed:
      x = self.token_embed(x)
      if self.pos_embed is not None:
        x = x + self.pos_embed(positions)
    new_cache = None if cache is None else {}
    for i in range(self.start, self.end):
      key = str(i)
      x, layer_cache = self.blocks[key](x, positions, None if cache is None else cache[key], start_pos)
      if cache is not None:
        new_cache[key] = layer_cache
    if self.has_head:
      if last_index is not None:
        x = jnp.take_along_axis(x, jnp.asarray(last_index)[:, None, None], axis=1)
      elif last_only:
        x = x[:, -1:]
      x = self.final_norm(x)
      if self.lm_head is not None:
        x = self.lm_head(x.astype(cfg.dtype))
      else:
        x = self.token_embed.attend(x.astype(cfg.dtype))
      x = x.astype(jnp.float32)
    return x, new_cache

  def init_cache(self, batch: int, max_len: int | None = None, dtype=None) -> dict:
    """Zeroed KV cache for this stage's layers: {layer: {'k','v': [B, S, kv_heads, head_dim]}}."""
    cfg = self.cfg
    max_len = max_len or cfg.max_len
    if max_len > cfg.max_len:
      raise HetjaxError(f'cache length {max_len} exceeds the model\'s max_len {cfg.max_len}')
    shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    dtype = dtype or cfg.dtype
    return {str(i): {'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype)}
            for i in range(self.start, self.end)}


def build_model(cfg: ModelConfig, seed: int = 0) -> Stage:
  return Stage(cfg, 0, cfg.num_layers, has_embed=True, has_head=True, rngs=nnx.Rngs(seed))


def build_stages(cfg: ModelConfig, boundaries: Sequence[int], seed: int = 0) -> list[Stage]:
  """Stages for layer boundaries like [0, 2, 5, 6] (first must be 0, last num_layers)."""
  check_boundaries(cfg, boundaries)
  last = len(boundaries) - 2
  return [Stage(cfg, a, b, has_embed=i == 0, has_head=i == last, rngs=nnx.Rngs(seed + i))
          for i, (a, b) in enumerate(zip(boundaries[:-1], boundaries[1:]))]


def check_boundaries(cfg: ModelConfig, boundaries: Sequence[int]) -> None:
  b = list(boundaries)
  if len(b) < 2 or b[0] != 0 or b[-1] != cfg.num_layers or any(x >= y for x, y in zip(b, b[1:])):
    raise HetjaxError(f'stage boundaries {b} must rise strictly from 0 to {cfg.num_layers}')


def abstract_model(cfg: ModelConfig) -> nnx.State:
  """Parameter shapes of the full model without allocating them."""
  return nnx.state(nnx.eval_shape(lambda: build_model(cfg)), nnx.Param)


def _stage_keys(stage_state: nnx.State) -> set:
  return {path for path, _ in nnx.to_flat_state(stage_state)}


def split_state(full: nnx.State, stages: Sequence[Stage]) -> list[nnx.State]:
  """Per-stage parameter states cut from the full model's state (copies of shared tables)."""
  flat = dict(nnx.to_flat_state(full))
  out = []
  for stage in stages:
    template = nnx.state(stage, nnx.Param)
    missing = [p for p in _stage_keys(template) if p not in flat]
    if missing:
      raise HetjaxError(f'full state has no tensor {"/".join(map(str, missing[0]))}')
    out.append(nnx.from_flat_state([(p, flat[p]) for p, _ in nnx.to_flat_state(template)]))
  return out


def merge_states(states: Sequence[nnx.State]) -> nnx.State:
  """The full model's state from stage states; a tensor held by several stages is taken once."""
  flat = {}
  for state in states:
    for path, value in nnx.to_flat_state(state):
      flat.setdefault(path, value)
  return nnx.from_flat_state(sorted(flat.items(), key=lambda kv: tuple(map(str, kv[0]))))


def count_params(state) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(state) if hasattr(x, 'shape'))
