"""HexGen-style serving planner: group GPUs into independent replicas, give each replica asymmetric
pipeline stages (own devices, TP degree and layer count), pick a batch limit and a traffic share.

Pools. Devices of one host and one GPU type are interchangeable; such a set is a *pool*. A TP group is
`t` devices of one pool, so TP groups never span hosts or GPU types.

Inner step (exact for the cost model, given the pool order): a replica is a vector of device counts
per pool. For every batch size it runs a dynamic program over the replica's pools in a fixed order:
each pool takes n >= 0 layers (0 = unused) at its best TP degree t, split into ceil(n / cap_t) stages
of t devices; the DP state is (layers placed, last used pool), with the first used pool fixed per run so
that the sampled token's return hop is counted. Stage caps reserve the embedding and head in every
stage (slightly conservative); the head's compute is added by the exact re-evaluation at the end.
Pool order: regions chained greedily by delay from the largest one, then hosts by name.

Outer step: DT-FM/HexGen evolutionary search (search/evolutionary.steady_state) over groupings. Moves:
move a chunk of GPUs between groups (or to / from the idle set), merge two groups, split a group, and a
group crossover. HexGen's "shift layers" mutation is not needed: the inner DP already returns the best
layer split for a grouping, so a shift could never improve it.

Objectives (fitness is minimised):
  'rate'     maximise the requests/s served within the SLO: sum over replicas of max_B B / latency(B)
             subject to latency(B) <= slo_margin * deadline (the rest of the deadline is queueing slack).
  'latency'  minimise mean request latency at arrival rate `rate`: batch-1 service, load split in
             proportion to replica speed, M/D/1 waiting time, over the best subset of fastest replicas.
Baseline 'symmetric': one TP degree for every stage of every replica, layers split equally, all of a
replica's TP groups used; the outer search is the same.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from typing import Optional, Sequence

import numpy as np

from hetjax.cluster import Cluster
from hetjax.costmodel import inference as icm
from hetjax.errors import HetjaxError
from hetjax.models.config import ModelConfig
from hetjax.plan import Plan, Replica, Stage
from hetjax.search.evolutionary import EvoConfig, steady_state
from hetjax.search.layers import equal_layers

OBJECTIVES = ('rate', 'latency')
INF = float('inf')
OVERLOADED = 1e6   # latency objective: fitness offset when the rate exceeds what the replicas can serve


@dataclasses.dataclass(frozen=True)
class HexGenConfig:
  objective: str = 'rate'
  deadline: float = 0.0          # seconds; required by 'rate'
  rate: float = 0.0              # requests/s; used by 'latency'
  slo_margin: float = 0.5        # batch latency budget as a share of the deadline
  max_batch: int = 32            # largest batch a replica may decode together (powers of 2 tried)
  symmetric: bool = False        # baseline: uniform TP and equal layers
  tp: int = 0                    # symmetric: the TP degree (0 = try all and keep the best)
  max_tp: int = 8
  population: int = 40
  evaluations: int = 1500
  time_limit: Optional[float] = None

  def validate(self) -> 'HexGenConfig':
    if self.objective not in OBJECTIVES:
      raise HetjaxError(f'objective must be one of {OBJECTIVES}, got {self.objective!r}')
    if self.objective == 'rate' and self.deadline <= 0:
      raise HetjaxError(f"objective 'rate' needs a positive deadline (seconds), got {self.deadline}")
    if self.rate < 0:
      raise HetjaxError(f'rate must be >= 0, got {self.rate}')
    if not 0 < self.slo_margin <= 1:
      raise HetjaxError(f'slo_margin must be in (0, 1], got {self.slo_margin}')
    if self.max_batch < 1 or self.population < 2 or self.evaluations < 1:
      raise HetjaxError('max_batch, population (>= 2) and evaluations must be positive')
    return self


# ------------------------------------------------------------------ pools
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
    groups.setdefault((d.host, d.gpu, d.region, d.tflops, d.memory_gb), []).append(d.id)
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
  batch: int                           # batch limit chosen
  latency_1: float                     # one request alone (s)
  latency_b: float                     # a full batch (s)
  capacity: float                      # requests/s at the batch limit

  @property
  def feasible(self) -> bool:
    return bool(self.stages)


class Planner:
  """Caches layer costs, stage caps and inner results for one (cluster, model, workload)."""

  def __init__(self, cluster: Cluster, model: ModelConfig, setup: icm.ServeSetup, cfg: HexGenConfig):
    self.cluster, self.model, self.setup, self.cfg = cluster, model, setup.validate(), cfg.validate()
    self.pools = make_pools(cluster)
    self.sizes = np.array([len(p.devices) for p in self.pools])
    self.tps = icm.allowed_tp(model, cfg.max_tp)
    self.batches = [b for b in (2 ** k for k in range(12)) if b <= cfg.max_batch]
    self._inner: dict[tuple, ReplicaChoice] = {}

  # ---- per pool, per batch: layer time and stage cap for each TP degree
  def _pool_options(self, q: int, count: int, b: int) -> list[tuple[int, float, int, int]]:
    """(tp, seconds per layer, layers per stage cap, number of TP groups) for pool q with `count` devices."""
    pool, setup = self.pools[q], dataclasses.replace(self.setup, batch=b)
    d0 = pool.devices[0]
    spec = self.cluster.spec(d0)
    out = []
    for t in self.tps:
      if t > count:
        continue
      if self.cfg.symmetric and self.cfg.tp and t != self.cfg.tp:
        continue
      alpha, beta = icm.group_link(self.cluster, pool.devices[:t])
      lc = icm.layer_cost(self.model, setup, self.cluster.tflops(d0), spec.mem_bw_gbs, t, alpha, beta)
      cap = icm.layers_that_fit(self.model, setup, t, self.cluster.memory_bytes(d0), True, True)
      if cap >= 1:
        out.append((t, lc.prefill + lc.decode, cap, count // t))
    return out

  def _hop(self, p: int, q: int, b: int) -> float:
    """PP cost between the leaders of pools p and q over a whole request (prefill + decode steps)."""
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

  def _dp(self, counts: Sequence[int], b: int) -> tuple[float, list[tuple[int, int, int]]]:
    """Min latency (DP estimate) of a batch of b and its stages [(pool, tp, layers)], or (inf, [])."""
    L = self.model.num_layers
    active = [q for q, c in enumerate(counts) if c > 0]
    costs = {q: self._pool_cost(q, counts[q], b) for q in active}
    diff = np.arange(L + 1)[None, :] - np.arange(L + 1)[:, None]   # [j, j'] = j' - j
    best, best_path = INF, None
    for fi, f in enumerate(active):
      # dp[last][j]: min seconds with j layers placed, last used pool `last`
      dp = {f: costs[f][0].copy()}
      back: dict[int, tuple] = {f: (None, None)}
      for q in active[fi + 1:]:
        c_ext = np.where(diff >= 0, costs[q][0][np.clip(diff, 0, L)], INF)
        cand, cand_arg = np.full(L + 1, INF), None
        for last, row in dp.items():
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
      for last, row in dp.items():
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
             ) -> list[tuple[int, int, int]]:
    """(pool, tp, n layers) -> one (pool, tp, layers) per stage: ceil(n / cap) TP groups, near-equal layers."""
    out = []
    for q, t, n in pool_stages:
      cap = next(c for tt, _, c, _ in self._pool_options(q, counts[q], b) if tt == t)
      out += [(q, t, m) for m in equal_layers(n, math.ceil(n / cap))]
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
      out.append(icm.StageLayout(n, list(self.pools[q].devices[k:k + t])))
      offset[q] = k + t
    return out

  def exact(self, stages: list[tuple[int, int, int]], b: int) -> Optional[dict]:
    try:
      return icm.replica_cost(self.cluster, self.model, self.devices(stages),
                              dataclasses.replace(self.setup, batch=b))
    except HetjaxError:
      return None

  def inner(self, counts: Sequence[int]) -> ReplicaChoice:
    """Best layout and batch limit of a replica with `counts` devices per pool (cached)."""
    key = tuple(int(c) for c in counts)
    if key in self._inner:
      return self._inner[key]
    result = ReplicaChoice(key, [], 0, INF, INF, 0.0)
    budget = self.cfg.slo_margin * self.cfg.deadline
    for b in self.batches:
      if self.cfg.symmetric:
        st = self.symmetric_stages(key)
      else:
        st = self._dp(key, b)[1]
        st = self.expand(st, key, b) if st else []
      cost = self.exact(st, b) if st else None
      if cost is None:
        break                       # larger batches need more memory: stop
      if b == 1:
        result = ReplicaChoice(key, st, 1, cost['latency'], cost['latency'], cost['requests_per_s'])
        if self.cfg.objective == 'latency':
          break
      if cost['latency'] > budget:
        if b == 1:
          result.capacity = 0.0     # even one request alone misses the budget
        break
      if cost['requests_per_s'] > result.capacity:
        result = ReplicaChoice(key, st, b, result.latency_1, cost['latency'], cost['requests_per_s'])
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
  """Mean latency with proportional split and M/D/1 queues over the k fastest replicas, best k."""
  reps = sorted(reps, key=lambda r: r.latency_1)
  best, used = INF, []
  mu = 0.0
  for k, r in enumerate(reps, 1):
    mu += 1 / r.latency_1
    rho = rate / mu
    if rho >= 1:
      continue
    mean = k / mu * (1 + rho / (2 * (1 - rho)))
    if mean < best:
      best, used = mean, reps[:k]
  if not used and reps:   # overloaded even with all replicas: rank by load so the search can improve
    return OVERLOADED * (1 + rate / mu), reps
  return best, used


# ------------------------------------------------------------------ genomes and moves
Genome = tuple[tuple[int, ...], ...]


def canonical(groups) -> Genome:
  return tuple(sorted(tuple(int(c) for c in g) for g in groups if sum(g) > 0))


def idle(genome: Genome, sizes: np.ndarray) -> np.ndarray:
  used = np.sum(genome, axis=0) if genome else np.zeros_like(sizes)
  return sizes - used


def random_genome(sizes: np.ndarray, rng: np.random.Generator) -> Genome:
  """Each pool's devices dealt in random chunks to k random groups."""
  k = int(rng.integers(1, max(2, len(sizes)) + 1))
  groups = np.zeros((k, len(sizes)), dtype=int)
  for q, n in enumerate(sizes):
    left = int(n)
    while left:
      chunk = min(left, int(rng.choice([1, 2, 4, 8])))
      groups[rng.integers(k), q] += chunk
      left -= chunk
  return canonical(groups)


def seeds(pools: list[Pool], sizes: np.ndarray) -> list[Genome]:
  """Hand-made starting points: one group per pool, per host, per region, and all in one."""
  out = [canonical(np.diag(sizes)), canonical([sizes])]
  for key in ('host', 'region'):
    names = sorted({getattr(p, key) for p in pools})
    out.append(canonical([[s if getattr(p, key) == nm else 0 for p, s in zip(pools, sizes)] for nm in names]))
  return out


def mutate(genome: Genome, sizes: np.ndarray, rng: np.random.Generator) -> Genome:
  groups = [list(g) for g in genome]
  free = idle(genome, sizes)
  move = rng.choice(['move', 'merge', 'split']) if len(groups) >= 2 else rng.choice(['move', 'split'])
  if move == 'merge':
    i, j = rng.choice(len(groups), 2, replace=False)
    groups[i] = [a + b for a, b in zip(groups[i], groups[j])]
    groups.pop(j)
  elif move == 'split' and groups:
    i = int(rng.integers(len(groups)))
    g = np.array(groups[i])
    part = rng.binomial(g, 0.5) if rng.random() < 0.5 else g * (rng.random(len(g)) < 0.5)
    groups[i], groups_new = list(g - part), list(part)
    groups.append(groups_new)
  else:   # move a chunk of one pool's GPUs: group -> group, group -> idle, or idle -> group
    chunk = int(rng.choice([1, 2, 4]))
    src = int(rng.integers(-1, len(groups)))   # -1: the idle set
    have = free if src < 0 else np.array(groups[src])
    qs = np.flatnonzero(have > 0)
    if len(qs):
      q = int(rng.choice(qs))
      c = min(chunk, int(have[q]))
      dst = int(rng.integers(-1, len(groups) + 1))    # len(groups): a new group
      if dst == len(groups):
        groups.append([0] * len(sizes))
      if src >= 0:
        groups[src][q] -= c
      if dst >= 0 and dst != src:
        groups[dst][q] += c
      elif dst == src and src >= 0:
        groups[src][q] += c
  return canonical(groups)


def crossover(a: Genome, b: Genome, sizes: np.ndarray, rng: np.random.Generator) -> Genome:
  """Keep a random subset of a's groups, then b's groups clipped to the devices left."""
  keep = [g for g in a if rng.random() < 0.5]
  left = sizes - (np.sum(keep, axis=0) if keep else 0)
  out = list(keep)
  for g in b:
    g2 = np.minimum(g, left)
    left -= g2
    out.append(g2)
  return canonical(out)


# ------------------------------------------------------------------ search and plans
@dataclasses.dataclass
class ServeResult:
  plan: Plan
  fitness: float
  replicas: list[ReplicaChoice]
  seconds: float
  evaluations: int
  history: list[float]


def _to_plan(planner: Planner, reps: list[ReplicaChoice], model_name: str, info: dict) -> Plan:
  w = np.array([r.capacity if planner.cfg.objective == 'rate' else 1 / r.latency_1 for r in reps])
  offset: dict[int, int] = {}
  out = []
  for r, wi in zip(reps, w / w.sum()):
    pos, stages = 0, []
    for st in planner.devices(r.stages, offset):
      stages.append(Stage(pos, pos + st.num_layers, st.devices))
      pos += st.num_layers
    out.append(Replica(stages, weight=float(wi), max_batch=r.batch))
  s = planner.setup
  return Plan(replicas=out, num_layers=planner.model.num_layers, kind='serve', model=model_name,
              cluster=planner.cluster.name, seq_len=s.prompt_len, gen_len=s.gen_len, search=info)


def finish_prediction(plan: Plan, planner: Planner, fitness: float, reps: list[ReplicaChoice]) -> Plan:
  lat = [r.latency_1 for r in reps]
  cap = [r.capacity for r in reps]
  plan.prediction = {'latency_1_min_s': min(lat), 'latency_1_max_s': max(lat),
                     'capacity_rps': float(sum(cap)),
                     'tokens_per_s': float(sum(cap) * planner.setup.gen_len)}
  if planner.cfg.objective == 'latency':
    plan.prediction['mean_latency_s'] = fitness
  return plan


def plan_serving(cluster: Cluster, model: ModelConfig, setup: icm.ServeSetup, cfg: HexGenConfig,
                 seed: int = 0, model_name: str = '') -> ServeResult:
  """Evolutionary search over groupings with the inner DP; symmetric baselines try every TP degree."""
  cfg.validate()
  if cfg.symmetric and not cfg.tp:
    results = []
    for t in icm.allowed_tp(model, cfg.max_tp):
      try:
        results.append(plan_serving(cluster, model, setup, dataclasses.replace(cfg, tp=t), seed, model_name))
      except HetjaxError:
        continue
    if not results:
      raise HetjaxError(f'no symmetric plan of {model_name or "the model"} fits on {cluster.name}')
    best = min(results, key=lambda r: r.fitness)
    best.seconds = sum(r.seconds for r in results)
    best.evaluations = sum(r.evaluations for r in results)
    return best
  t0 = time.perf_counter()
  planner = Planner(cluster, model, setup, cfg)
  sizes = planner.sizes

  def fitness(g):
    return planner.score(g)[0]

  def breed(a, b, rng):
    child = crossover(a, b, sizes, rng) if rng.random() < 0.3 else a
    for _ in range(int(rng.integers(1, 3))):
      child = mutate(child, sizes, rng)
    return child

  evo = EvoConfig(population=cfg.population, evaluations=cfg.evaluations, time_limit=cfg.time_limit)
  res = steady_state(lambda rng: random_genome(sizes, rng), breed, fitness, evo, seed=seed,
                     initial=seeds(planner.pools, sizes))
  fit, reps = planner.score(res.best)
  if not reps or not math.isfinite(fit) or (cfg.objective == 'latency' and fit >= OVERLOADED):
    raise HetjaxError(_why_infeasible(planner))
  info = {'method': 'symmetric' if cfg.symmetric else 'hetjax', 'objective': cfg.objective, 'seed': seed,
          'seconds': time.perf_counter() - t0, 'evaluations': res.evaluations,
          'inner_evaluations': len(planner._inner), 'history': res.history,
          'deadline_s': cfg.deadline, 'rate': cfg.rate, 'tp': cfg.tp}
  plan = _to_plan(planner, reps, model_name, info)
  plan.validate(cluster, model)
  finish_prediction(plan, planner, fit, reps)
  return ServeResult(plan, fit, reps, time.perf_counter() - t0, res.evaluations, res.history)


def _why_infeasible(planner: Planner) -> str:
  whole = planner.inner(tuple(planner.sizes))
  m, c = planner.model, planner.cluster
  weights = m.num_params() * planner.setup.bytes_per_value / 1e9
  usable = sum(c.memory_bytes(i) for i in range(c.n)) * planner.setup.memory_fraction / 1e9
  if planner.cfg.objective == 'rate' and whole.feasible:
    return (f'no replica meets the latency budget: the best single-request latency on all of {c.name} is '
            f'{whole.latency_1:.3g} s, budget {planner.cfg.slo_margin} x deadline {planner.cfg.deadline:.3g} s')
  if planner.cfg.objective == 'latency' and whole.feasible:
    return f'rate {planner.cfg.rate} requests/s overloads every grouping found on {c.name}'
  return (f'no plan fits: the model needs {weights:.1f} GB of weights (+ KV cache and activations) and '
          f'{c.name} has {usable:.1f} GB usable in TP groups of at most {planner.cfg.max_tp} GPUs of one host')


def reference_latency(cluster: Cluster, model: ModelConfig, setup: icm.ServeSetup) -> float:
  """Best single-request latency on a cluster (HexGen's SLO unit): the inner DP over all its devices,
  which may leave pools out, so it is the best over every possible replica."""
  p = Planner(cluster, model, setup, HexGenConfig(objective='latency'))
  r = p.inner(tuple(p.sizes))
  if not r.feasible:
    raise HetjaxError(_why_infeasible(p))
  return r.latency_1


def brute_force(cluster: Cluster, model: ModelConfig, setup: icm.ServeSetup, cfg: HexGenConfig
                ) -> tuple[float, Genome]:
  """Best grouping by enumerating every set partition of the devices (tiny clusters only)."""
  planner = Planner(cluster, model, setup, cfg)
  pool_of = {d: q for q, p in enumerate(planner.pools) for d in p.devices}
  best, best_g = INF, ()
  for part in _set_partitions(list(range(cluster.n))):
    g = canonical([[sum(pool_of[d] == q for d in blk) for q in range(len(planner.pools))] for blk in part])
    f = planner.score(g)[0]
    if f < best:
      best, best_g = f, g
  return best, best_g


def _set_partitions(items):
  if len(items) > 10:
    raise HetjaxError(f'brute force is for tiny clusters (<= 10 devices), got {len(items)}')
  if not items:
    yield []
    return
  first, rest = items[0], items[1:]
  for part in _set_partitions(rest):
    for i in range(len(part)):
      yield part[:i] + [[first] + part[i]] + part[i + 1:]
    yield [[first]] + part


def exhaustive_inner(planner: Planner, counts: Sequence[int], b: int) -> float:
  """Reference for the inner DP: every subset, order-preserving choice of TP degree and layer split
  per pool (tiny models only); same DP cost terms."""
  L = planner.model.num_layers
  active = [q for q, c in enumerate(counts) if c > 0]
  best = INF
  for r in range(1, len(active) + 1):
    for used in itertools.combinations(active, r):
      opts = [planner._pool_cost(q, counts[q], b)[0] for q in used]
      for split in _compositions(L, r):
        t = sum(o[n] for o, n in zip(opts, split))
        t += sum(planner._hop(p, q, b) for p, q in zip(used, used[1:]))
        t += planner._back(used[-1], used[0], b) if used[-1] != used[0] else 0.0
        best = min(best, t)
  return best


def _compositions(n: int, k: int):
  if k == 1:
    yield (n,)
    return
  for first in range(1, n - k + 2):
    for rest in _compositions(n - first, k - 1):
      yield (first,) + rest
