"""FlexGen executed: generation with weights, KV cache and activations split across device, host and disk.

A policy (the dict `costmodel/offload.py` writes: block shape, weight/KV/activation fractions over
device/host/disk, CPU attention, 4-bit compression) is carried out by `OffloadEngine`:
- Placement. Each layer's weight tensors go to tiers by FlexGen's cumulative-size rule (per layer);
  the KV cache is one block per (layer, GPU batch), blocks assigned to tiers by the same rule; the
  hidden states of each GPU batch live on one tier. Embedding and head stay on the device (as in
  FlexGen and the cost model).
- Zig-zag block schedule: token -> layer -> GPU batch. A layer's weights are loaded once and serve all
  `num_gpu_batches` batches; the next layer's weights load on a thread while this layer computes, the
  next batch's cache is fetched while this batch computes, and the new keys/values are stored back
  in the background.
- 4-bit asymmetric group-64 compression with kernels/ (weights grouped along the output features,
  i.e. FlexGen's dim 0 of a torch [out, in] weight; KV along kv_heads x head_dim, which is head_dim
  groups when head_dim is a multiple of 64), compressed once at load and decompressed inside the
  layer's jitted step just before use.
- CPU attention: in decode, a cache block held on host (or disk) is attended to where it lives; only
  q, k, v go down and the attention output comes back.
The transformer is the models/ code: a `Block` per layer step, zero-block `Stage`s for embed and head.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import functools
import os
import shutil
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hetjax import checks
from hetjax.errors import HetjaxError
from hetjax.inference.generate import check_prompt, sample_logits
from hetjax.inference.offload_tiers import (TIERS, DeviceTier, DiskTier, HostTier, Ledger, choose_tiers,
                                            nbytes)
from hetjax.models.config import PRESETS, ModelConfig
from hetjax.models.layers import Block, rope, sharding_scope
from hetjax.models.model import Stage
from kernels.api import dequantize, quantize
from kernels.layout import QTensor

GB = 1e9
BUCKET = 64            # decode fetches the filled cache prefix rounded up to this many positions
MAX_BATCH = 1_000_000  # gpu_batch_size and num_gpu_batches: larger is a typo, not a policy


class BudgetError(HetjaxError):
  """A policy needs more device or host memory than its budget (raised before anything is written)."""


# ---------------------------------------------------------------- policy

@dataclasses.dataclass(frozen=True)
class OffloadPolicy:
  gpu_batch_size: int
  num_gpu_batches: int
  weights: tuple        # fractions on (device, host, disk)
  kv: tuple
  act: tuple
  cpu_attention: bool = False
  compress_weight: bool = False
  compress_kv: bool = False
  bits: int = 4
  group_size: int = 64
  model: str = ''       # the model the policy was made for ('' = any)

  @property
  def block(self) -> int:
    return self.gpu_batch_size * self.num_gpu_batches

  @classmethod
  def from_dict(cls, d: dict, source: str = 'policy') -> 'OffloadPolicy':
    """From `Policy.to_plan_offload()` / policy.json (extra keys ignored)."""
    try:
      p = cls(int(d['gpu_batch_size']), int(d['num_gpu_batches']),
              *(tuple(float(v) for v in d[k]) for k in ('weights', 'kv', 'act')),
              bool(d.get('cpu_attention', False)), bool(d.get('compress_weight', False)),
              bool(d.get('compress_kv', False)), int(d.get('bits', 4)), int(d.get('group_size', 64)),
              str(d.get('model', '')))
    except (KeyError, TypeError, ValueError, OverflowError) as e:
      raise HetjaxError(f'{source}: not an offload policy ({type(e).__name__}: {e}); it needs gpu_batch_size, '
                        f'num_gpu_batches and weights/kv/act fractions [device, host, disk]') from None
    return p.validate(source)

  def validate(self, source: str = 'policy') -> 'OffloadPolicy':
    for name in ('gpu_batch_size', 'num_gpu_batches'):
      checks.integer(getattr(self, name), f'{source}: {name}', 1, MAX_BATCH)
    for name in ('weights', 'kv', 'act'):
      f = getattr(self, name)
      if len(f) != 3 or not all(np.isfinite(f)) or min(f) < 0:
        raise HetjaxError(f'{source}: {name} must be 3 finite fractions >= 0 (device, host, disk), got {list(f)}')
      if abs(sum(f) - 1) > 1e-3:
        raise HetjaxError(f'{source}: {name} fractions {list(f)} sum to {sum(f):.4g}, not 1')
    if self.cpu_attention and self.compress_kv:
      raise HetjaxError(f'{source}: CPU attention reads the KV cache as stored; it cannot be combined with '
                        'KV compression')
    if (self.compress_weight or self.compress_kv) and (self.bits != 4 or self.group_size != 64):
      raise HetjaxError(f'{source}: only 4-bit group-64 compression is implemented, got {self.bits}-bit '
                        f'group {self.group_size}')
    return self

  def check_model(self, cfg: ModelConfig, name: str) -> None:
    """A policy names its model; refuse one made for a different shape of model."""
    if not self.model or self.model == name:
      return
    other = PRESETS.get(self.model)
    same = other is not None and all(getattr(other, f) == getattr(cfg, f) for f in
                                     ('family', 'num_layers', 'hidden', 'num_heads', 'num_kv_heads', 'ffn'))
    if not same:
      desc = lambda c: f'{c.num_layers} layers, hidden {c.hidden}' if c else 'unknown shape'
      raise HetjaxError(f'the policy is for model {self.model!r} ({desc(other)}) but the model is {name!r} '
                        f'({desc(cfg)}); make a policy for it (mode=offload_policy or offload.policy=search)')


# ---------------------------------------------------------------- jitted pieces (models/ code)

def _qt(parts, meta):
  """Rebuild a QTensor from its stored leaves and static meta (shape, dtype, bits, group)."""
  return QTensor(parts[0], parts[1], parts[2], *meta)


def _params(leaves, metas):
  return [dequantize(_qt(l, m)) if m is not None else l for l, m in zip(leaves, metas)]


@functools.partial(jax.jit, static_argnames=('spec',))
def _layer_step(spec, leaves, x, cache_parts, start_pos):
  """One block on one GPU batch. cache_parts: the fetched cache prefix as stored (None in prefill).
  Returns (hidden out, the new positions' keys/values in stored form)."""
  graphdef, treedef, metas, kv_len, kv_meta = spec
  block = nnx.merge(graphdef, jax.tree.unflatten(treedef, _params(leaves, metas)))
  b, t, _ = x.shape
  cfg = block.attn.cfg
  shape = (b, kv_len, cfg.num_kv_heads, cfg.head_dim)
  if cache_parts is None:
    cache = {'k': jnp.zeros(shape, cfg.dtype), 'v': jnp.zeros(shape, cfg.dtype)}
  else:
    cache = {n: _kv_decode(cache_parts[n], kv_meta, shape) for n in ('k', 'v')}
  positions = jnp.broadcast_to(start_pos + jnp.arange(t), (b, t))
  y, cache = block(x, positions, cache, start_pos)
  rows = {n: _kv_encode(jax.lax.dynamic_slice_in_dim(cache[n], start_pos, t, 1), kv_meta) for n in ('k', 'v')}
  return y, rows


def _kv_decode(parts, kv_meta, shape):
  if kv_meta is None:
    return parts[0]
  q = QTensor(*parts, shape[:2] + (shape[2] * shape[3],), *kv_meta)
  return dequantize(q).reshape(shape)


def _kv_encode(x, kv_meta):
  if kv_meta is None:
    return (x,)
  dtype, bits, group = kv_meta
  q = quantize(x.reshape(x.shape[:2] + (-1,)), bits, group, symmetric=False, scale_dtype=jnp.float16)
  return (q.payload, q.scale, q.zero)


@functools.partial(jax.jit, static_argnames=('spec',))
def _attn_inputs(spec, leaves, x, start_pos):
  """CPU-attention split, device side 1: norm, q/k/v projections and rotary embedding."""
  graphdef, treedef, metas = spec[:3]
  block = nnx.merge(graphdef, jax.tree.unflatten(treedef, _params(leaves, metas)))
  attn, cfg = block.attn, block.attn.cfg
  b, t, _ = x.shape
  h = block.attn_norm(x).astype(block.dtype)
  q = attn.q(h).reshape(b, t, cfg.num_heads, cfg.head_dim)
  k = attn.k(h).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
  v = attn.v(h).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
  if cfg.family == 'llama':
    positions = jnp.broadcast_to(start_pos + jnp.arange(t), (b, t))
    q, k = rope(q, positions, cfg.rope_theta), rope(k, positions, cfg.rope_theta)
  return q, k, v


@functools.partial(jax.jit, static_argnames=('num_kv_heads',))
def _cpu_attention(q, k, v, pos, num_kv_heads):
  """Decode attention of q [B, 1, heads, d] over the cache prefix k, v [B, P, kv, d] (host side)."""
  b, t, nh, d = q.shape
  q = q.reshape(b, t, num_kv_heads, nh // num_kv_heads, d)
  scores = jnp.einsum('btkgd,bskd->bkgts', q, k.astype(q.dtype)).astype(jnp.float32) / jnp.sqrt(jnp.float32(d))
  mask = jnp.arange(k.shape[1]) <= pos
  scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
  return jnp.einsum('bkgts,bskd->btkgd', probs, v.astype(q.dtype)).reshape(b, t, nh * d)


@functools.partial(jax.jit, static_argnames=('spec',))
def _attn_outputs(spec, leaves, x, attn_out):
  """CPU-attention split, device side 2: output projection, residual, MLP."""
  graphdef, treedef, metas = spec[:3]
  block = nnx.merge(graphdef, jax.tree.unflatten(treedef, _params(leaves, metas)))
  x = x + block.attn.o(attn_out.astype(block.dtype)).astype(x.dtype)
  return x + block.mlp(block.mlp_norm(x).astype(block.dtype)).astype(x.dtype)


@functools.partial(jax.jit, static_argnums=(0,))
def _embed(graphdef, state, tokens, start_pos):
  return nnx.merge(graphdef, state)(tokens, start_pos)[0]


@functools.partial(jax.jit, static_argnums=(0,))
def _head(graphdef, state, x):
  return nnx.merge(graphdef, state)(x[:, -1:])[0][:, -1]


# ---------------------------------------------------------------- engine

def check_disk_dir(disk_dir: str) -> None:
  if not os.path.isdir(disk_dir) or not os.access(disk_dir, os.W_OK | os.X_OK):
    raise HetjaxError(f'offload.disk_dir {disk_dir!r} is not a writable folder')


def random_layers(cfg: ModelConfig, seed: int = 0) -> Callable[[int], nnx.Module]:
  """Layer j of a randomly initialised model, one layer at a time (the model is never whole: any size)."""
  def layer(j):
    with sharding_scope():
      return Block(cfg, nnx.Rngs(seed * 100003 + j + 1))
  return layer


def random_ends(cfg: ModelConfig, seed: int = 0) -> tuple[Stage, Stage]:
  """Embedding and head stages of a randomly initialised model."""
  return (Stage(cfg, 0, 0, has_embed=True, has_head=False, rngs=nnx.Rngs(seed)),
          Stage(cfg, cfg.num_layers, cfg.num_layers, has_embed=False, has_head=True, rngs=nnx.Rngs(seed + 1)))


def model_parts(model: Stage) -> tuple[Callable[[int], nnx.Module], tuple[Stage, Stage]]:
  """(layer j -> Block, (embed stage, head stage)) of an in-memory full model."""
  from hetjax.models.model import split_state
  cfg = model.cfg
  ends = [nnx.eval_shape(lambda: Stage(cfg, 0, 0, has_embed=True, has_head=False, rngs=nnx.Rngs(0))),
          nnx.eval_shape(lambda: Stage(cfg, cfg.num_layers, cfg.num_layers, has_embed=False, has_head=True,
                                       rngs=nnx.Rngs(0)))]
  states = split_state(nnx.state(model, nnx.Param), ends)
  ends = tuple(nnx.merge(nnx.graphdef(e), s) for e, s in zip(ends, states))
  return (lambda j: model.blocks[str(j)]), ends


class OffloadEngine:
  """Holds one model placed by a policy for one workload shape (prompt_len, gen_len); `generate` runs it.

  budgets (GB): the device and host budgets are checked against the planned resident bytes before
  anything is written (refusal with the numbers), and the ledger enforces them while running.
  prefetch=False and reuse_weights=False give the naive offloading baseline (load, then compute, per
  layer and per GPU batch, nothing overlapped)."""

  def __init__(self, cfg: ModelConfig, policy: OffloadPolicy, layers: Callable[[int], nnx.Module],
               ends: tuple[Stage, Stage], *, prompt_len: int, gen_len: int, device_gb: float, host_gb: float,
               disk_dir: str = '', prefetch: bool = True, reuse_weights: bool = True, log=print):
    for name, v in (('device_gb', device_gb), ('host_gb', host_gb)):
      if not (isinstance(v, (int, float)) and np.isfinite(v) and v > 0):
        raise HetjaxError(f'offload.{name} must be a positive number of GB, got {v!r}')
    self.cfg, self.policy, self.log = cfg, policy, log
    self.prompt_len, self.gen_len = prompt_len, gen_len
    self.max_len = prompt_len + gen_len
    self.prefetch, self.reuse_weights = prefetch, reuse_weights
    self.budget = {'device': device_gb * GB, 'host': host_gb * GB}
    self.device = jax.devices()[0]
    self.ledger = Ledger()
    self._plan_layout(layers(0))
    self._check_budgets(disk_dir)
    self.tiers = {'device': DeviceTier(self.ledger, self.device),
                  'host': HostTier(self.ledger, self.device, pinned=True),
                  'disk': DiskTier(self.ledger, self.device, self.disk_folder)}
    self.pool = cf.ThreadPoolExecutor(2, thread_name_prefix='offload')   # weights | cache I/O
    try:
      self._place_weights(layers, ends)
      self._place_cache_and_acts()
    except BaseException:
      self.close()
      raise

  # ---- layout and budgets (before anything is written)

  def _plan_layout(self, block0: nnx.Module) -> None:
    cfg, p = self.cfg, self.policy
    self.graphdef, state = nnx.split(block0)
    leaves, self.treedef = jax.tree.flatten(state)
    self.w_shapes = [(tuple(l.shape), np.dtype(l.dtype)) for l in leaves]
    # compressed: every matrix; vectors (biases, norms) stay as they are, like FlexGen
    self.w_compress = [p.compress_weight and len(s) >= 2 for s, _ in self.w_shapes]
    self.w_metas = tuple((s, d, p.bits, p.group_size) if c else None
                         for (s, d), c in zip(self.w_shapes, self.w_compress))
    self.w_stored = [self._stored_bytes(s, d, c) for (s, d), c in zip(self.w_shapes, self.w_compress)]
    self.w_tiers = choose_tiers(self.w_stored, p.weights)     # the same split in every layer
    self.layer_fp_bytes = sum(int(np.prod(s)) * d.itemsize for s, d in self.w_shapes)
    kvd = cfg.num_kv_heads * cfg.head_dim
    self.kv_dtype = jnp.dtype(cfg.dtype)
    gbs, S = p.gpu_batch_size, self.max_len
    if p.compress_kv:
      g = -(-kvd // p.group_size)
      self.kv_parts = [((gbs, S, g * p.group_size * p.bits // 8), np.uint8), ((gbs, S, g), np.float16),
                       ((gbs, S, g), np.float16)]
      self.kv_meta = (self.kv_dtype, p.bits, p.group_size)
    else:
      self.kv_parts = [((gbs, S, cfg.num_kv_heads, cfg.head_dim), self.kv_dtype)]
      self.kv_meta = None
    self.kv_block_bytes = 2 * sum(int(np.prod(s)) * np.dtype(d).itemsize for s, d in self.kv_parts)
    L, nb = cfg.num_layers, p.num_gpu_batches
    self.kv_tiers = dict(zip([(j, k) for j in range(L) for k in range(nb)],
                             choose_tiers([self.kv_block_bytes] * (L * nb), p.kv)))
    self.act_shape = (gbs, self.prompt_len, cfg.hidden)
    self.act_tiers = choose_tiers([1] * nb, p.act)
    self.act_dtype = jnp.dtype(cfg.param_dtype)     # the residual stream's dtype (the embedding's)
    self.act_bytes = int(np.prod(self.act_shape)) * self.act_dtype.itemsize

  def _stored_bytes(self, shape, dtype, compressed) -> int:
    if not compressed:
      return int(np.prod(shape)) * dtype.itemsize
    g = self.policy.group_size
    lead, groups = int(np.prod(shape[:-1])), -(-shape[-1] // g)
    return lead * groups * (g * self.policy.bits // 8 + 2 * 2)

  def planned_bytes(self) -> dict[str, float]:
    """Resident bytes each tier needs at its peak (device: incl. in-flight layers and workspace)."""
    cfg, p, L = self.cfg, self.policy, self.cfg.num_layers
    per = dict.fromkeys(TIERS, 0.0)
    for b, t in zip(self.w_stored, self.w_tiers):
      per[t] += b * L
    for t in self.kv_tiers.values():
      per[t] += self.kv_block_bytes
    for t in self.act_tiers:
      per[t] += self.act_bytes
    ends = 4 * (cfg.embed_params() + cfg.head_params() + (cfg.vocab_size * cfg.hidden if cfg.tie_embeddings else 0))
    offloaded = sum(b for b, t in zip(self.w_stored, self.w_tiers) if t != 'device')
    per['device'] += ends + self.workspace_bytes(offloaded)
    return per

  def workspace_bytes(self, offloaded_layer: int) -> int:
    """Device bytes in flight: two offloaded layers (current + prefetched), a dequantised layer, two
    fetched cache blocks (as computed: uncompressed), hidden in/out and the attention scores of a batch."""
    cfg, p = self.cfg, self.policy
    gbs, T, S = p.gpu_batch_size, self.prompt_len, self.max_len
    dq = self.layer_fp_bytes if p.compress_weight else 0
    kv_fp = 2 * gbs * S * cfg.num_kv_heads * cfg.head_dim * self.kv_dtype.itemsize
    kv_cur = kv_fp + (self.kv_block_bytes if p.compress_kv else 0)
    hidden = 2 * gbs * T * max(cfg.hidden, cfg.ffn) * 4
    scores = gbs * cfg.num_heads * T * S * 4
    logits = p.block * cfg.vocab_size * 4
    return 2 * offloaded_layer + dq + 2 * kv_cur + hidden + scores + logits

  def _check_budgets(self, disk_dir: str) -> None:
    plan = self.planned_bytes()
    self.plan = plan
    for tier in ('device', 'host'):
      if plan[tier] > self.budget[tier]:
        raise BudgetError(
            f'policy needs {plan[tier] / GB:.4g} GB on the {tier} ({self._breakdown(tier)}) but offload.'
            f'{tier}_gb is {self.budget[tier] / GB:.4g} GB; lower the {tier} fractions or the block size')
    self.disk_folder = ''
    if disk_dir:
      check_disk_dir(disk_dir)
    if plan['disk'] > 0:
      if not disk_dir:
        raise HetjaxError(f'the policy puts {plan["disk"] / GB:.4g} GB on disk: set offload.disk_dir')
      free = shutil.disk_usage(disk_dir).free
      if plan['disk'] > free:
        raise HetjaxError(f'the policy puts {plan["disk"] / GB:.4g} GB on disk but {disk_dir!r} has only '
                          f'{free / GB:.4g} GB free')
      self.disk_folder = os.path.join(disk_dir, f'hetjax-offload-{os.getpid()}-{id(self):x}')

  def _breakdown(self, tier: str) -> str:
    L = self.cfg.num_layers
    w = sum(b for b, t in zip(self.w_stored, self.w_tiers) if t == tier) * L
    kv = sum(self.kv_block_bytes for t in self.kv_tiers.values() if t == tier)
    return f'weights {w / GB:.3g}, KV {kv / GB:.3g}, other {(self.plan[tier] - w - kv) / GB:.3g}'

  # ---- placement (weights compressed once, here)

  def _place_weights(self, layers, ends) -> None:
    self.ends = []
    for stage in ends:   # embed and head on the device
      g, s = nnx.split(stage)
      s = jax.device_put(s, self.device)
      self.ledger.hold('device', sum(nbytes(x) for x in jax.tree.leaves(s)))
      self.ends.append((g, s))
    for j in range(self.cfg.num_layers):
      leaves = jax.tree.leaves(nnx.state(layers(j)))
      for i, (leaf, tier) in enumerate(zip(leaves, self.w_tiers)):
        if self.w_compress[i]:
          q = quantize(jax.device_put(leaf, self.device), self.policy.bits, self.policy.group_size, symmetric=False,
                       scale_dtype=jnp.float16)
          parts = (q.payload, q.scale, q.zero)
        else:
          parts = (leaf,)
        for n, part in enumerate(parts):
          self.tiers[tier].put(('w', j, i, n), np.asarray(part) if tier != 'device' else part)
      if j % 8 == 7:
        self.log(f'offload: placed {j + 1}/{self.cfg.num_layers} layers')

  def _place_cache_and_acts(self) -> None:
    for (j, k), tier in self.kv_tiers.items():
      for name in ('k', 'v'):
        for n, (shape, dtype) in enumerate(self.kv_parts):
          self.tiers[tier].zeros(('kv', j, k, name, n), shape, dtype)
    for k, tier in enumerate(self.act_tiers):
      self.tiers[tier].zeros(('act', k), self.act_shape, self.act_dtype)

  # ---- transfers (run on the pool when prefetching)

  def _hold(self, n: int) -> None:
    self.ledger.hold('device', n)
    if self.ledger.resident['device'] > self.budget['device']:
      raise HetjaxError(f'device budget exceeded while running: {self.ledger.resident["device"] / GB:.4g} GB '
                        f'resident > offload.device_gb {self.budget["device"] / GB:.4g}')

  def _load_layer(self, j: int):
    out, held = [], 0
    for i, tier in enumerate(self.w_tiers):
      nparts = 3 if self.w_compress[i] else 1
      parts = [self.tiers[tier].read(('w', j, i, n), 'weights') for n in range(nparts)]
      if tier != 'device':
        held += sum(nbytes(a) for a in parts)
      out.append(tuple(parts) if self.w_compress[i] else parts[0])
    self._hold(held)
    return out, held

  def _fetch_cache(self, j: int, k: int, length: int):
    tier = self.tiers[self.kv_tiers[j, k]]
    parts = {name: tuple(tier.read(('kv', j, k, name, n), 'kv', axis=1, length=length)
                         for n in range(len(self.kv_parts))) for name in ('k', 'v')}
    held = sum(nbytes(a) for v in parts.values() for a in v)
    self._hold(held)
    return parts, held

  def _store_cache(self, j: int, k: int, rows: dict, start: int) -> None:
    tier = self.tiers[self.kv_tiers[j, k]]
    for name in ('k', 'v'):
      for n, r in enumerate(rows[name]):
        tier.write(('kv', j, k, name, n), r, 'kv', axis=1, start=start)

  def _submit(self, fn, *args):
    if self.prefetch:
      return self.pool.submit(fn, *args)
    f = cf.Future()
    f.set_result(fn(*args))
    return f

  # ---- the schedule

  def generate(self, prompts, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
               seed: int = 0) -> tuple[np.ndarray, dict]:
    """New ids [B, gen_len] for prompts [B, prompt_len] (B <= block; the block is filled by repeating
    the prompts) and timing {'prefill_s', 'decode_s', 'total_s'}. Sampling is generate.py's, over the
    whole block at once with the same keys, so it matches in-memory generation of the block."""
    tokens, B = self._fill_block(prompts, self.prompt_len)
    keys = jax.random.split(jax.random.key(seed), self.gen_len)
    sampling = (float(temperature), int(top_k), float(top_p))
    ids, timing = self._loop(tokens, lambda i, logits: sample_logits(logits, keys[i], *sampling))
    return ids[:B], timing

  def score(self, tokens) -> float:
    """Mean negative log-likelihood of tokens[:, prompt_len:] ([B, prompt_len + gen_len]) under teacher
    forcing: the prefill and gen_len - 1 decode steps, through the same tiers, compression and cache."""
    tokens, B = self._fill_block(tokens, self.prompt_len + self.gen_len)
    T, nll = self.prompt_len, []

    def forced(i, logits):
      target = jnp.asarray(tokens[:, T + i])
      nll.append(-jnp.take_along_axis(jax.nn.log_softmax(logits), target[:, None], axis=1)[:B, 0])
      return target

    self._loop(tokens[:, :T], forced)
    return float(jnp.mean(jnp.stack(nll)))

  def _fill_block(self, tokens, length: int) -> tuple[np.ndarray, int]:
    tokens = np.atleast_2d(np.asarray(tokens, np.int32))
    B, T = tokens.shape
    if T != length:
      raise HetjaxError(f'{T} tokens per sequence, but this engine was built for {length}')
    if B > self.policy.block:
      raise HetjaxError(f'{B} sequences do not fit the policy\'s block of {self.policy.block}')
    if tokens.min() < 0 or tokens.max() >= self.cfg.vocab_size:
      raise HetjaxError(f'token ids must lie in [0, {self.cfg.vocab_size})')
    return tokens[np.arange(self.policy.block) % B], B

  def _loop(self, prompts: np.ndarray, choose) -> tuple[np.ndarray, dict]:
    """Prefill, then gen_len - 1 decode steps; choose(i, logits [block, V]) gives the next ids."""
    T = self.prompt_len
    out, t_start, t_prefill = [], time.perf_counter(), None
    for i in range(self.gen_len):
      start, t = (0, T) if i == 0 else (T + i - 1, 1)
      nxt = choose(i, self._step(prompts if i == 0 else np.asarray(out[-1])[:, None], start, t))
      out.append(nxt)
      if i == 0:
        nxt.block_until_ready()
        t_prefill = time.perf_counter() - t_start
    ids = np.asarray(jnp.stack(out, axis=1))
    total = time.perf_counter() - t_start
    return ids, {'prefill_s': t_prefill, 'decode_s': total - t_prefill, 'total_s': total}

  def _step(self, tokens: np.ndarray, start: int, t: int) -> jax.Array:
    """All layers for all GPU batches at one token position (prefill: t = prompt_len)."""
    p, L, nb, gbs = self.policy, self.cfg.num_layers, self.policy.num_gpu_batches, self.policy.gpu_batch_size
    pos = jnp.int32(start)
    (ge, se), (gh, sh) = self.ends
    for k in range(nb):
      h = _embed(ge, se, jnp.asarray(tokens[k * gbs:(k + 1) * gbs]), pos)
      self._store_act(k, h)
    decode = start > 0
    kv_len = min(self.max_len, -(-(start + t) // BUCKET) * BUCKET)
    spec = (self.graphdef, self.treedef, self.w_metas, kv_len, self.kv_meta)
    order = [(j, k) for j in range(L) for k in range(nb)]
    weights = self._submit(self._load_layer, 0)
    offloaded_attn = lambda j, k: decode and p.cpu_attention and self.kv_tiers[j, k] != 'device'
    caches = {}
    if decode and not offloaded_attn(*order[0]):
      caches[order[0]] = self._submit(self._fetch_cache, *order[0], kv_len)
    pending = []
    for n, (j, k) in enumerate(order):
      if k == 0:
        w, w_held = weights.result()
        if j + 1 < L and self.reuse_weights:
          weights = self._submit(self._load_layer, j + 1)   # next layer loads while this one computes
      elif not self.reuse_weights:                           # naive: every batch loads its own copy
        self.ledger.release('device', w_held)
        w, w_held = self._load_layer(j)
      if decode and n + 1 < len(order) and not offloaded_attn(*order[n + 1]):
        caches[order[n + 1]] = self._submit(self._fetch_cache, *order[n + 1], kv_len)   # next batch's cache
      x = self._load_act(k, t)
      if offloaded_attn(j, k):
        y = self._cpu_attention_layer(spec, w, x, j, k, start, kv_len)
      else:
        cache, c_held = caches.pop((j, k)).result() if decode else (None, 0)
        y, rows = _layer_step(spec, w, x, cache, pos)
        pending.append(self._submit(self._store_cache, j, k, rows, start))   # store back behind compute
        self.ledger.release('device', c_held)
      self._store_act(k, y)
      if k == nb - 1:
        self.ledger.release('device', w_held)
        if not self.reuse_weights and j + 1 < L:
          weights = self._submit(self._load_layer, j + 1)
    for f in pending:
      f.result()
    return jnp.concatenate([_head(gh, sh, self._load_act(k, t)) for k in range(nb)])

  def _cpu_attention_layer(self, spec, w, x, j, k, start, kv_len):
    """Decode with the cache block where it lives (host or disk): q/k/v down, attention output up."""
    q, kn, vn = _attn_inputs(spec, w, x, jnp.int32(start))
    tier = self.tiers[self.kv_tiers[j, k]]
    cpu = jax.devices('cpu')[0]
    kv = []
    for name, new in (('k', kn), ('v', vn)):
      tier.write(('kv', j, k, name, 0), new, 'cpu_attention', axis=1, start=start)
      kv.append(tier.raw(('kv', j, k, name, 0))[:, :kv_len])
      if tier.name == 'disk':
        self.ledger.move('from_disk', 'kv', nbytes(kv[-1]))
    q_host = np.asarray(q)
    self.ledger.move('to_host', 'cpu_attention', nbytes(q_host))
    out = _cpu_attention(*(jax.device_put(np.asarray(a), cpu) for a in (q_host, *kv)), start,
                         self.cfg.num_kv_heads)
    out = jax.device_put(out, self.device)
    self.ledger.move('from_host', 'cpu_attention', nbytes(out))
    return _attn_outputs(spec, w, x, out)

  def _store_act(self, k: int, h: jax.Array) -> None:
    self.tiers[self.act_tiers[k]].write(('act', k), h, 'act', axis=1, start=0)

  def _load_act(self, k: int, t: int) -> jax.Array:
    return self.tiers[self.act_tiers[k]].read(('act', k), 'act', axis=1, length=t)

  # ---- results

  def metrics(self, timing: dict) -> dict:
    p = self.policy
    tokens = p.block * self.gen_len
    by_kind = {f'{d}/{k}': n for (d, k), n in sorted(self.ledger.moved.items())}
    out = {'tokens_per_s': tokens / timing['total_s'], 'generated_tokens': tokens, **timing,
           'decode_tokens_per_s': p.block * (self.gen_len - 1) / timing['decode_s'] if self.gen_len > 1 else None,
           'block': p.block, 'gpu_batch_size': p.gpu_batch_size, 'num_gpu_batches': p.num_gpu_batches,
           **{k: int(v) for k, v in self.ledger.moved_by_direction().items()},
           'bytes_moved_by_kind': by_kind,
           'peak_resident_bytes': dict(self.ledger.peak),
           'planned_peak_bytes': {k: int(v) for k, v in self.plan.items()},
           'budget_bytes': {k: int(v) for k, v in self.budget.items()},
           'weight_fractions_realised': self.realised_fractions(),
           'policy': dataclasses.asdict(p), 'prefetch': self.prefetch, 'reuse_weights': self.reuse_weights}
    if self.device.platform != 'cpu':
      stats = self.device.memory_stats() or {}
      out['measured_device_peak_bytes'] = stats.get('peak_bytes_in_use')
      out['device_peak_within_budget'] = bool(stats.get('peak_bytes_in_use', 0) <= self.budget['device'])
    return out

  def realised_fractions(self) -> list[float]:
    per = [sum(b for b, t in zip(self.w_stored, self.w_tiers) if t == tier) for tier in TIERS]
    return [round(v / sum(per), 4) for v in per]

  def close(self) -> None:
    """Stop the threads and remove the disk tier's files."""
    self.pool.shutdown(wait=True)
    for tier in getattr(self, 'tiers', {}).values():
      tier.close() if isinstance(tier, DiskTier) else tier.drop_all()
