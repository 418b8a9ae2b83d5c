"""HexGen-style serving planner: group GPUs into independent replicas, give each replica asymmetric
pipeline stages (own devices, TP degree and layer count), pick a batch limit and a traffic share.

The pieces: hexgen_inner (pools, the inner DP over one replica's layout, objectives), hexgen_genome
(groupings and their moves), hexgen_plan (the chosen replicas as a serve Plan), and here the outer
step: DT-FM/HexGen evolutionary search (search/evolutionary.steady_state) over groupings, each scored
by the inner step. Test oracles (brute force, exhaustive inner enumeration) are in hexgen_reference.
"""

from __future__ import annotations

import dataclasses
import math
import time

from hetjax.cluster import Cluster
from hetjax.costmodel import inference as icm
from hetjax.errors import HetjaxError
from hetjax.models.config import ModelConfig
from hetjax.plan import Plan
from hetjax.search.evolutionary import EvoConfig, steady_state
from hetjax.search.hexgen_genome import crossover, mutate, random_genome, seeds
from hetjax.search.hexgen_inner import (  # noqa: F401  (the planner's public names, re-exported)
    OBJECTIVES, OVERLOADED, HexGenConfig, Planner, ReplicaChoice)
from hetjax.search.hexgen_plan import finish_prediction, to_plan


@dataclasses.dataclass
class ServeResult:
  plan: Plan
  fitness: float
  replicas: list[ReplicaChoice]
  seconds: float
  evaluations: int
  history: list[float]


def plan_serving(cluster: Cluster, model: ModelConfig, setup: icm.ServeSetup, cfg: HexGenConfig,
                 seed: int = 0, model_name: str = '', overhead=None) -> ServeResult:
  """Evolutionary search over groupings with the inner DP; symmetric baselines try every TP degree.
  overhead(devices, layers): a stage's host seconds per op (default: the cluster's measured
  op_overhead_s per device, else setup.op_overhead_s; Planner's doc)."""
  cfg.validate()
  if cfg.symmetric and not cfg.tp:
    results = []
    for t in icm.allowed_tp(model, cfg.max_tp):
      try:
        results.append(plan_serving(cluster, model, setup, dataclasses.replace(cfg, tp=t), seed, model_name,
                                    overhead))
      except HetjaxError:
        continue
    if not results:
      raise HetjaxError(f'no symmetric plan of {model_name or "the model"} fits on {cluster.name}')
    best = min(results, key=lambda r: r.fitness)
    best.seconds = sum(r.seconds for r in results)
    best.evaluations = sum(r.evaluations for r in results)
    return best
  t0 = time.perf_counter()
  planner = Planner(cluster, model, setup, cfg, overhead)
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
  plan = to_plan(planner, reps, model_name, info)
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


def reference_latency(cluster: Cluster, model: ModelConfig, setup: icm.ServeSetup, overhead=None) -> float:
  """Best single-request latency on a cluster (HexGen's SLO unit): the inner DP over all its devices,
  which may leave pools out, so it is the best over every possible replica."""
  p = Planner(cluster, model, setup, HexGenConfig(objective='latency'), overhead)
  r = p.inner(tuple(p.sizes))
  if not r.feasible:
    raise HetjaxError(_why_infeasible(p))
  return r.latency_1
