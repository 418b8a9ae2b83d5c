"""FlexGen cost model: offloaded generative inference on one GPU with a CPU and a disk behind it.

A policy places fractions of the weights (w), KV cache (c) and activations (h) on GPU/CPU/disk
(g, c, d; each triple sums to 1), runs a block of `gpu_batch_size x num_gpu_batches` sequences
layer by layer (zig-zag: a layer's weights are loaded once per block), may run attention on the CPU
when the KV cache lives there, and may store weights and/or KV in 4-bit groups.

Per layer, prefill and decode step time are the max over five concurrent terms (FlexGen's model):
  ctog  CPU->GPU bytes / ctog bandwidth       gtoc  GPU->CPU bytes / gtoc bandwidth
  dtoc  disk->CPU bytes / dtoc bandwidth      ctod  CPU->disk bytes / ctod bandwidth
  comp  GPU matmuls / TFLOP/s + GPU attention (KV bytes / GPU memory bandwidth) + CPU attention
        (FLOPs / CPU TFLOP/s)
  total = L * T_pre + (gen_len - 1) * L * T_gen,   throughput = block * gen_len / total
Decode terms use the mean context prompt_len + gen_len / 2. Every term and every memory total is affine
in the nine fractions, which is what lets policy_lp.py solve the relaxed problem as a linear program.
The embedding and LM head are left out (FlexGen keeps them on the GPU; they are small next to a layer
stack of this size).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

import numpy as np

from hetjax import checks
from hetjax.cluster import CLUSTER_DIR
from hetjax.errors import HetjaxError
from hetjax.models.config import ModelConfig

GB = 1e9
FRACTIONS = ('wg', 'wc', 'wd', 'cg', 'cc', 'cd', 'hg', 'hc', 'hd')
TERMS = ('ctog', 'gtoc', 'dtoc', 'ctod', 'comp')
MEMORIES = ('gpu', 'cpu', 'disk')


@dataclasses.dataclass(frozen=True)
class Hardware:
  name: str
  gpu_mem_gb: float
  cpu_mem_gb: float
  disk_gb: float
  ctog_gbs: float               # GB/s
  gtoc_gbs: float
  dtoc_gbs: float
  ctod_gbs: float
  gpu_tflops_prefill: float     # achieved matmul rates
  gpu_tflops_decode: float
  gpu_mem_bw_gbs: float
  cpu_tflops: float
  cap_fraction: float = 0.8     # usable share of each memory

  def validate(self) -> 'Hardware':
    checks.text(self.name, 'hardware name')
    for f in dataclasses.fields(self):
      if f.name != 'name':  # positive and finite: GB, GB/s and TFLOP/s
        hi = 1.0 if f.name == 'cap_fraction' else None
        checks.real(getattr(self, f.name), f'hardware {self.name!r}: {f.name}', 0, hi, lo_open=True)
    return self

  def caps(self) -> dict[str, float]:
    return {'gpu': self.gpu_mem_gb * GB * self.cap_fraction, 'cpu': self.cpu_mem_gb * GB * self.cap_fraction,
            'disk': self.disk_gb * GB * self.cap_fraction}


def load_hardware(spec: str, **overrides) -> Hardware:
  """'local' (probed), a file name in configs/clusters/ (offload_<name>.json) or a JSON path."""
  if spec == 'local':
    hw = local_hardware()
  else:
    for path in (spec, os.path.join(CLUSTER_DIR, f'offload_{spec}.json'), os.path.join(CLUSTER_DIR, spec)):
      if os.path.isfile(path):
        break
    else:
      names = sorted(f[len('offload_'):-5] for f in os.listdir(CLUSTER_DIR) if f.startswith('offload_'))
      raise HetjaxError(f'unknown hardware {spec!r}; choose local, {", ".join(names)} or a JSON path')
    try:
      with open(path) as f:
        raw = checks.mapping(json.load(f), f'hardware file {path}')
        d = {k: v for k, v in raw.items() if not k.startswith('_')}
      hw = Hardware(**d)
    except (OSError, json.JSONDecodeError, TypeError) as e:
      raise HetjaxError(f'cannot read hardware file {path}: {e}') from None
  overrides = {k: v for k, v in overrides.items() if v}
  unknown = set(overrides) - {f.name for f in dataclasses.fields(Hardware)}
  if unknown:
    raise HetjaxError(f'unknown hardware field(s) {sorted(unknown)}')
  return dataclasses.replace(hw, **overrides).validate()


def local_hardware(gpu_mem_gb: Optional[float] = None, probe_mb: int = 64) -> Hardware:
  """This machine: RAM and free disk from the OS, copy and disk bandwidth and matmul rate by short
  probes. Without an accelerator the 'GPU' is JAX's CPU device: its memory is a budget (default 1 GB,
  or the accelerator's limit when there is one) carved out of RAM, so policies here exercise offloading."""
  import shutil
  import tempfile
  import time
  import jax
  import jax.numpy as jnp

  ram = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GB
  dev = jax.devices()[0]
  if gpu_mem_gb is None:
    stats = dev.memory_stats() if dev.platform != 'cpu' else None
    gpu_mem_gb = stats['bytes_limit'] / GB if stats and 'bytes_limit' in stats else 1.0
  n = probe_mb * 2 ** 20
  host = np.ones(n // 4, np.float32)
  jax.device_put(host[:1024], dev).block_until_ready()
  ctog = 0.0
  for _ in range(3):   # best of three: a busy machine's first copies are slow
    t0 = time.perf_counter()
    x = jax.device_put(host, dev).block_until_ready()
    ctog = max(ctog, n / (time.perf_counter() - t0) / GB)
  t0 = time.perf_counter()
  np.asarray(x)
  gtoc = n / (time.perf_counter() - t0) / GB
  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, 'probe.bin')
    t0 = time.perf_counter()
    with open(path, 'wb') as f:
      f.write(host.tobytes())
      f.flush()
      os.fsync(f.fileno())
    ctod = n / (time.perf_counter() - t0) / GB
    dtoc = ctod
    if hasattr(os, 'posix_fadvise'):   # read back cold: drop the file's pages from the page cache first
      with open(path, 'rb') as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        t0 = time.perf_counter()
        f.readinto(memoryview(host).cast('B'))
        dtoc = n / (time.perf_counter() - t0) / GB
    disk_free = shutil.disk_usage(d).free / GB
  k = 1024
  a = jnp.ones((k, k), jnp.float32)
  mm = jax.jit(lambda a: a @ a)
  mm(a).block_until_ready()
  t0 = time.perf_counter()
  for _ in range(3):
    mm(a).block_until_ready()
  tflops = 3 * 2 * k ** 3 / (time.perf_counter() - t0) / 1e12
  t0 = time.perf_counter()
  (x + 1).block_until_ready()
  mem_bw = 2 * n / (time.perf_counter() - t0) / GB
  return Hardware(name='local', gpu_mem_gb=float(gpu_mem_gb), cpu_mem_gb=ram, disk_gb=disk_free,
                  ctog_gbs=ctog, gtoc_gbs=gtoc, dtoc_gbs=dtoc, ctod_gbs=ctod,   # cold read, fsync'd write
                  gpu_tflops_prefill=tflops, gpu_tflops_decode=tflops, gpu_mem_bw_gbs=mem_bw,
                  cpu_tflops=tflops if dev.platform == 'cpu' else tflops / 20).validate()


@dataclasses.dataclass(frozen=True)
class Workload:
  prompt_len: int = 512
  gen_len: int = 32

  def validate(self) -> 'Workload':
    checks.integer(self.prompt_len, 'prompt_len', 1)
    checks.integer(self.gen_len, 'gen_len', 1)
    return self


@dataclasses.dataclass(frozen=True)
class Shape:
  """The discrete part of a policy; the LP fills in the fractions."""
  gpu_batch_size: int
  num_gpu_batches: int
  cpu_attention: bool = False
  compress_weight: bool = False
  compress_kv: bool = False
  bits: int = 4
  group_size: int = 64

  @property
  def block(self) -> int:
    return self.gpu_batch_size * self.num_gpu_batches

  def validate(self) -> 'Shape':
    if self.gpu_batch_size < 1 or self.num_gpu_batches < 1:
      raise HetjaxError(f'gpu_batch_size and num_gpu_batches must be >= 1, got {self.gpu_batch_size}, '
                        f'{self.num_gpu_batches}')
    if self.cpu_attention and self.compress_kv:
      raise HetjaxError('CPU attention reads the KV cache as stored: it cannot be combined with KV compression')
    if not 1 <= self.bits <= 8 or self.group_size < 1:
      raise HetjaxError(f'compression needs 1..8 bits and a positive group size, got {self.bits}, {self.group_size}')
    return self

  def ratio(self) -> float:
    """Compressed / fp16 bytes: `bits` per value plus an fp16 min and scale per group."""
    return (self.bits + 2 * 16 / self.group_size) / 16


def model_bytes(model: ModelConfig, shape: Shape) -> tuple[float, float]:
  """(weight bytes of one layer, KV bytes of one token in one layer) as stored."""
  w = model.block_params() * 2 * (shape.ratio() if shape.compress_weight else 1)
  kv = model.kv_bytes_per_token(2) * (shape.ratio() if shape.compress_kv else 1)
  return w, kv


def evaluate(model: ModelConfig, hw: Hardware, wl: Workload, shape: Shape, x) -> dict[str, dict[str, float]]:
  """Per-layer prefill and decode-step terms (s) and peak memory (bytes) for fractions x (FRACTIONS order)."""
  wg, wc, wd, cg, cc, cd, hg, hc, hd = np.asarray(x, dtype=np.float64)
  s, n, b, gbs = wl.prompt_len, wl.gen_len, shape.block, shape.gpu_batch_size
  h1, h2 = model.hidden, model.ffn
  W, KV = model_bytes(model, shape)
  A = 2 * h1                                   # fp16 hidden state of one token
  ctx = s + n / 2                              # mean decode context
  bw = {k: getattr(hw, f'{k}_gbs') * GB for k in ('ctog', 'gtoc', 'dtoc', 'ctod')}
  mm_flops = 2 * model.block_matmul_params()  # per token
  dequant_w = model.block_params() * 2 / (hw.gpu_mem_bw_gbs * GB) if shape.compress_weight else 0.0
  pre = {
      'ctog': ((wc + wd) * W + (hc + hd) * A * s * b) / bw['ctog'],
      'gtoc': ((cc + cd) * KV * s * b + (hc + hd) * A * s * b) / bw['gtoc'],
      'dtoc': (wd * W + hd * A * s * b) / bw['dtoc'],
      'ctod': (cd * KV * s * b + hd * A * s * b) / bw['ctod'],
      'comp': (b * s * mm_flops + b * 2 * s * (s + 1) * h1) / (hw.gpu_tflops_prefill * 1e12) + dequant_w,
  }
  att = b * 4 * ctx * h1                       # attention FLOPs of one decode step
  kv_read = b * ctx * KV
  if shape.cpu_attention:  # q, k, v go down, the attention output comes back; KV stays where it is
    ctog_kv, gtoc_kv = (cc + cd) * A * b, (cc + cd) * 1.5 * A * b
    gpu_att, cpu_att = cg * kv_read / (hw.gpu_mem_bw_gbs * GB), (cc + cd) * att / (hw.cpu_tflops * 1e12)
  else:                     # the off-GPU part of the cache is fetched, the new token's KV stored back
    ctog_kv, gtoc_kv = (cc + cd) * kv_read, (cc + cd) * KV * b
    gpu_att, cpu_att = kv_read / (hw.gpu_mem_bw_gbs * GB), 0.0
  dequant_kv = kv_read / shape.ratio() / (hw.gpu_mem_bw_gbs * GB) if shape.compress_kv else 0.0
  gen = {
      'ctog': ((wc + wd) * W + (hc + hd) * A * b + ctog_kv) / bw['ctog'],
      'gtoc': ((hc + hd) * A * b + gtoc_kv) / bw['gtoc'],
      'dtoc': (wd * W + cd * KV * ctx * b + hd * A * b) / bw['dtoc'],
      'ctod': (cd * KV * b + hd * A * b) / bw['ctod'],
      'comp': b * mm_flops / (hw.gpu_tflops_decode * 1e12) + gpu_att + cpu_att + dequant_w + dequant_kv,
  }
  L = model.num_layers
  kv_total = KV * (s + n) * b                  # one layer's cache for the block
  act_total = A * s * b                        # hidden states of the block at a layer boundary
  # GPU working set: next layer's weights double-buffered, one GPU batch's prefill workspace,
  # a fetched slice of KV (double-buffered) when attention runs on the GPU, a dequantised layer
  work = gbs * s * (4 * h1 + h2 + model.num_heads * s) * 2
  work += 0 if shape.cpu_attention else 2 * (1 - cg) * KV * (s + n) * gbs
  work += model.block_params() * 2 if shape.compress_weight else 0
  mem = {
      'gpu': wg * L * W + cg * L * kv_total + hg * act_total + 2 * (1 - wg) * W + work,
      'cpu': wc * L * W + cc * L * kv_total + hc * act_total + 2 * wd * W + 2 * cd * kv_total / shape.num_gpu_batches,
      'disk': wd * L * W + cd * L * kv_total + hd * act_total,
  }
  return {'prefill': pre, 'decode': gen, 'memory': mem}


def total_time(model: ModelConfig, wl: Workload, t_pre: float, t_gen: float) -> float:
  return model.num_layers * t_pre + (wl.gen_len - 1) * model.num_layers * t_gen


@dataclasses.dataclass
class Policy:
  shape: Shape
  fractions: dict[str, float]        # FRACTIONS -> value
  t_prefill: float                   # per layer (s)
  t_decode: float                    # per layer per token (s)
  total_s: float                     # one block through prefill and decode
  throughput: float                  # generated tokens / s
  bottleneck: dict[str, str]         # prefill / decode: which term binds

  def x(self) -> np.ndarray:
    return np.array([self.fractions[k] for k in FRACTIONS])

  def to_plan_offload(self) -> dict:
    """The Plan.offload entry a later engine reads."""
    f = self.fractions
    return {'gpu_batch_size': self.shape.gpu_batch_size, 'num_gpu_batches': self.shape.num_gpu_batches,
            'weights': [round(f['wg'], 6), round(f['wc'], 6), round(f['wd'], 6)],
            'kv': [round(f['cg'], 6), round(f['cc'], 6), round(f['cd'], 6)],
            'act': [round(f['hg'], 6), round(f['hc'], 6), round(f['hd'], 6)],
            'cpu_attention': self.shape.cpu_attention, 'compress_weight': self.shape.compress_weight,
            'compress_kv': self.shape.compress_kv, 'bits': self.shape.bits, 'group_size': self.shape.group_size,
            'throughput_tok_s': self.throughput}

  def describe(self) -> str:
    f, s = self.fractions, self.shape
    pct = lambda a, b, c: f'{100 * f[a]:.0f}/{100 * f[b]:.0f}/{100 * f[c]:.0f}'
    comp = '+'.join(k for k, on in (('w4', s.compress_weight), ('kv4', s.compress_kv)) if on) or 'none'
    return (f'gbs={s.gpu_batch_size} x {s.num_gpu_batches} (block {s.block}), weights g/c/d {pct("wg", "wc", "wd")}%, '
            f'KV {pct("cg", "cc", "cd")}%, act {pct("hg", "hc", "hd")}%, cpu_attention={s.cpu_attention}, '
            f'compression={comp}: {self.throughput:.3g} tok/s')
