"""HexGen's inner step: the best layout of one replica (a device count per pool) and the objectives.

Pools. Devices of one host and one GPU type are interchangeable; such a set is a *pool*. A TP group is
`t` devices of one pool, so TP groups never span hosts or GPU types. Pool order: regions chained
greedily by delay from the largest one, then hosts by name.

Inner DP (exact for its cost terms, given the pool order): for every batch size it runs a dynamic
program over the replica's pools in a fixed order: each pool takes n >= 0 layers (0 = unused) at its
best TP degree t, split into ceil(n / cap_t) stages of t devices; the DP state is (layers placed,
last used pool), with the first used pool fixed per run so that the sampled token's return hop is
counted. Stage caps reserve the embedding and head in every stage (slightly conservative). The DP
minimises one request's latency (a sum over stages).

Pipelined decode (costmodel/inference.py) makes more stages worth having: a replica with S stages
decodes S request groups at once, and splitting the weights over more stages leaves memory for more
KV cache. So the DP runs twice (free choice of pools, and every pool used), each pool-level layout
is expanded three ways -- the fewest stages memory needs, every TP group of the chosen degree as a
stage, and every TP group of the smallest degree that fits -- each with the DP's layer split and a
balanced one (search/layers.assign_layers: the slowest stage as fast as the caps allow), and each
candidate is scored exactly by `replica_cost` with one request group per stage.

Objectives (fitness is minimised):
  'rate'     maximise the requests/s served within the SLO: sum over replicas of the best
             S B / round(B), over batch limits B and the expansions above, subject to
             round(B) <= slo_margin * deadline (the rest of the deadline is queueing slack).
  'latency'  minimise mean request latency at arrival rate `rate`: batch-1 service (S groups in
             flight), load split in proportion to replica capacity, M/D/1 waiting time, over the
             best subset of fastest replicas.
Baseline 'symmetric': one TP degree for every stage of every replica, layers split equally, all of a
replica's TP groups used.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Sequence

import numpy as np

from hetjax import checks
from hetjax.cluster import Cluster
from hetjax.costmodel import inference as icm
from hetjax.errors import HetjaxError
from hetjax.models.config import ModelConfig
from hetjax.search.layers import assign_layers, equal_layers

OBJECTIVES = ('rate', 'latency')
INF = float('inf')
OVERLOADED = 1e6   # latency objective: fitness offset when the rate exceeds what the replicas can serve


@dataclasses.dataclass(frozen=True)
class HexGenConfig:
  objective: str = 'rate'
  deadline: float = 0.0          # seconds; required by 'rate'
  rate: float = 0.0              # requests/s; used by 'latency'
  slo_margin: float = 0.5        # batch latency budget as a share of the deadline
  max_batch: int = 32            # largest request group a stage decodes together (powers of 2 tried)
  symmetric: bool = False        # baseline: uniform TP and equal layers
  tp: int = 0                    # symmetric: the TP degree (0 = try all and keep the best)
  max_tp: int = 8
  population: int = 40
  evaluations: int = 1500
  time_limit: Optional[float] = None

  def validate(self) -> 'HexGenConfig':
    if self.objective not in OBJECTIVES:
      raise HetjaxError(f'objective must be one of {OBJECTIVES}, got {self.objective!r}')
    checks.real(self.deadline, 'deadline', 0)
    if self.objective == 'rate' and self.deadline <= 0:
      raise HetjaxError(f"objective 'rate' needs a positive deadline (seconds), got {self.deadline}")
    checks.real(self.rate, 'rate', 0)
    checks.real(self.slo_margin, 'slo_margin', 0, 1, lo_open=True)
    if self.max_batch < 1 or self.population < 2 or self.evaluations < 1:
      raise HetjaxError('max_batch, population (>= 2) and evaluations must be positive')
    return self


@dataclasses.dataclass(frozen=True)
class Pool:
  host: str
  gpu: str
  region: str
  devices: tuple[int, ...]


def make_pools(cluster: Cluster) -> list[Pool]:
  """Pools in pipeline order: regions chained greedily by delay from the largest, hosts by name."""
  groups: dict[tuple, list[int]] = {}
  for d in cluster.devices:
    groups.setdefault((d.host, d.gpu, d.region, d.tflops, d.memory_gb, d.op_overhead_s), []).append(d.id)
  regions = cluster.regions()
  lead = {r: ids[0] for r, ids in regions.items()}
  order = [max(regions, key=lambda r: (len(regions[r]), r))]
  while len(order) < len(regions):
    last = lead[order[-1]]
    order.append(min((r for r in regions if r not in order), key=lambda r: (cluster.delay_ms[last, lead[r]], r)))
  pools = [Pool(k[0], k[1], k[2], tuple(v)) for k, v in groups.items()]
  return sorted(pools, key=lambda p: (order.index(p.region), p.host, p.gpu))


@dataclasses.dataclass
class ReplicaChoice:
  """Best layout of one replica (a count per pool): stages as (pool, tp, layers) and its numbers."""
  counts: tuple[int, ...]
  stages: list[tuple[int, int, int]]   # one (pool index, tp, layers) per stage, pipeline order
  batch: int                           # batch limit chosen (requests per group; one group per stage)
  latency_1: float                     # one request alone (s)
  latency_b: float                     # a full round: one group of `batch` per stage (s)
  capacity: float                      # requests/s in full rounds

  @property
  def feasible(self) -> bool:
    return bool(self.stages)


class Planner:
  """Caches layer costs, stage caps and inner results for one (cluster, model, workload).

  A stage's host time per op (the cost model's overhead term): `overhead(devices, layers)` where
  given (e.g. fitted per process and layer count on a testbed); else the cluster's measured
  op_overhead_s (mode=calibrate; the group's largest) where its devices have one; else the setup's
  op_overhead_s (datasheet clusters)."""

  def __init__(self, cluster: Cluster, model: ModelConfig, setup: icm.ServeSetup, cfg: HexGenConfig,
               overhead: Optional[Callable[[Sequence[int], int], float]] = None):
    self.cluster, self.model, self.setup, self.cfg = cluster, model, setup.validate(), cfg.validate()
    self.overhead = overhead
    self.pools = make_pools(cluster)
    self.sizes = np.array([len(p.devices) for p in self.pools])
    self.tps = icm.allowed_tp(model, cfg.max_tp)
    self.batches = [b for b in (2 ** k for k in range(12)) if b <= cfg.max_batch]
    self._inner: dict[tuple, ReplicaChoice] = {}
    self._options: dict[tuple, list] = {}
    self._hops: dict[tuple, float] = {}
    self._exact: dict[tuple, Optional[dict]] = {}

  # ---- per pool, per batch: layer time and stage cap for each TP degree
  def _pool_options(self, q: int, count: int, b: int) -> list[tuple[int, float, int, int]]:
    """(tp, seconds per layer, layers per stage cap, number of TP groups) for pool q with `count` devices."""
    key = (q, count, b)
    if key not in self._options:
      self._options[key] = self._pool_options_uncached(q, count, b)
    return self._options[key]

  def _pool_options_uncached(self, q: int, count: int, b: int) -> list[tuple[int, float, int, int]]:
    pool, setup = self.pools[q], dataclasses.replace(self.setup, batch=b)
    d0 = pool.devices[0]
    out = []
    for t in self.tps:
      if t > count:
        continue
      if self.cfg.symmetric and self.cfg.tp and t != self.cfg.tp:
        continue
      alpha, beta = icm.group_link(self.cluster, pool.devices[:t])
      lc = icm.layer_cost(self.model, setup, self.cluster.tflops(d0), self.cluster.mem_bw_gbs(d0), t, alpha, beta)
      cap = icm.layers_that_fit(self.model, setup, t, self.cluster.memory_bytes(d0), True, True)
      if cap >= 1:
        out.append((t, lc.prefill + lc.decode, cap, count // t))
    return out

  def _hop(self, p: int, q: int, b: int) -> float:
    """PP cost between the leaders of pools p and q over a whole request (prefill + decode steps)."""
    if (p, q, b) not in self._hops:
      self._hops[(p, q, b)] = self._hop_uncached(p, q, b)
    return self._hops[(p, q, b)]

  def _hop_uncached(self, p: int, q: int, b: int) -> float:
    a, c = self.pools[p].devices[0], self.pools[q].devices[0]
    act = b * self.model.hidden * self.setup.bytes_per_value
    steps = self.setup.gen_len - 1
    if a == c:  # same pool: stages on two groups of one host
      c = self.pools[p].devices[-1]
    return icm.pp_hop(self.cluster, a, c, act * self.setup.prompt_len) + steps * icm.pp_hop(self.cluster, a, c, act)

  def _back(self, p: int, q: int, b: int) -> float:
    a, c = self.pools[p].devices[0], self.pools[q].devices[0]
    return (self.setup.gen_len - 1) * icm.pp_hop(self.cluster, a, c, 4 * b)

  # ---- inner step
  def _pool_cost(self, q: int, count: int, b: int) -> tuple[np.ndarray, np.ndarray]:
    """Cheapest seconds for pool q to run n = 0..L layers (inf if it cannot), and the TP degree used."""
    L = self.model.num_layers
    best, arg = np.full(L + 1, INF), np.zeros(L + 1, dtype=int)
    n = np.arange(L + 1)
    intra = self._hop(q, q, b)
    for t, per, cap, groups in self._pool_options(q, count, b):
      stages = np.ceil(n / cap)
      cost = n * per + np.maximum(stages - 1, 0) * intra
      cost = np.where((n >= 1) & (stages <= groups), cost, INF)
      better = cost < best
      best, arg = np.where(better, cost, best), np.where(better, t, arg)
    return best, arg

  def _dp(self, counts: Sequence[int], b: int, use_all: bool = False
          ) -> tuple[float, list[tuple[int, int, int]]]:
    """Min latency (DP estimate) of a batch of b and its stages [(pool, tp, layers)], or (inf, []).
    use_all: every pool with devices takes at least one layer (more stages for pipelined decode)."""
    L = self.model.num_layers
    active = [q for q, c in enumerate(counts) if c > 0]
    costs = {q: self._pool_cost(q, counts[q], b) for q in active}
    diff = np.arange(L + 1)[None, :] - np.arange(L + 1)[:, None]   # [j, j'] = j' - j
    best, best_path = INF, None
    for fi, f in enumerate(active[:1] if use_all else active):
      # dp[last][j]: min seconds with j layers placed, last used pool `last`
      dp = {f: costs[f][0].copy()}
      back: dict[int, tuple] = {f: (None, None)}
      prev = f
      for q in active[fi + 1:]:
        c_ext = np.where(diff >= 0, costs[q][0][np.clip(diff, 0, L)], INF)
        cand, cand_arg = np.full(L + 1, INF), None
        for last, row in ({prev: dp[prev]} if use_all else dp).items():
          tot = row[:, None] + c_ext + self._hop(last, q, b)
          j_best = tot.argmin(axis=0)
          val = tot[j_best, np.arange(L + 1)]
          if cand_arg is None:
            cand_arg = np.full((L + 1, 2), -1)
          upd = val < cand
          cand = np.where(upd, val, cand)
          cand_arg[upd] = np.stack([np.full(upd.sum(), last), j_best[upd]], axis=1)
        dp[q] = cand
        back[q] = cand_arg
        prev = q
      for last, row in ({prev: dp[prev]} if use_all else dp).items():
        val = row[L] + (self._back(last, f, b) if last != f else 0.0)
        if val < best:
          best, best_path = val, (f, last, back, costs)
    if best_path is None or not math.isfinite(best):
      return INF, []
    f, last, back, costs = best_path
    stages, j, q = [], L, last
    while True:
      if q == f:
        n = j
        stages.append((q, int(costs[q][1][n]), n))
        break
      prev, j_prev = back[q][j]
      stages.append((q, int(costs[q][1][j - j_prev]), int(j - j_prev)))
      j, q = int(j_prev), int(prev)
    return best, stages[::-1]

  def expand(self, pool_stages: list[tuple[int, int, int]], counts: Sequence[int], b: int
             ) -> list[list[tuple[int, int, int]]]:
    """(pool, tp, n layers) -> layouts of one (pool, tp, layers) per stage, near-equal layers: the
    fewest stages memory needs (ceil(n / cap)), every TP group of degree tp as a stage, and every TP
    group of the pool's smallest degree that holds n layers. Duplicates dropped."""
    variants = {'fewest': [], 'all_groups': [], 'smallest_tp': []}
    for q, t, n in pool_stages:
      opts = {tt: (cap, groups) for tt, _, cap, groups in self._pool_options(q, counts[q], b)}
      cap, groups = opts[t]
      small = min(tt for tt, (c, g) in opts.items() if c * g >= n)
      for name, (tp, k) in {'fewest': (t, math.ceil(n / cap)), 'all_groups': (t, min(groups, n)),
                            'smallest_tp': (small, min(opts[small][1], n))}.items():
        variants[name] += [(q, tp, m) for m in equal_layers(n, k)]
    out = []
    for v in variants.values():
      if v not in out:
        out.append(v)
    return out

  def symmetric_stages(self, counts: Sequence[int]) -> list[tuple[int, int, int]]:
    """Baseline layout: every pool split into TP groups of cfg.tp, all used, equal layers."""
    t = self.cfg.tp
    groups = [q for q, c in enumerate(counts) for _ in range(c // t)]
    if not groups or len(groups) > self.model.num_layers:
      return []
    return [(q, t, m) for q, m in zip(groups, equal_layers(self.model.num_layers, len(groups)))]

  def devices(self, stages: list[tuple[int, int, int]], offset: Optional[dict] = None) -> list[icm.StageLayout]:
    """Device ids for stages, taking each pool's devices in order from `offset` (updated in place)."""
    offset = {} if offset is None else offset
    out = []
    for q, t, n in stages:
      k = offset.get(q, 0)
      devices = list(self.pools[q].devices[k:k + t])
      out.append(icm.StageLayout(n, devices, overhead_s=self.stage_overhead(devices, n)))
      offset[q] = k + t
    return out

  def stage_overhead(self, devices: Sequence[int], num_layers: int) -> Optional[float]:
    """Host seconds per op of a stage (class doc); None: the setup's op_overhead_s."""
    if self.overhead is not None:
      return float(self.overhead(devices, num_layers))
    measured = [self.cluster.devices[d].op_overhead_s for d in devices]
    measured = [x for x in measured if x is not None]
    return max(measured) if measured else None

  def exact(self, stages: list[tuple[int, int, int]], b: int, groups: Optional[int] = None
            ) -> Optional[dict]:
    """replica_cost of a layout (one group of b requests per stage by default); None if it does not fit."""
    key = (tuple(stages), b, groups)
    if key not in self._exact:
      try:
        self._exact[key] = icm.replica_cost(self.cluster, self.model, self.devices(stages),
                                            dataclasses.replace(self.setup, batch=b), groups=groups)
      except HetjaxError:
        self._exact[key] = None
    return self._exact[key]

  def layouts(self, counts: tuple[int, ...], b: int) -> list[list[tuple[int, int, int]]]:
    if self.cfg.symmetric:
      st = self.symmetric_stages(counts)
      return [st] if st else []
    out = []
    for use_all in (False, True):
      st = self._dp(counts, b, use_all)[1]
      for layout in self.expand(st, counts, b) if st else []:
        for v in (layout, self.balanced(layout, counts, b)):
          if v and v not in out:
            out.append(v)
    return out

  def balanced(self, stages: list[tuple[int, int, int]], counts: Sequence[int], b: int
               ) -> list[tuple[int, int, int]]:
    """The same stages with layers re-split to minimise the slowest stage (the pipelined bottleneck)
    within the memory caps; [] if they cannot hold the model."""
    opts = [{t: (per, cap) for t, per, cap, _ in self._pool_options(q, counts[q], b)}[t] for q, t, _ in stages]
    try:
      n = assign_layers(self.model.num_layers, [o[0] for o in opts], [0.0] * len(stages), [o[1] for o in opts])
    except HetjaxError:
      return []
    return [(q, t, k) for (q, t, _), k in zip(stages, n)]

  def inner(self, counts: Sequence[int]) -> ReplicaChoice:
    """Best layout and batch limit of a replica with `counts` devices per pool (cached)."""
    key = tuple(int(c) for c in counts)
    if key in self._inner:
      return self._inner[key]
    budget = self.cfg.slo_margin * self.cfg.deadline
    fastest = best = None            # (latency_1 or capacity, layout, batch, cost)
    for b in self.batches:
      fits = False
      for st in self.layouts(key, b):
        cost = self.exact(st, b)
        if cost is None:
          continue
        fits = True
        if b == 1:
          alone = self.exact(st, 1, groups=1)['latency']
          if fastest is None or alone < fastest[0]:
            fastest = (alone, st, b, cost)
        if self.cfg.objective == 'rate' and cost['latency'] <= budget and (
            best is None or cost['requests_per_s'] > best[0]):
          best = (cost['requests_per_s'], st, b, cost)
      if not fits or self.cfg.objective == 'latency':
        break                       # larger batches need more memory: stop
    if fastest is None:
      result = ReplicaChoice(key, [], 0, INF, INF, 0.0)
    elif best is None:              # 'latency', or even one request alone misses the budget
      _, st, b, cost = fastest
      capacity = cost['requests_per_s'] if self.cfg.objective == 'latency' else 0.0
      result = ReplicaChoice(key, st, b, fastest[0], cost['latency'], capacity)
    else:
      _, st, b, cost = best
      result = ReplicaChoice(key, st, b, self.exact(st, 1, groups=1)['latency'], cost['latency'],
                             cost['requests_per_s'])
    self._inner[key] = result
    return result

  # ---- outer objective
  def score(self, genome: tuple[tuple[int, ...], ...]) -> tuple[float, list[ReplicaChoice]]:
    """(fitness to minimise, replicas that serve traffic)."""
    reps = [r for r in (self.inner(g) for g in genome) if r.feasible]
    if self.cfg.objective == 'rate':
      reps = [r for r in reps if r.capacity > 0]
      return -sum(r.capacity for r in reps), reps
    return latency_objective(reps, self.cfg.rate)


def latency_objective(reps: list[ReplicaChoice], rate: float) -> tuple[float, list[ReplicaChoice]]:
  """Mean latency over the k fastest replicas, best k: load split in proportion to capacity mu_i
  (requests/s with one request per stage in flight), service time latency_1, M/D/1 waiting at
  rho = rate / sum mu_i. With one stage per replica, mu_i = 1 / latency_1."""
  reps = sorted(reps, key=lambda r: r.latency_1)
  best, used = INF, []
  mu = weighted = 0.0
  for k, r in enumerate(reps, 1):
    mu += r.capacity
    weighted += r.capacity * r.latency_1
    rho = rate / mu
    if rho >= 1:
      continue
    mean = weighted / mu * (1 + rho / (2 * (1 - rho)))
    if mean < best:
      best, used = mean, reps[:k]
  if not used and reps:   # overloaded even with all replicas: rank by load so the search can improve
    return OVERLOADED * (1 + rate / mu), reps
  return best, used
