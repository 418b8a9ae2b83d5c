"""Training plans with heterogeneous data-parallel replicas: their step time, and a constructor.

Replicas may split layers differently, use other TP degrees and device counts, and take unequal
shares of the batch (`Replica.weight`, in micro-batches). The runtime is hetjax/parallel/replicas.py.

Step time = the slowest replica's pipeline time for its own M_r micro-batches (cm.estimate of the
replica alone) + the per-layer gradient all-reduce over the replicas holding each layer:
- layers held by the same stages are synced together (one group: a block is a layer, the embedding
  and the head are one unit each; a tied table is synced once, with the embedding);
- a group of replicas with TP degrees t_r syncs in k = min t_r shards in parallel, shard i over
  one device of each replica, each costing DT-FM's sharded-PS time (cm.dtfm_dp_cost) for its bytes;
- a device in several groups syncs them one after another; devices work in parallel, so the
  all-reduce takes the most any device spends.
For identical replicas of an untied model this equals cm.estimate (a test checks it).

The constructor (`construct`) forms replicas from islands of the cluster (regions, hosts or GPU
kinds): each
island can be unused, or be one or more replicas of TP-t units on its hosts, layers split by compute
(search.layers.assign_layers) within memory; micro-batches go to replicas by water-filling on their
pipeline times; a coordinate descent over the islands' options keeps the best plan.
"""

from __future__ import annotations

import dataclasses
import heapq
from typing import Optional, Sequence

import numpy as np

from hetjax.cluster import Cluster
from hetjax.costmodel import training as cm
from hetjax.errors import HetjaxError
from hetjax.models.config import ModelConfig
from hetjax.plan import Plan, Replica, Stage
from hetjax.search.layers import assign_layers


# ------------------------------------------------------------------ step time
def _units(model: ModelConfig, st: Stage) -> list[tuple]:
  """(unit, parameters) a stage holds: ('embed',), ('block', i), ('head',)."""
  out = [(('embed',), model.embed_params())] if st.embed else []
  out += [(('block', i), model.block_params()) for i in range(st.start, st.end)]
  if st.head:
    out.append((('head',), model.head_params()))
  return out


def allreduce_time(plan: Plan, cluster: Cluster, model: ModelConfig, setup: cm.TrainSetup) -> float:
  """Seconds of the per-layer cross-replica gradient all-reduce (see the module doc)."""
  if plan.dp == 1:
    return 0.0
  holders: dict = {}  # unit -> the (replica, stage) pairs that hold it
  size: dict = {}
  for r, rep in enumerate(plan.replicas):
    for k, st in enumerate(rep.stages):
      for unit, n in _units(model, st):
        holders.setdefault(unit, []).append((r, k))
        size[unit] = n
  groups: dict = {}  # the same holders sync their units together
  for unit, where in holders.items():
    groups[tuple(where)] = groups.get(tuple(where), 0) + size[unit]
  busy = np.zeros(cluster.n)
  for where, n in groups.items():
    stages = [plan.replicas[r].stages[k] for r, k in where]
    shards = min(st.tp for st in stages)
    for i in range(shards):
      devs = [st.devices[i * st.tp // shards] for st in stages]
      t = cm.dtfm_dp_cost(cluster, [devs], n * setup.grad_bytes / shards)
      busy[devs] += t
  return float(busy.max())


def replica_plan(plan: Plan, r: int, micro_batches: int) -> Plan:
  return dataclasses.replace(plan, replicas=[dataclasses.replace(plan.replicas[r], weight=1.0)],
                             micro_batches=micro_batches, prediction={}, search={})


def estimate(plan: Plan, cluster: Cluster, model: ModelConfig, setup: cm.TrainSetup,
             exact: bool = True) -> dict:
  """Predicted step (seconds): the slowest replica's pipeline row of cm.estimate for its share, with
  dp_comm = the per-layer all-reduce and the slowest tied-table exchange; plus 'replica_pipeline'
  (each replica's pipeline seconds)."""
  micro = plan.replica_micro_batches()
  rows = [cm.estimate(replica_plan(plan, r, m), cluster, model, setup, exact)
          for r, m in enumerate(micro)]
  slowest = dict(max(rows, key=lambda x: x['pipeline']))
  slowest['dp_comm'] = allreduce_time(plan, cluster, model, setup)
  slowest['tied_comm'] = max(x['tied_comm'] for x in rows)
  slowest['update'] = cm.update_time(plan, cluster)
  slowest['total'] = slowest['pipeline'] + slowest['dp_comm'] + slowest['tied_comm'] + slowest['update']
  slowest['tokens_per_s'] = setup.global_batch * setup.seq_len / slowest['total']
  slowest['replica_pipeline'] = [x['pipeline'] for x in rows]
  return slowest


def check_memory(plan: Plan, cluster: Cluster, model: ModelConfig, setup: cm.TrainSetup) -> None:
  """cm.check_memory for each replica with its own micro-batch count."""
  for r, m in enumerate(plan.replica_micro_batches()):
    cm.check_memory(replica_plan(plan, r, m), cluster, model, setup)


# ------------------------------------------------------------------ construction
def replica_options(cluster: Cluster, model: ModelConfig, setup: cm.TrainSetup,
                    island: Sequence[int]) -> list[list[Replica]]:
  """Ways to run one island's devices: for each TP degree t (dividing every host's count there) and
  each q dividing its number of TP units, q replicas of consecutive units, one stage per unit, layers
  split by compute within memory. Options that fit no layer split are left out."""
  by_host: dict = {}
  for d in island:
    by_host.setdefault(cluster.devices[d].host, []).append(d)
  options = []
  for t in (1, 2, 4, 8):
    if model.num_heads % t or model.num_kv_heads % t or model.ffn % t:
      continue
    if any(len(h) % t for h in by_host.values()):
      continue
    units = [h[i:i + t] for h in by_host.values() for i in range(0, len(h), t)]
    for q in range(1, len(units) + 1):
      if len(units) % q or len(units) // q > model.num_layers:
        continue
      size = len(units) // q
      reps = [_replica(cluster, model, setup, units[j * size:(j + 1) * size]) for j in range(q)]
      if all(r is not None for r in reps):
        options.append(reps)
  return options


def _replica(cluster, model, setup, units) -> Optional[Replica]:
  """One replica over `units` (one stage each), layers split to balance compute within memory
  (cm.memory_report's terms, with 1F1B's in-flight micro-batches)."""
  s = len(units)
  rate = [min(cluster.tflops(d) for d in u) * len(u) for u in units]
  per_layer = [cm.stage_fwd_flops(model, setup, 1, False) / r for r in rate]
  extra = [0.0] * (s - 1) + [cm.stage_fwd_flops(model, setup, 0, True) / rate[-1]]
  caps = []
  for k, u in enumerate(units):
    t, head = len(u), k == s - 1
    room = min(cluster.memory_bytes(d) for d in u) * setup.memory_fraction
    room -= cm.stage_params(model, 0, k == 0, head) / t * setup.state_bytes_per_param
    room -= setup.micro_batch_size * setup.seq_len * model.vocab_size * 6 / t if head else 0.0
    per = (model.block_params() / t * setup.state_bytes_per_param
           + cm.in_flight(setup.schedule, k, s, s) * cm.activation_bytes_per_layer(model, setup, t))
    caps.append(int(max(0.0, room) // per))
  try:
    counts = assign_layers(model.num_layers, per_layer, extra, caps)
  except HetjaxError:
    return None
  bounds = np.concatenate([[0], np.cumsum(counts)])
  return Replica([Stage(int(a), int(b), list(u)) for a, b, u in zip(bounds[:-1], bounds[1:], units)])


def split_micro_batches(replicas: list[Replica], total: int, time_of) -> Optional[list[int]]:
  """M_r >= 1 with sum M_r = total minimising max_r time_of(r, M_r) (water-filling; times rise
  with M). None if there are more replicas than micro-batches."""
  if len(replicas) > total:
    return None
  m = [1] * len(replicas)
  heap = [(time_of(r, 2), r) for r in range(len(replicas))]
  heapq.heapify(heap)
  for _ in range(total - len(replicas)):
    _, r = heapq.heappop(heap)
    m[r] += 1
    heapq.heappush(heap, (time_of(r, m[r] + 1), r))
  return m


def make_plan(replicas: list[Replica], cluster: Cluster, model: ModelConfig,
              setup: cm.TrainSetup, time_of=None) -> Optional[Plan]:
  """A plan over `replicas` with the micro-batches split by their pipeline times (time_of(replica,
  m), default: cm.estimate's closed form); None when the batch does not split (the plan format
  needs the batch's micro-batch count divisible by dp)."""
  total = setup.global_batch // setup.micro_batch_size
  if setup.global_batch % setup.micro_batch_size or total % len(replicas):
    return None
  base = Plan(replicas, model.num_layers, schedule=setup.schedule, micro_batches=total // len(replicas),
              micro_batch_size=setup.micro_batch_size, seq_len=setup.seq_len,
              activation_bits=setup.activation_bits)
  time_of = time_of or (lambda rep, m: pipeline_time(rep, m, cluster, model, setup))
  micro = split_micro_batches(replicas, total, lambda r, m: time_of(replicas[r], m))
  if micro is None:
    return None
  reps = [dataclasses.replace(rep, weight=float(m)) for rep, m in zip(replicas, micro)]
  return dataclasses.replace(base, replicas=reps)


def pipeline_time(rep: Replica, m: int, cluster, model, setup, exact: bool = False) -> float:
  plan = Plan([rep], model.num_layers, schedule=setup.schedule, micro_batches=m,
              micro_batch_size=setup.micro_batch_size, seq_len=setup.seq_len)
  return cm.estimate(plan, cluster, model, setup, exact)['pipeline']


def islands(cluster: Cluster, by: str) -> list[list[int]]:
  """Device sets that become replicas: one per region, host or GPU kind."""
  if by == 'region':
    return list(cluster.regions().values())
  if by == 'host':
    return list(cluster.hosts().values())
  if by == 'gpu':
    kinds: dict = {}
    for d in cluster.devices:
      kinds.setdefault(d.gpu, []).append(d.id)
    return list(kinds.values())
  raise HetjaxError(f"islands are 'region', 'host' or 'gpu', got {by!r}")


def construct(cluster: Cluster, model: ModelConfig, setup: cm.TrainSetup, by: str = 'region',
              use_all: bool = True, passes: int = 3, model_name: str = '') -> Plan:
  """The best plan found by coordinate descent over the islands' options, from several starts:
  every island on its best option when alone, and every island on one (TP degree, replica count)
  where it has it. use_all=False lets islands stay unused (a plan over part of the cluster)."""
  isl = islands(cluster, by)
  opts = [replica_options(cluster, model, setup, i) for i in isl]
  if use_all and not all(opts):
    raise HetjaxError(f'some island of {cluster.name} (by {by}) fits no replica of the model')
  shape = lambda reps: (reps[0].stages[0].tp, len(reps))
  times: dict = {}  # (replica, m) -> pipeline seconds; a replica's time ignores the others
  def time_of(rep, m):
    key = (id(rep), m)
    if key not in times:
      times[key] = pipeline_time(rep, m, cluster, model, setup)
    return times[key]
  scored: dict = {}

  def score(choice):
    if choice not in scored:
      reps = [r for i, c in enumerate(choice) if c is not None for r in opts[i][c]]
      plan = make_plan(reps, cluster, model, setup, time_of) if reps else None
      t = np.inf
      if plan is not None:
        try:
          check_memory(plan, cluster, model, setup)
          t = estimate(plan, cluster, model, setup, exact=False)['total']
        except HetjaxError:
          pass
      scored[choice] = (t, plan)
    return scored[choice][0]

  alone = []  # each island's best option when it alone takes the whole batch
  for i, o in enumerate(opts):
    times_alone = [score(tuple([None] * i + [c] + [None] * (len(opts) - i - 1))) for c in range(len(o))]
    alone.append(int(np.argmin(times_alone)) if o else None)
  starts = {tuple(alone)}
  for want in {shape(reps) for o in opts for reps in o}:
    starts.add(tuple(next((c for c, reps in enumerate(o) if shape(reps) == want), a)
                     for o, a in zip(opts, alone)))
  if not use_all:
    starts |= {tuple(a if j == i else None for j in range(len(opts))) for i, a in enumerate(alone)}
  best_choice, best = None, np.inf
  for choice in sorted(starts, key=str):
    t = score(choice)
    for _ in range(passes):
      improved = False
      for i, o in enumerate(opts):
        for c in ([] if use_all else [None]) + list(range(len(o))):
          cand = choice[:i] + (c,) + choice[i + 1:]
          if score(cand) < t - 1e-12:
            choice, t, improved = cand, score(cand), True
      if not improved:
        break
    if t < best:
      best_choice, best = choice, t
  if not np.isfinite(best):
    raise HetjaxError(f'no heterogeneous-replica plan fits {cluster.name} (islands by {by})')
  plan = scored[best_choice][1]
  plan.model, plan.cluster = model_name, cluster.name
  plan.validate(cluster, model)
  plan.prediction = {k: v for k, v in estimate(plan, cluster, model, setup).items()
                     if k != 'replica_pipeline'}
  plan.search = {'method': 'hetero_replicas', 'islands': by, 'use_all': use_all,
                 'choice': list(best_choice), 'evaluations': len(scored)}
  return plan


def rebalance(plan: Plan, cluster: Cluster, model: ModelConfig, setup: cm.TrainSetup) -> Plan:
  """A training plan made heterogeneous: each replica keeps its devices and stage order but may get
  its own layer split (by its stages' compute, within memory) and a batch share by its pipeline
  time. Returns the best of the four (layers kept or split per replica) x (equal or fitted shares),
  the input plan included, by `estimate`."""
  setup = dataclasses.replace(setup, micro_batch_size=plan.micro_batch_size, schedule=plan.schedule)
  equal = [dataclasses.replace(r, weight=1.0) for r in plan.replicas]
  split = [_replica(cluster, model, setup, [s.devices for s in r.stages]) or r for r in equal]
  cands = []
  for reps in (equal, split):
    cands.append(dataclasses.replace(plan, replicas=reps, prediction={}, search={}))
    fitted = make_plan(reps, cluster, model, setup)
    if fitted is not None:
      cands.append(dataclasses.replace(fitted, model=plan.model, cluster=plan.cluster,
                                       activation_bits=plan.activation_bits))
  best = None
  for cand in cands:
    try:
      cand.validate(cluster, model)
      check_memory(cand, cluster, model, setup)
    except HetjaxError:
      continue
    pred = estimate(cand, cluster, model, setup)
    if best is None or pred['total'] < best[0]['total']:
      best = (pred, cand)
  if best is None:
    raise HetjaxError('no rebalanced plan fits in memory')
  pred, out = best
  out.prediction = {k: v for k, v in pred.items() if k != 'replica_pipeline'}
  out.search = {**plan.search, 'rebalanced_from': plan.search.get('method', '?')}
  return out


def best_plan(plan: Plan, cluster: Cluster, model: ModelConfig, setup: cm.TrainSetup,
              model_name: str = '') -> tuple[Plan, list[tuple[str, float]]]:
  """The uniform `plan` against heterogeneous-replica plans: it rebalanced, and replicas built from
  regions, hosts and GPU kinds (every device used). Returns the plan with the lowest predicted step
  (all scored by `estimate`) and each candidate's (name, seconds); candidates that do not fit are
  left out."""
  uniform = estimate(plan, cluster, model, setup)['total']
  cands = [('uniform', uniform, plan)]
  makers = [('rebalanced', lambda: rebalance(plan, cluster, model, setup))]
  makers += [(f'islands by {by}', lambda by=by: construct(cluster, model, setup, by, model_name=model_name))
             for by in ('region', 'host', 'gpu')]
  for name, make in makers:
    try:
      cand = make()
    except HetjaxError:
      continue
    cands.append((name, cand.prediction['total'], cand))
  best = min(cands, key=lambda c: c[1])
  return best[2], [(name, t) for name, t, _ in cands]
