"""FlexGen policy search: for each candidate batch shape, a linear program over the relaxed placement
fractions (scipy.optimize.linprog, HiGHS), then the shape with the highest throughput.

Variables: the nine fractions of costmodel/offload.py plus T_pre and T_gen (seconds per layer).
  minimise   L * T_pre + (gen_len - 1) * L * T_gen
  subject to term_k(x) <= T_pre and term_k(x) <= T_gen for the five I/O and compute terms,
             peak GPU / CPU / disk bytes <= cap_fraction x capacity,
             w, c, h fractions each sum to 1, all in [0, 1].
The LP rows come from evaluating the cost model itself at x = 0 and at each unit vector (every term is
affine in x), so the LP and the model cannot disagree.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Iterable, Optional, Sequence

import numpy as np
from scipy.optimize import linprog

from hetjax.costmodel.offload import (FRACTIONS, MEMORIES, TERMS, Hardware, Policy, Shape, Workload, evaluate,
                                      total_time)
from hetjax.errors import HetjaxError
from hetjax.models.config import ModelConfig

NX = len(FRACTIONS)
GPU_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
NUM_GPU_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128)
MAX_BLOCK = 8192   # sequences per block


def affine(model, hw, wl, shape) -> tuple[dict, dict]:
  """(constant, coefficient vector) of every prefill/decode term and memory total."""
  base = evaluate(model, hw, wl, shape, np.zeros(NX))
  units = [evaluate(model, hw, wl, shape, np.eye(NX)[i]) for i in range(NX)]
  const, coef = {}, {}
  for part in ('prefill', 'decode', 'memory'):
    for k, v in base[part].items():
      const[part, k] = v
      coef[part, k] = np.array([u[part][k] - v for u in units])
  return const, coef


def solve_shape(model: ModelConfig, hw: Hardware, wl: Workload, shape: Shape, prefer_fast: bool = False
                ) -> Optional[Policy]:
  """The best fractions for one shape, or None when nothing fits. prefer_fast: among (near-)optimal
  fractions, keep as much as possible in the faster memories (a second LP; the first often has ties)."""
  shape.validate()
  const, coef = affine(model, hw, wl, shape)
  L, n = model.num_layers, wl.gen_len
  c = np.zeros(NX + 2)
  c[NX], c[NX + 1] = L, (n - 1) * L
  rows, rhs = [], []
  for j, part in ((NX, 'prefill'), (NX + 1, 'decode')):
    for k in TERMS:
      r = np.zeros(NX + 2)
      r[:NX], r[j] = coef[part, k], -1.0
      rows.append(r)
      rhs.append(-const[part, k])
  caps = hw.caps()
  for m in MEMORIES:
    r = np.zeros(NX + 2)
    r[:NX] = coef['memory', m]
    rows.append(r)
    rhs.append(caps[m] - const['memory', m])
  eq = np.zeros((3, NX + 2))
  for g in range(3):
    eq[g, 3 * g:3 * g + 3] = 1.0
  if n == 1:   # no decode steps: T_gen is free, keep it at its lower bound
    c[NX + 1] = 1e-12
  A_ub, b_ub = np.array(rows), np.array(rhs)
  bounds = [(0, 1)] * NX + [(0, None)] * 2
  res = linprog(c, A_ub=A_ub, b_ub=b_ub, A_eq=eq, b_eq=np.ones(3), bounds=bounds, method='highs')
  if res.status != 0:
    return None
  if prefer_fast:   # tie-break: CPU costs 1, disk 2, subject to total time <= optimum (1 + 1e-6)
    slow = np.zeros(NX + 2)
    slow[:NX] = [0, 1, 2] * 3
    res2 = linprog(slow, A_ub=np.vstack([A_ub, c]), b_ub=np.append(b_ub, res.fun * (1 + 1e-6)), A_eq=eq,
                   b_eq=np.ones(3), bounds=bounds, method='highs')
    if res2.status == 0:
      res = res2
  x = np.clip(res.x[:NX], 0, 1) + 0.0   # + 0.0 turns -0.0 into 0.0
  for g in range(3):   # exact sums after clipping solver noise
    x[3 * g:3 * g + 3] /= x[3 * g:3 * g + 3].sum()
  ev = evaluate(model, hw, wl, shape, x)
  t_pre, t_gen = max(ev['prefill'].values()), max(ev['decode'].values())
  total = total_time(model, wl, t_pre, t_gen)
  return Policy(shape=shape, fractions=dict(zip(FRACTIONS, map(float, x))), t_prefill=t_pre, t_decode=t_gen,
                total_s=total, throughput=shape.block * n / total,
                bottleneck={'prefill': max(ev['prefill'], key=ev['prefill'].get),
                            'decode': max(ev['decode'], key=ev['decode'].get)})


def candidate_shapes(compress: bool, gpu_batch_sizes: Sequence[int] = GPU_BATCH_SIZES,
                     num_gpu_batches: Sequence[int] = NUM_GPU_BATCHES) -> Iterable[Shape]:
  for gbs in gpu_batch_sizes:
    for nb in num_gpu_batches:
      if gbs * nb > MAX_BLOCK:
        continue
      yield Shape(gbs, nb, cpu_attention=False, compress_weight=compress, compress_kv=compress)
      if not compress:
        yield Shape(gbs, nb, cpu_attention=True)
      else:   # FlexGen's compressed runs keep weights in 4 bits; CPU attention needs an uncompressed cache
        yield Shape(gbs, nb, cpu_attention=True, compress_weight=True, compress_kv=False)


@dataclasses.dataclass
class SearchResult:
  best: Policy
  solved: int
  feasible: int
  seconds: float


def search_policy(model: ModelConfig, hw: Hardware, wl: Workload, compress: bool = False,
                  gpu_batch_sizes: Sequence[int] = GPU_BATCH_SIZES,
                  num_gpu_batches: Sequence[int] = NUM_GPU_BATCHES) -> SearchResult:
  """Solve every candidate shape; the highest throughput wins (ties: smaller block)."""
  hw.validate()
  wl.validate()
  t0 = time.perf_counter()
  best, solved, feasible = None, 0, 0
  for shape in candidate_shapes(compress, gpu_batch_sizes, num_gpu_batches):
    p = solve_shape(model, hw, wl, shape)
    solved += 1
    if p is None:
      continue
    feasible += 1
    if best is None or p.throughput > best.throughput * (1 + 1e-9):
      best = p
  if best is not None:
    best = solve_shape(model, hw, wl, best.shape, prefer_fast=True)
  if best is None:
    w = model.num_layers * model.block_params() * 2 / 1e9
    caps = hw.caps()
    raise HetjaxError(f'no offloading policy fits: {w:.1f} GB of fp16 layer weights (+ KV cache) against '
                      f'{caps["gpu"] / 1e9:.1f} GPU + {caps["cpu"] / 1e9:.1f} CPU + {caps["disk"] / 1e9:.1f} disk GB '
                      f'usable on {hw.name}')
  return SearchResult(best, solved, feasible, time.perf_counter() - t0)


def check_policy(model: ModelConfig, hw: Hardware, wl: Workload, p: Policy, tol: float = 1e-6) -> list[str]:
  """Constraint violations of a policy (empty when it satisfies all of them)."""
  bad = []
  x = p.x()
  if np.any(x < -tol) or np.any(x > 1 + tol):
    bad.append(f'fraction outside [0, 1]: {x}')
  for g, name in enumerate(('weights', 'kv', 'act')):
    if abs(x[3 * g:3 * g + 3].sum() - 1) > tol:
      bad.append(f'{name} fractions sum to {x[3 * g:3 * g + 3].sum()}')
  ev = evaluate(model, hw, wl, p.shape, x)
  for part, t in (('prefill', p.t_prefill), ('decode', p.t_decode)):
    for k, v in ev[part].items():
      if v > t * (1 + tol) + 1e-15:
        bad.append(f'{part} term {k} = {v} exceeds T = {t}')
  caps = hw.caps()
  for m, v in ev['memory'].items():
    if v > caps[m] * (1 + tol):
      bad.append(f'{m} memory {v / 1e9:.3f} GB exceeds cap {caps[m] / 1e9:.3f} GB')
  return bad
