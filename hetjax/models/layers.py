"""Transformer building blocks for GPT-2 and Llama (Flax NNX), with Megatron TP annotations.

Sharding names use the mesh axis 'tp': attention heads and MLP width are split column-wise on the
way in and row-wise on the way out, so activations between blocks stay replicated within a stage.
Outside a mesh the annotations are inert. Stage meshes use `AxisType.Auto` axes, so XLA propagates
the layout through reshapes and the model code stays free of sharding calls.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from hetjax.models.config import ModelConfig

TP = 'tp'
COLUMN = (None, TP)   # kernel [in, out]: split the output features
ROW = (TP, None)      # kernel [in, out]: split the input features


def sharding_scope():
  """Create variables sharded when a mesh is set (`jax.set_mesh`), plainly otherwise."""
  return nnx.use_eager_sharding(not jax.sharding.get_abstract_mesh().empty)


def _init(sharding, std=0.02):
  return nnx.with_partitioning(nnx.initializers.normal(std), sharding)


def _dense(cfg: ModelConfig, n_in: int, n_out: int, sharding, bias: bool, rngs: nnx.Rngs, std=0.02):
  bias_sharding = (TP,) if sharding == COLUMN else (None,)
  return nnx.Linear(
      n_in, n_out, use_bias=bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
      kernel_init=_init(sharding, std),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), bias_sharding),
      rngs=rngs)


def make_norm(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
  if cfg.family == 'gpt2':
    return nnx.LayerNorm(cfg.hidden, epsilon=cfg.norm_eps, dtype=jnp.float32,
                         param_dtype=cfg.param_dtype, rngs=rngs)
  return nnx.RMSNorm(cfg.hidden, epsilon=cfg.norm_eps, dtype=jnp.float32,
                     param_dtype=cfg.param_dtype, rngs=rngs)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding in the half-split layout used by Hugging Face Llama. x: [B, T, n, d]."""
  d = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  angles = positions[..., None].astype(jnp.float32) * inv_freq        # [B, T, d/2]
  cos = jnp.cos(jnp.concatenate([angles, angles], -1))[:, :, None, :]
  sin = jnp.sin(jnp.concatenate([angles, angles], -1))[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x.astype(jnp.float32) * cos + rotated * sin).astype(x.dtype)


def _write(cache, new, start_pos):
  """Write `new` [B, T, ...] into `cache` [B, S, ...] at `start_pos` (one for all rows, or [B])."""
  new = new.astype(cache.dtype)
  start = jnp.asarray(start_pos)
  if start.ndim == 0:
    return jax.lax.dynamic_update_slice(cache, new, (0, start, 0, 0))
  one_row = lambda c, n, p: jax.lax.dynamic_update_slice(c, n, (p, 0, 0))
  return jax.vmap(one_row)(cache, new, start)


class Attention(nnx.Module):
  """Multi-head / grouped-query causal self-attention with an optional KV cache."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    bias = cfg.family == 'gpt2'
    kv = cfg.num_kv_heads * cfg.head_dim
    self.q = _dense(cfg, cfg.hidden, cfg.hidden, COLUMN, bias, rngs)
    self.k = _dense(cfg, cfg.hidden, kv, COLUMN, bias, rngs)
    self.v = _dense(cfg, cfg.hidden, kv, COLUMN, bias, rngs)
    out_std = 0.02 / (2 * cfg.num_layers) ** 0.5
    self.o = _dense(cfg, cfg.hidden, cfg.hidden, ROW, bias, rngs, std=out_std)

  def __call__(self, x, positions, cache=None, start_pos=0):
    """x: [B, T, H]; positions: [B, T]. With `cache` ({'k','v'}: [B, S, kv, d]) the new keys and
    values are written at `start_pos` (scalar or [B]) and the queries attend to the whole cache,
    masked causally."""
    cfg = self.cfg
    b, t, _ = x.shape
    q = self.q(x).reshape(b, t, cfg.num_heads, cfg.head_dim)
    k = self.k(x).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    v = self.v(x).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    if cfg.family == 'llama':
      q = rope(q, positions, cfg.rope_theta)
      k = rope(k, positions, cfg.rope_theta)
    if cache is not None:
      k, v = _write(cache['k'], k, start_pos), _write(cache['v'], v, start_pos)
      cache = {'k': k, 'v': v}
    key_pos = jnp.arange(k.shape[1])
    mask = key_pos[None, None, :] <= positions[:, :, None]               # [B, T, S]
    group = cfg.num_heads // cfg.num_kv_heads
    q = q.reshape(b, t, cfg.num_kv_heads, group, cfg.head_dim)
    scores = jnp.einsum('btkgd,bskd->bkgts', q, k.astype(q.dtype)).astype(jnp.float32)
    scores = scores / jnp.sqrt(jnp.float32(cfg.head_dim))
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    out = jnp.einsum('bkgts,bskd->btkgd', probs, v.astype(q.dtype)).reshape(b, t, cfg.hidden)
    return self.o(out), cache


class MLP(nnx.Module):
  """GELU MLP (GPT-2) or SwiGLU (Llama)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.family = cfg.family
    bias = cfg.family == 'gpt2'
    self.up = _dense(cfg, cfg.hidden, cfg.ffn, COLUMN, bias, rngs)
    if cfg.family == 'llama':
      self.gate = _dense(cfg, cfg.hidden, cfg.ffn, COLUMN, bias, rngs)
    out_std = 0.02 / (2 * cfg.num_layers) ** 0.5
    self.down = _dense(cfg, cfg.ffn, cfg.hidden, ROW, bias, rngs, std=out_std)

  def __call__(self, x):
    if self.family == 'gpt2':
      return self.down(jax.nn.gelu(self.up(x), approximate=True))
    return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class Block(nnx.Module):
  """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.attn_norm = make_norm(cfg, rngs)
    self.attn = Attention(cfg, rngs)
    self.mlp_norm = make_norm(cfg, rngs)
    self.mlp = MLP(cfg, rngs)
    self.dtype = jnp.dtype(cfg.dtype)

  def __call__(self, x, positions, cache=None, start_pos=0):
    h, cache = self.attn(self.attn_norm(x).astype(self.dtype), positions, cache, start_pos)
    x = x + h.astype(x.dtype)
    x = x + self.mlp(self.mlp_norm(x).astype(self.dtype)).astype(x.dtype)
    return x, cache
