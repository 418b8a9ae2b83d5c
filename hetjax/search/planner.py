"""Training planner: from (cluster, model, workload) to a Plan.

Methods:
  'dtfm'    DT-FM's bi-level search at a fixed shape (D_PP x D_DP, TP 1, equal layers): GA partition
            minimising DT-FM's cost (dp + 2 pp), started from partitions read from the link matrices
            (transversal ones with their bundling of lines searched on that cost), local search by KL
            passes and exact layer matchings, restarts when it stalls.
  'hetjax'  DT-FM's machinery plus: choose TP (devices of one host), D_PP and D_DP; uneven layer counts
            from each group's compute under memory caps; fitness = the full step-time model.
  'hybrid'  DT-FM's hybrid baseline: the same GA with DT-FM's hybrid gain only.
  baselines in baselines.py ('random', 'index', 'strided').

Devices are first grouped into TP units (t devices of one host); partitioning works over units.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from typing import Optional

import numpy as np

from hetjax.cluster import Cluster
from hetjax.costmodel import training as cm
from hetjax.errors import HetjaxError
from hetjax.models.config import ModelConfig
from hetjax.plan import Plan, Replica, Stage
from hetjax.search import baselines
from hetjax.search.layers import assign_layers, equal_layers
from hetjax.search.ordering import order_groups
from hetjax.search.partition import GAConfig, clustered, genetic_partition, groups_of, transversal

METHODS = ('hetjax', 'dtfm', 'hybrid', 'random', 'index', 'strided')
INFEASIBLE = 1e6  # fitness offset for plans that do not fit in memory
SEARCH_EXACT_TSP = 10  # inside the GA loop Held-Karp runs up to 10 groups (heuristic beyond); final plans: 16


@dataclasses.dataclass(frozen=True)
class SearchConfig:
  method: str = 'hetjax'
  d_pp: int = 0                 # pipeline stages; 0 = search (hetjax) or 8 capped by devices/layers
  tp: int = 0                   # 0 = search over 1, 2, 4, 8 (hetjax) or 1 (others)
  population: int = 100
  evaluations: int = 5000       # distinct candidates per GA run (DT-FM: 5000); hetjax: per finalist / finalists
  screen_evaluations: int = 100  # per shape when hetjax screens shapes
  finalists: int = 2
  crossover_points: int = 5
  uneven_layers: bool = True
  time_limit: Optional[float] = None  # seconds per GA run
  restart_after: int = 300      # candidates without improvement before the GA restarts half its population
  stop_after: int = 1000        # candidates without improvement before the GA stops (0: run all evaluations)
  progress_s: float = 5.0       # progress line this often during long searches (0: never)
  seeds: bool = True            # dtfm: start from partitions read from the link matrices
  seed_variants: int = 4        # dtfm: independent draws of those seeds (the clusterings are randomised)
  bundle_evaluations: int = 600  # dtfm: true-cost evaluations per search of a seed's bundling of lines


# ------------------------------------------------------------------ TP units
@dataclasses.dataclass
class Units:
  """Devices grouped into TP units on one host; unit leader = devices[0]. tp: the units' TP degree,
  0 when it differs between units (per-stage TP: a stage's units then share one degree)."""
  tp: int
  devices: list[list[int]]

  @property
  def leaders(self) -> list[int]:
    return [u[0] for u in self.devices]

  @property
  def sizes(self) -> np.ndarray:
    return np.array([len(u) for u in self.devices])


def make_units_by_kind(cluster: Cluster, tp_by_kind: dict) -> Optional[Units]:
  """TP units of tp_by_kind[gpu] devices on each host; None if a host mixes GPU kinds or its device
  count is not a multiple of its degree."""
  units = []
  for ids in cluster.hosts().values():
    kinds = {cluster.devices[i].gpu for i in ids}
    if len(kinds) != 1:
      return None
    t = tp_by_kind[kinds.pop()]
    if len(ids) % t:
      return None
    units += [ids[i:i + t] for i in range(0, len(ids), t)]
  units.sort(key=lambda u: u[0])
  degrees = {len(u) for u in units}
  return Units(degrees.pop() if len(degrees) == 1 else 0, units)


def make_units(cluster: Cluster, tp: int) -> Optional[Units]:
  """None if some host's device count is not a multiple of tp."""
  units = []
  for ids in cluster.hosts().values():
    if len(ids) % tp:
      return None
    units += [ids[i:i + tp] for i in range(0, len(ids), tp)]
  units.sort(key=lambda u: u[0])
  return Units(tp, units)


def shapes(cluster: Cluster, model: ModelConfig, setup: cm.TrainSetup, search: SearchConfig):
  """Candidate (tp, d_pp, d_dp) using every device."""
  tps = [search.tp] if search.tp else [1, 2, 4, 8]
  out = []
  for t in tps:
    if model.num_heads % t or model.num_kv_heads % t or model.ffn % t or make_units(cluster, t) is None:
      continue
    u = cluster.n // t
    for d_pp in range(1, min(u, model.num_layers) + 1):
      if u % d_pp or (search.d_pp and d_pp != search.d_pp):
        continue
      d_dp = u // d_pp
      if setup.global_batch % (d_dp * setup.micro_batch_size):
        continue
      out.append((t, d_pp, d_dp))
  return out


def default_shape(cluster: Cluster, model: ModelConfig, search: SearchConfig) -> tuple[int, int, int]:
  """Fixed shape for DT-FM and baselines: TP 1, D_PP = search.d_pp or the largest of 8, 4, 2, 1 that fits."""
  n = cluster.n
  for d_pp in ([search.d_pp] if search.d_pp else [8, 4, 2, 1]):
    if d_pp <= min(n, model.num_layers) and n % d_pp == 0:
      return 1, d_pp, n // d_pp
  raise HetjaxError(f'cannot split {n} devices into {search.d_pp} stages '
                    f'(needs a divisor of {n} that is <= {model.num_layers} layers)')


# ------------------------------------------------------------------ evaluating a partition
def kl_weights(dp_pair: np.ndarray, pp_pair: np.ndarray, extra: float | np.ndarray = 0.0) -> list[np.ndarray]:
  """The two KL gain functions (within-group pair weights to minimise), used alternately:
  a DP gain (fast links inside groups: DT-FM's data-parallel pair cost) and a PP gain (fast links
  between groups, so bottleneck matchings are cheap: minus the pipeline pair cost)."""
  out = []
  for w in (dp_pair, pp_pair.max() - pp_pair):
    w = w + extra
    np.fill_diagonal(w, 0.0)
    out.append(w)
  return out


class Evaluator:
  """Scores partitions of units into d_pp groups of d_dp units for one shape."""

  def __init__(self, cluster: Cluster, model: ModelConfig, setup: cm.TrainSetup, units: Units,
               d_pp: int, d_dp: int, uneven: bool = True):
    self.cluster, self.model, self.setup, self.units = cluster, model, setup, units
    self.d_pp, self.d_dp, self.tp = d_pp, d_dp, units.tp
    self.t = units.sizes                                              # TP degree of each unit
    self.m = setup.micro_batches(d_dp)
    lead = units.leaders
    self.mb_bytes = cm.boundary_bytes(model, setup)
    self.link = cluster.transfer_time(self.mb_bytes)[np.ix_(lead, lead)]   # per micro-batch, unit to unit
    t = self.t
    rate = np.array([min(cluster.tflops(d) for d in u) for u in units.devices]) * 1e12 * setup.efficiency
    per_layer_fwd = cm.stage_fwd_flops(model, setup, 1, False) / t
    bwd_factor = 3.0 if setup.recompute else 2.0
    tp_layer = np.array([cm.tp_time_per_layer(cluster, u, model, setup) for u in units.devices])
    # Calibrated clusters also measure the runtime's host time: per op, and the epilogue per layer
    # (spread here over the step's micro-batches).
    update = np.array([max(cluster.update_s_per_layer(d) for d in u) for u in units.devices])
    self.op_overhead = np.array([max(cluster.op_overhead_s(d) for d in u) for u in units.devices])
    self.layer_time = per_layer_fwd * (1 + bwd_factor) / rate + tp_layer + update / self.m  # per micro-batch
    self.head_time = cm.head_flops_per_token(model) * setup.micro_batch_size * setup.seq_len / t \
        * (1 + bwd_factor) / rate
    self.mem = np.array([min(cluster.memory_bytes(d) for d in u) for u in units.devices]) * setup.memory_fraction
    self.uneven = uneven
    self.cache: dict = {}
    lay = model.num_layers / d_pp
    self.alpha = cluster.delay_ms[np.ix_(lead, lead)] / 1e3           # seconds, 0 on the diagonal
    self.inv_bw = 8.0 / (cluster.bandwidth_gbps[np.ix_(lead, lead)] * 1e9)  # seconds per byte
    c_dp = lay * model.block_params() * setup.grad_bytes / t[:, None]   # each TP rank syncs its shard
    self.dp_pair = 2.0 * (self.alpha + c_dp / d_dp * self.inv_bw)
    c_pp = self.mb_bytes * self.m
    pp_pair = cluster.transfer_time(c_pp)[np.ix_(lead, lead)]
    step = self.m * lay * self.layer_time
    mismatch = np.abs(step[:, None] - step[None, :]) * 2.0 / d_dp   # a group runs at its slowest unit
    self.pair_weight = kl_weights(self.dp_pair, pp_pair, mismatch)

  def caps(self, group: list[int], stage: int) -> int:
    """Most layers the group's units can hold at this pipeline position."""
    st, model, t = self.setup, self.model, int(self.t[group[0]])
    per_layer = model.block_params() / t * st.state_bytes_per_param + \
        cm.in_flight('1f1b' if st.schedule == '1f1b' else 'gpipe', stage, self.d_pp, self.m) * \
        cm.activation_bytes_per_layer(model, st, t)
    fixed = cm.stage_params(model, 0, stage == 0, stage == self.d_pp - 1) / t * st.state_bytes_per_param
    if stage == self.d_pp - 1:
      fixed += st.micro_batch_size * st.seq_len * model.vocab_size * 6 / t
    free = self.mem[group].min() - fixed
    return int(max(0, free // per_layer))

  def layout(self, groups: list[list[int]], exact_max: int = SEARCH_EXACT_TSP):
    """Order groups into a pipeline and split the layers; returns a dict of the pieces."""
    _, path, replicas = order_groups(self.link, groups, self.cache, exact_max)
    ordered = [groups[g] for g in path]
    per_layer = [float(self.layer_time[g].max()) for g in ordered]
    extra = [2 * float(self.op_overhead[g].max()) for g in ordered]  # a forward and a backward op
    extra[-1] += float(self.head_time[ordered[-1]].max())
    caps = [self.caps(g, s) for s, g in enumerate(ordered)]
    deficit = 0
    try:
      if self.uneven:
        n = assign_layers(self.model.num_layers, per_layer, extra, caps)
      else:
        n = equal_layers(self.model.num_layers, self.d_pp)
        deficit = sum(max(0, a - c) for a, c in zip(n, caps))
    except HetjaxError:
      n = equal_layers(self.model.num_layers, self.d_pp)
      deficit = sum(max(0, a - c) for a, c in zip(n, caps))
    return {'path': path, 'ordered': ordered, 'replicas': replicas, 'layers': n, 'per_layer': per_layer,
            'extra': extra, 'deficit': deficit}

  def step_time(self, groups: list[list[int]]) -> float:
    """Approximate step time (closed-form pipeline + DT-FM DP sync) plus a penalty if memory overflows."""
    lay = self.layout(groups)
    n, ordered = lay['layers'], lay['ordered']
    fwd_bwd = [k * t + e for k, t, e in zip(n, lay['per_layer'], lay['extra'])]
    fwd = [x / 3 for x in fwd_bwd]
    bwd = [x * 2 / 3 for x in fwd_bwd]
    send = []
    for s in range(self.d_pp - 1):
      a = [u[s] for u in lay['replicas']]
      b = [u[s + 1] for u in lay['replicas']]
      send.append(float(self.link[a, b].max()))
    zeros = [0.0] * len(send)
    pipe = cm.pipeline_time_approx(fwd, bwd, send, send, zeros, self.m, self.setup.schedule)
    dp = 0.0
    if self.d_dp > 1:  # DT-FM's DP cost per group: max row of sum 2 * (alpha + c_dp / (D_DP beta))
      for s, g in enumerate(ordered):
        c_dp = cm.stage_params(self.model, n[s], s == 0, s == self.d_pp - 1) * self.setup.grad_bytes / self.t[g[0]]
        ix = np.ix_(g, g)
        rows = 2.0 * (self.alpha[ix].sum(axis=1) + c_dp / self.d_dp * self.inv_bw[ix].sum(axis=1))
        dp = max(dp, float(rows.max()))
    return pipe + dp + (INFEASIBLE * (1 + lay['deficit']) if lay['deficit'] else 0.0)

  def dtfm_cost(self, groups: list[list[int]], c_pp: float, c_dp: float) -> dict:
    lead = self.units.leaders
    return cm.dtfm_cost(self.cluster, [[lead[u] for u in g] for g in groups], c_pp, c_dp)

  def to_plan(self, groups: list[list[int]], layers: Optional[list[int]] = None, replicas=None,
              method: str = '') -> Plan:
    """Turn unit groups into a Plan (pipeline order, matchings, layer split)."""
    lay = self.layout(groups, exact_max=16)
    n = layers if layers is not None else lay['layers']
    reps = replicas if replicas is not None else lay['replicas']
    bounds = np.concatenate([[0], np.cumsum(n)]).astype(int)
    out = []
    for units_of_replica in reps:
      stages = [Stage(int(bounds[s]), int(bounds[s + 1]), list(self.units.devices[u]))
                for s, u in enumerate(units_of_replica)]
      out.append(Replica(stages))
    return Plan(replicas=out, num_layers=self.model.num_layers, kind='train', model='',
                cluster=self.cluster.name, schedule=self.setup.schedule, micro_batches=self.m,
                micro_batch_size=self.setup.micro_batch_size, seq_len=self.setup.seq_len,
                activation_bits=self.setup.activation_bits, search={'method': method})


# ------------------------------------------------------------------ finishing a plan
def finish(plan: Plan, cluster: Cluster, model: ModelConfig, setup: cm.TrainSetup, info: dict,
           model_name: str = '') -> Plan:
    """Attach the exact step-time prediction, the memory verdict and the search record."""
    plan.model = model_name
    plan.validate(cluster, model)
    plan.prediction = cm.estimate(plan, cluster, model, setup, exact=True)
    try:
      cm.check_memory(plan, cluster, model, setup)
      plan.prediction['memory_ok'] = 1.0
    except HetjaxError as e:
      plan.prediction['memory_ok'] = 0.0
      info['memory_error'] = str(e)
    if plan.dp >= 1 and all(s.tp == 1 for r in plan.replicas for s in r.stages):
      c_pp, c_dp = cm.dtfm_workload(model, setup, plan.num_stages, plan.dp)
      plan.prediction['dtfm_cost'] = cm.plan_link_cost(cluster, plan, c_pp, c_dp)['total']  # as it runs
    plan.search = {**plan.search, **info}
    return plan


def _ga_config(search: SearchConfig, evaluations: int, population: int) -> GAConfig:
  return GAConfig(population=population, evaluations=evaluations, crossover_points=search.crossover_points,
                  time_limit=search.time_limit, restart_after=search.restart_after,
                  stop_after=search.stop_after, progress_s=search.progress_s)


def dtfm_seeds(cluster: Cluster, pair: list[np.ndarray], c_pp: float, d_pp: int, d_dp: int,
               rng: np.random.Generator, fitness=None, bundle_evaluations: int = 600) -> list[np.ndarray]:
  """Starting partitions that read the structure from the link matrices, whatever the device
  numbering: groups over fast DP links (clustered by each gain), and groups that cut across
  pipelines, or pipeline segments of every length that divides d_pp, laid over fast PP links
  (transversal; with `fitness`, their bundling of lines is searched on it)."""
  seeds = [clustered(w, [d_dp] * d_pp, rng) for w in pair]
  pp_link = cluster.transfer_time(c_pp)
  np.fill_diagonal(pp_link, 0.0)
  if d_dp > 1:
    seeds += [transversal(pp_link, pair[0], d_pp, line, rng, fitness=fitness, evaluations=bundle_evaluations)
              for line in range(2, d_pp + 1) if d_pp % line == 0]
  return seeds


def plan_dtfm(cluster: Cluster, model: ModelConfig, setup: cm.TrainSetup, search: SearchConfig,
              seed: int = 0, gain: str = 'dtfm', model_name: str = '') -> Plan:
  """DT-FM's bi-level search at a fixed shape, minimising DT-FM's cost (dp + 2 pp).

  gain 'dtfm': hetjax's search: seeds read from the link matrices, local search by KL passes and
  exact layer moves under two gains (DP pair cost; fast links between groups), restarts on stalls.
  gain 'hybrid': DT-FM's hybrid baseline: the same GA with only DT-FM's hybrid gain (within-group
  sum of pp - dp link cost), random start, no seeds or restarts.
  """
  t0 = time.perf_counter()
  tp, d_pp, d_dp = default_shape(cluster, model, search)
  ev = Evaluator(cluster, model, setup, make_units(cluster, 1), d_pp, d_dp, uneven=False)
  c_pp, c_dp = cm.dtfm_workload(model, setup, d_pp, d_dp)
  objective = cm.DtfmObjective(cluster, c_pp, c_dp, d_dp)
  fit = lambda a: objective(groups_of(a, d_pp))
  cfg = _ga_config(search, search.evaluations, search.population)
  if gain == 'hybrid':
    pair = cluster.transfer_time(c_dp) - cluster.transfer_time(c_pp)
    np.fill_diagonal(pair, 0.0)
    cfg = dataclasses.replace(cfg, matching=False, restart_after=0, label='hybrid search')
    seeds = []
  else:
    pair = kl_weights(cm.dp_pair_cost(cluster, c_dp, d_dp), cluster.transfer_time(c_pp))
    cfg = dataclasses.replace(cfg, label='dtfm search', kl_steps=min(16, max(1, cluster.n // 2)))
    rng = np.random.default_rng(seed + 7919)
    seeds = [a for _ in range(search.seed_variants if search.seeds else 0)
             for a in dtfm_seeds(cluster, pair, c_pp, d_pp, d_dp, rng, lambda a: objective.ranked(groups_of(a, d_pp)),
                                 search.bundle_evaluations)]
  res = genetic_partition([d_dp] * d_pp, fit, cfg, seed, pair, initial=seeds)
  groups = groups_of(res.assign, d_pp)
  d = cm.dtfm_cost(cluster, groups, c_pp, c_dp, ev.cache)
  plan = ev.to_plan(groups, equal_layers(model.num_layers, d_pp), d['replicas'])
  info = {'method': 'hybrid' if gain == 'hybrid' else 'dtfm', 'seed': seed, 'shape': [tp, d_pp, d_dp],
          'objective': 'dtfm_cost', 'best': res.cost, 'history': res.history, 'evaluations': res.evaluations,
          'restarts': res.restarts, 'seconds': time.perf_counter() - t0}
  return finish(plan, cluster, model, setup, info, model_name)


def mixed_tp_candidates(cluster: Cluster, model: ModelConfig, setup: cm.TrainSetup, search: SearchConfig,
                        rng: np.random.Generator) -> list[tuple[float, 'Evaluator', list[list[int]]]]:
  """Per-stage TP: one TP degree per GPU kind (at least two degrees in the plan), stages formed
  inside a kind so that every replica of a stage shares its degree. For each (degrees, d_dp), the
  units of each kind are clustered over fast DP links into its stages; returns (approximate step
  time, evaluator, unit groups) per candidate. Constructive, not a GA search."""
  kinds = sorted({d.gpu for d in cluster.devices})
  if len(kinds) < 2 or search.tp:
    return []
  degrees = [t for t in (1, 2, 4, 8) if not (model.num_heads % t or model.num_kv_heads % t or model.ffn % t)]
  out = []
  for combo in itertools.product(degrees, repeat=len(kinds)):
    units = make_units_by_kind(cluster, dict(zip(kinds, combo))) if len(set(combo)) > 1 else None
    if units is None:
      continue
    kind_of = [cluster.devices[u[0]].gpu for u in units.devices]
    counts = [kind_of.count(k) for k in kinds]
    for d_dp in range(1, min(counts) + 1):
      d_pp = len(units.devices) // d_dp
      if any(c % d_dp for c in counts) or d_pp > model.num_layers or (search.d_pp and d_pp != search.d_pp) \
          or setup.global_batch % (d_dp * setup.micro_batch_size):
        continue
      ev = Evaluator(cluster, model, setup, units, d_pp, d_dp, search.uneven_layers)
      groups = []
      for k in kinds:
        ids = np.array([u for u in range(len(units.devices)) if kind_of[u] == k])
        if len(ids) == d_dp:
          groups.append(ids.tolist())
          continue
        a = clustered(ev.pair_weight[0][np.ix_(ids, ids)], [d_dp] * (len(ids) // d_dp), rng)
        groups += [ids[g].tolist() for g in groups_of(a, len(ids) // d_dp)]
      out.append((ev.step_time(groups), ev, groups))
  return out


def plan_hetjax(cluster: Cluster, model: ModelConfig, setup: cm.TrainSetup, search: SearchConfig,
                seed: int = 0, model_name: str = '') -> Plan:
  """Screen every shape with a short GA, run the full GA on the best `finalists`, keep the best."""
  t0 = time.perf_counter()
  cands = shapes(cluster, model, setup, search)
  if not cands:
    raise HetjaxError(f'no (tp, d_pp, d_dp) fits {cluster.n} devices, {model.num_layers} layers and '
                      f'global_batch={setup.global_batch} with micro_batch_size={setup.micro_batch_size}')
  screened = []
  for k, (t, d_pp, d_dp) in enumerate(cands):
    ev = Evaluator(cluster, model, setup, make_units(cluster, t), d_pp, d_dp, search.uneven_layers)
    fit = lambda a, ev=ev, d_pp=d_pp: ev.step_time(groups_of(a, d_pp))
    pop = min(search.population, 20)
    index_order = np.repeat(np.arange(d_pp), d_dp)  # Megatron's order is always a candidate
    res = genetic_partition([d_dp] * d_pp, fit, _ga_config(search, search.screen_evaluations, pop),
                            seed + k, ev.pair_weight, initial=[index_order])
    screened.append((res.cost, k, ev, res))
  screened.sort(key=lambda x: x[0])
  finals = []
  for cost, k, ev, res in screened[:search.finalists]:
    index_order = np.repeat(np.arange(ev.d_pp), ev.d_dp)  # Megatron's order as one starting point
    full = genetic_partition([ev.d_dp] * ev.d_pp, lambda a, ev=ev: ev.step_time(groups_of(a, ev.d_pp)),
                             _ga_config(search, max(1, search.evaluations // search.finalists), search.population), seed + 1000 + k,
                             ev.pair_weight, initial=[res.assign, index_order])
    finals.append((ev, full))
  mixed = sorted(mixed_tp_candidates(cluster, model, setup, search, np.random.default_rng(seed + 31)),
                 key=lambda x: x[0])[:search.finalists]
  if min(f.cost for _, f in finals) >= INFEASIBLE and all(c >= INFEASIBLE for c, _, _ in mixed):
    ev, full = min(finals, key=lambda x: x[1].cost)
    ev.uneven = False
    try:
      cm.check_memory(ev.to_plan(groups_of(full.assign, ev.d_pp)), cluster, model, setup)
      detail = 'the layer split overflows a stage'
    except HetjaxError as e:
      detail = str(e)
    raise HetjaxError(f'no memory-feasible plan for {model_name or "the model"} on {cluster.name} (best shape '
                      f'tp={ev.tp} d_pp={ev.d_pp} d_dp={ev.d_dp}): {detail}; try recompute=True, a smaller '
                      f'micro-batch or more devices')
  # The GA ranks with a closed-form pipeline; pick the final plan by the exact simulation among the
  # finalists' best partitions and the best per-stage-TP candidates, each with uneven and equal layers.
  best = None
  options = [(ev, groups_of(full.assign, ev.d_pp), full, full.cost) for ev, full in finals]
  options += [(ev, groups, None, c) for c, ev, groups in mixed]
  for ev, groups, full, approx in options:
    for uneven in ([True, False] if search.uneven_layers else [False]):
      ev.uneven = uneven
      cand = ev.to_plan(groups)
      if ev.layout(groups)['deficit']:
        continue
      t = cm.estimate(cand, cluster, model, setup, exact=True)['total']
      if best is None or t < best[0]:
        best = (t, cand, ev, full, approx)
  _, plan, ev, full, approx = best
  info = {'method': 'hetjax', 'seed': seed, 'shape': [ev.tp, ev.d_pp, ev.d_dp], 'objective': 'step_time_approx',
          'stage_tp': [s.tp or len(s.devices) for s in plan.replicas[0].stages],
          'best': approx,
          'history': full.history if full else [],
          'evaluations': sum(f.evaluations for _, f in finals) + sum(r.evaluations for _, _, _, r in screened),
          'screened': [{'shape': [e.tp, e.d_pp, e.d_dp], 'approx_step': c} for c, _, e, _ in screened],
          'mixed_tp': [{'stage_tp': sorted({len(ev.units.devices[g[0]]) for g in grp}), 'd_pp': ev.d_pp,
                        'd_dp': ev.d_dp, 'approx_step': c} for c, ev, grp in mixed],
          'seconds': time.perf_counter() - t0}
  return finish(plan, cluster, model, setup, info, model_name)


def plan_training(cluster: Cluster, model: ModelConfig, setup: cm.TrainSetup,
                  search: SearchConfig = SearchConfig(), seed: int = 0, model_name: str = '') -> Plan:
  """Entry point: dispatch on search.method."""
  if search.method == 'hetjax':
    return plan_hetjax(cluster, model, setup, search, seed, model_name)
  if search.method in ('dtfm', 'hybrid'):
    return plan_dtfm(cluster, model, setup, search, seed, search.method, model_name)
  if search.method in ('random', 'index', 'strided'):
    t0 = time.perf_counter()
    _, d_pp, d_dp = default_shape(cluster, model, search)
    if search.method == 'random':
      plan = baselines.random_plan(cluster, model, setup, d_pp, d_dp, seed)
    else:
      plan = getattr(baselines, f'{search.method}_plan')(cluster, model, setup, d_pp, d_dp)
    info = {'method': search.method, 'shape': [1, d_pp, d_dp], 'seconds': time.perf_counter() - t0}
    if search.method == 'random':
      info['seed'] = seed
    return finish(plan, cluster, model, setup, info, model_name)
  raise HetjaxError(f'unknown search method {search.method!r}; choose one of {METHODS}')
