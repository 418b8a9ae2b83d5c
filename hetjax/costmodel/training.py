"""Training cost model: DT-FM's communication cost, a full step-time model and a memory check.

Every number comes from named inputs: FLOPs from ModelConfig, bytes from shapes and dtypes, link
delay (ms) and bandwidth (Gbit/s) from the Cluster, device TFLOP/s x `efficiency`.

DT-FM (Yuan et al., NeurIPS 2022), for D_PP device groups of D_DP devices each:
  dp_cost = max over devices d of sum_{d' in group(d), d' != d} 2 * (alpha + c_dp / (D_DP * beta))
  pp_cost = open-loop TSP over groups with edge = bottleneck perfect matching of (alpha + c_pp / beta)
  cost    = dp_cost + 2 * pp_cost        (activations forward, their gradients backward)
where c_pp = activation bytes of one tasklet (all its micro-batches), c_dp = gradient bytes of a stage.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from hetjax.cluster import Cluster
from hetjax.errors import HetjaxError
from hetjax.models.config import ModelConfig
from hetjax.plan import Plan
from hetjax.search.ordering import bottleneck_value, open_path, order_groups


@dataclasses.dataclass(frozen=True)
class TrainSetup:
  """The workload and the knobs of the step-time model."""
  global_batch: int = 1024        # sequences per step
  seq_len: int = 2048
  micro_batch_size: int = 1
  schedule: str = '1f1b'          # 'gpipe' or '1f1b'
  efficiency: float = 0.4         # achieved fraction of peak TFLOP/s
  act_bytes: int = 2              # bytes per activation value before compression
  activation_bits: int = 16       # bits on the wire between stages (16 = none)
  compress_group: int = 128       # values per quantisation group
  scale_bytes: int = 4            # per group: fp16 scale + fp16 zero point
  grad_bytes: int = 4             # DP gradient sync dtype (DT-FM: fp32)
  state_bytes_per_param: int = 16  # bf16 weight + bf16 grad + fp32 master + Adam m, v
  recompute: bool = False         # activation recomputation (keeps one input per layer)
  memory_fraction: float = 0.9    # usable share of device memory
  c_pp_bytes: Optional[float] = None  # override DT-FM's c_pp (else derived)
  c_dp_bytes: Optional[float] = None  # override DT-FM's c_dp (else derived)

  def __post_init__(self):
    for name in ('c_pp_bytes', 'c_dp_bytes'):
      v = getattr(self, name)
      if v is not None and not (isinstance(v, (int, float)) and np.isfinite(v) and v > 0):
        raise HetjaxError(f'train.{name} must be a positive number of bytes (0 derives it from the model), '
                          f'got {v!r}')

  def micro_batches(self, dp: int) -> int:
    per = self.global_batch / dp / self.micro_batch_size
    if per < 1 or per != int(per):
      raise HetjaxError(f'global_batch={self.global_batch} does not split into {dp} replicas x '
                        f'micro-batches of {self.micro_batch_size}')
    return int(per)


def efficiency_for(cluster: Cluster, requested: float = 0.0) -> float:
  """The efficiency to plan with: `requested` when set (> 0); else 1.0 over a measured cluster
  (mode=calibrate: its TFLOP/s are achieved rates) and TrainSetup's default over datasheet peaks."""
  if not (isinstance(requested, (int, float)) and np.isfinite(requested) and 0 <= requested <= 1):
    raise HetjaxError(f'train.efficiency must be in (0, 1], or 0 for automatic, got {requested!r}')
  if requested:
    return float(requested)
  return 1.0 if cluster.measured else TrainSetup.efficiency


# ------------------------------------------------------------------ bytes and FLOPs
def wire_bytes(n_values: float, bits: int, group: int = 128, scale_bytes: int = 4) -> float:
  """Bytes to send n_values at `bits` per value: 16 bits is plain fp16/bf16; fewer adds per-group scales."""
  if bits >= 16:
    return n_values * bits / 8
  return n_values * bits / 8 + np.ceil(n_values / group) * scale_bytes


def boundary_bytes(model: ModelConfig, setup: TrainSetup) -> float:
  """Bytes of one micro-batch's activation (or its gradient) crossing a stage boundary."""
  n = setup.micro_batch_size * setup.seq_len * model.hidden
  if setup.activation_bits >= 16:
    return n * setup.act_bytes
  return wire_bytes(n, setup.activation_bits, setup.compress_group, setup.scale_bytes)


def head_flops_per_token(model: ModelConfig) -> float:
  return 2.0 * model.hidden * model.vocab_size


def stage_fwd_flops(model: ModelConfig, setup: TrainSetup, num_layers: int, head: bool) -> float:
  """Forward FLOPs of one micro-batch through a stage (attention over the full sequence, as DT-FM's formula)."""
  tokens = setup.micro_batch_size * setup.seq_len
  per_token = num_layers * model.block_flops_per_token(setup.seq_len) + (head_flops_per_token(model) if head else 0)
  return tokens * per_token


def stage_params(model: ModelConfig, num_layers: int, embed: bool, head: bool) -> int:
  p = num_layers * model.block_params()
  if embed:
    p += model.embed_params()
  if head:
    p += model.head_params() + (model.vocab_size * model.hidden if model.tie_embeddings and not embed else 0)
  return p


def dtfm_workload(model: ModelConfig, setup: TrainSetup, d_pp: int, d_dp: int) -> tuple[float, float]:
  """DT-FM's (c_pp, c_dp) in bytes: a tasklet's activations (all its micro-batches), a stage's gradients."""
  c_pp = setup.c_pp_bytes
  if c_pp is None:
    c_pp = boundary_bytes(model, setup) * setup.global_batch / d_dp / setup.micro_batch_size
  c_dp = setup.c_dp_bytes
  if c_dp is None:
    c_dp = model.num_layers / d_pp * model.block_params() * setup.grad_bytes
  return float(c_pp), float(c_dp)


# ------------------------------------------------------------------ DT-FM communication cost
def dp_pair_cost(cluster: Cluster, c_dp: float, d_dp: int) -> np.ndarray:
  """2 * (alpha + c_dp / (D_DP * beta)) per device pair (seconds); 0 on the diagonal."""
  return 2.0 * cluster.transfer_time(c_dp / d_dp)


def dtfm_dp_cost(cluster: Cluster, groups: Sequence[Sequence[int]], c_dp: float) -> float:
  """Sharded parameter server per group: max over devices of the summed pair costs in its group."""
  worst = 0.0
  for g in groups:
    w = dp_pair_cost(cluster, c_dp, len(g))[np.ix_(g, g)]
    worst = max(worst, float(w.sum(axis=1).max()))
  return worst


def dtfm_cost(cluster: Cluster, groups: Sequence[Sequence[int]], c_pp: float, c_dp: float,
              cache: Optional[dict] = None) -> dict:
  """DT-FM's total cost of a partition into equal groups, with the pipeline path and replicas."""
  sizes = {len(g) for g in groups}
  if len(sizes) != 1:
    raise HetjaxError(f'DT-FM needs groups of equal size, got sizes {sorted(sizes)}')
  dp = dtfm_dp_cost(cluster, groups, c_dp)
  pp, path, replicas = order_groups(cluster.transfer_time(c_pp), [list(g) for g in groups], cache)
  return {'total': dp + 2 * pp, 'dp': dp, 'pp': 2 * pp, 'path': path, 'replicas': replicas}


class DtfmObjective:
  """DT-FM's total cost of many partitions of one cluster into groups of one size, fast: the link
  matrices are computed once and pair bottlenecks are cached by group pair. Equals
  dtfm_cost(...)['total'] (the search's fitness; dtfm_cost also returns the path and replicas)."""

  def __init__(self, cluster: Cluster, c_pp: float, c_dp: float, group_size: int):
    self.pp_link = cluster.transfer_time(c_pp)
    self.dp_pair = dp_pair_cost(cluster, c_dp, group_size)
    self.cache: dict = {}

  def group_dp(self, groups: np.ndarray) -> np.ndarray:
    """Each group's DP cost (its slowest device's summed pair costs)."""
    g = np.asarray(groups)
    return self.dp_pair[g[:, :, None], g[:, None, :]].sum(axis=-1).max(axis=1)

  def dp(self, groups: np.ndarray) -> float:
    return float(self.group_dp(groups).max())

  def pp_edges(self, groups: np.ndarray) -> np.ndarray:
    """k x k bottleneck-matching cost between groups (rows sorted; one direction, one tasklet)."""
    k = len(groups)
    keys = [g.tobytes() for g in groups]
    e = np.zeros((k, k))
    todo = []
    for a in range(k):
      for b in range(a + 1, k):
        v = self.cache.get((keys[a], keys[b]))
        if v is None:
          todo.append((a, b))
        else:
          e[a, b] = e[b, a] = v
    if todo:
      a, b = np.array(todo).T
      sub = self.pp_link[groups[a][:, :, None], groups[b][:, None, :]]   # [pair] block
      # every row and column needs an edge: the bottleneck is at least the largest row / column minimum,
      # and on structured clusters it usually is that bound (checked by one assignment)
      lower = np.maximum(sub.min(axis=2).max(axis=1), sub.min(axis=1).max(axis=1))
      for p, (i, j) in enumerate(todo):
        too_long = sub[p] > lower[p]
        r, c = linear_sum_assignment(too_long)
        v = float(lower[p]) if not too_long[r, c].any() else bottleneck_value(sub[p])
        self.cache[(keys[i], keys[j])] = e[i, j] = e[j, i] = v
    return e

  def __call__(self, groups) -> float:
    g = np.sort(np.asarray(groups), axis=1)
    return self.dp(g) + 2 * open_path(self.pp_edges(g))[0]

  def ranked(self, groups) -> tuple[float, float]:
    """(cost, sum of the groups' DP costs): the second part ranks plans of equal cost, so a local
    search can walk along the plateaus of the max (lowering a group that is not the slowest)."""
    g = np.sort(np.asarray(groups), axis=1)
    dp = self.group_dp(g)
    return float(dp.max()) + 2 * open_path(self.pp_edges(g))[0], float(dp.sum())


def plan_link_cost(cluster: Cluster, plan: Plan, c_pp: float, c_dp: float) -> dict:
  """DT-FM's cost of a plan in the order it runs: dp over each stage's devices, pp summed over the
  plan's stage boundaries, each the slowest of its replicas' links (no re-ordering, no re-matching)."""
  groups = [[d for g in grp for d in g] for grp in plan.stage_groups()]
  if len({len(g) for g in groups}) != 1:
    raise HetjaxError('DT-FM cost needs the same number of devices in every stage')
  dp = dtfm_dp_cost(cluster, groups, c_dp)
  link = cluster.transfer_time(c_pp)
  pp = 0.0
  for s in range(plan.num_stages - 1):
    pp += max(float(link[r.stages[s].devices[0], r.stages[s + 1].devices[0]]) for r in plan.replicas)
  return {'total': dp + 2 * pp, 'dp': dp, 'pp': 2 * pp}


# ------------------------------------------------------------------ step-time pieces
def ring_allreduce_time(cluster: Cluster, devices: Sequence[int], nbytes: float) -> float:
  """Ring all-reduce: 2(t-1) steps of nbytes/t over the slowest link in the group."""
  t = len(devices)
  if t <= 1:
    return 0.0
  ix = np.ix_(devices, devices)
  off = ~np.eye(t, dtype=bool)
  bw = cluster.bandwidth_gbps[ix][off].min()
  alpha = cluster.delay_ms[ix][off].max() / 1e3
  return 2 * (t - 1) * (alpha + nbytes / t * 8 / (bw * 1e9))


def tp_time_per_layer(cluster: Cluster, devices: Sequence[int], model: ModelConfig, setup: TrainSetup) -> float:
  """Megatron TP: 2 all-reduces of the block output forward and 2 backward, per layer per micro-batch."""
  n = setup.micro_batch_size * setup.seq_len * model.hidden * setup.act_bytes
  return 4 * ring_allreduce_time(cluster, devices, n)


def schedule_order(schedule: str, stage: int, num_stages: int, m: int) -> list[tuple[str, int]]:
  """Op order of one stage: ('F'|'B', micro-batch)."""
  if schedule == 'gpipe':
    return [('F', i) for i in range(m)] + [('B', i) for i in range(m)]
  if schedule == '1f1b':
    warm = min(num_stages - stage - 1, m)
    ops = [('F', i) for i in range(warm)]
    for i in range(m - warm):
      ops += [('F', warm + i), ('B', i)]
    return ops + [('B', i) for i in range(m - warm, m)]
  raise HetjaxError(f"unknown schedule {schedule!r}; use 'gpipe' or '1f1b'")


def simulate_pipeline(fwd: Sequence[float], bwd: Sequence[float], send_f: Sequence[float],
                      send_b: Sequence[float], lat: Sequence[float], m: int, schedule: str) -> float:
  """Makespan of one pipeline. Stage k computes its ops in schedule order; boundary k (k -> k+1)
  carries each message for send_f[k] / send_b[k] seconds (serialised per direction) plus lat[k]."""
  s = len(fwd)
  orders = [schedule_order(schedule, k, s, m) for k in range(s)]
  ptr, free = [0] * s, [0.0] * s
  done_f = [[None] * m for _ in range(s)]   # arrival time of F output at the next stage
  done_b = [[None] * m for _ in range(s)]   # arrival time of B output at the previous stage
  fin_f = [[None] * m for _ in range(s)]
  link_f, link_b = [0.0] * s, [0.0] * s
  finish = 0.0
  remaining = sum(len(o) for o in orders)
  while remaining:
    progressed = False
    for k in range(s):
      while ptr[k] < len(orders[k]):
        op, i = orders[k][ptr[k]]
        if op == 'F':
          ready = 0.0 if k == 0 else done_f[k - 1][i]
        else:
          ready = fin_f[k][i] if k == s - 1 else done_b[k + 1][i]
        if ready is None:
          break
        start = max(free[k], ready)
        end = start + (fwd[k] if op == 'F' else bwd[k])
        free[k] = end
        if op == 'F':
          fin_f[k][i] = end
          if k < s - 1:
            link_f[k] = max(link_f[k], end) + send_f[k]
            done_f[k][i] = link_f[k] + lat[k]
        elif k > 0:
          link_b[k - 1] = max(link_b[k - 1], end) + send_b[k - 1]
          done_b[k][i] = link_b[k - 1] + lat[k - 1]
        finish = max(finish, end)
        ptr[k] += 1
        remaining -= 1
        progressed = True
    if not progressed:
      raise RuntimeError('pipeline simulation deadlocked')  # cannot happen for valid schedules
  return finish


def pipeline_time_approx(fwd, bwd, send_f, send_b, lat, m: int, schedule: str = 'gpipe') -> float:
  """Closed form used inside the search: fill/drain of one micro-batch plus (M-1) x the steady period.

  GPipe runs all forwards, then all backwards: two phases, each paced by its busiest stage or link.
  1F1B overlaps them: the period is the busiest stage (f + b) or link, and stage s keeps only S-s
  micro-batches in flight, so its round trip to the last stage and back is spread over S-s of them.
  """
  fill = sum(fwd) + sum(bwd) + sum(send_f) + sum(send_b) + 2 * sum(lat)
  if schedule == 'gpipe':
    return fill + (m - 1) * (max(list(fwd) + list(send_f)) + max(list(bwd) + list(send_b)))
  steady = max([f + b for f, b in zip(fwd, bwd)] + list(send_f) + list(send_b))
  s = len(fwd)
  for k in range(s):
    trip = sum(fwd[k:]) + sum(bwd[k:]) + sum(send_f[k:]) + sum(send_b[k:]) + 2 * sum(lat[k:])
    steady = max(steady, trip / min(s - k, m))
  return fill + (m - 1) * steady


# ------------------------------------------------------------------ full step time
def _stage_times(plan: Plan, r: int, cluster: Cluster, model: ModelConfig, setup: TrainSetup):
  """Per stage (fwd, bwd, tp) seconds per micro-batch and per boundary (send, latency) for replica r."""
  rep = plan.replicas[r]
  fwd, bwd, tp = [], [], []
  for k, st in enumerate(rep.stages):
    flops = stage_fwd_flops(model, setup, st.num_layers, st.head) / st.tp
    rate = min(cluster.tflops(d) for d in st.devices) * 1e12 * setup.efficiency
    f = flops / rate
    overhead = max(cluster.op_overhead_s(d) for d in st.devices)  # host time per op (measured)
    fwd.append(f + overhead)
    # Recomputation repeats the forward in the backward, except on the last stage, whose loss
    # and backward follow its forward at once.
    recomputes = setup.recompute and k < len(rep.stages) - 1
    bwd.append(f * (3.0 if recomputes else 2.0) + overhead)
    tp.append(tp_time_per_layer(cluster, st.devices, model, setup) * st.num_layers)
  nbytes = boundary_bytes(model, setup)
  send, lat = [], []
  for a, b in zip(rep.stages[:-1], rep.stages[1:]):
    i, j = a.devices[0], b.devices[0]
    send.append(nbytes * 8 / (cluster.bandwidth_gbps[i, j] * 1e9))
    lat.append(cluster.delay_ms[i, j] / 1e3)
  return fwd, bwd, tp, send, lat


def dp_sync_time(plan: Plan, cluster: Cluster, model: ModelConfig, setup: TrainSetup) -> float:
  """DT-FM's sharded parameter server per stage, each TP rank syncing its 1/tp shard; max over stages."""
  if plan.dp == 1:
    return 0.0
  worst = 0.0
  for k, group in enumerate(plan.stage_groups()):
    st = plan.replicas[0].stages[k]
    c_dp = stage_params(model, st.num_layers, st.embed, st.head) * setup.grad_bytes
    tp = min(len(g) for g in group)
    for rank in range(tp):
      devs = [g[rank] for g in group]
      worst = max(worst, dtfm_dp_cost(cluster, [devs], c_dp / tp))
  return worst


def tied_sync_time(plan: Plan, cluster: Cluster, model: ModelConfig, setup: TrainSetup) -> float:
  """A tied token table's gradient crosses between each replica's first and last stage after the
  pipeline, both ways at once (each side then holds the sum): table bytes / bandwidth + one-way
  latency of the slower direction; 0 for untied tables or a table on one device. Max over replicas."""
  if not model.tie_embeddings:
    return 0.0
  nbytes = model.vocab_size * model.hidden * setup.grad_bytes
  worst = 0.0
  for rep in plan.replicas:
    i, j = rep.stages[0].devices[0], rep.stages[-1].devices[0]
    if i == j:
      continue
    worst = max(worst, *(nbytes * 8 / (cluster.bandwidth_gbps[a, b] * 1e9) + cluster.delay_ms[a, b] / 1e3
                         for a, b in ((i, j), (j, i))))
  return worst


def update_time(plan: Plan, cluster: Cluster) -> float:
  """A step's epilogue after the pipeline (norms, optimizer update), each stage on its own devices at
  once: the slowest stage's layers x its devices' measured seconds per layer (0 unless calibrated)."""
  return max(st.num_layers * max(cluster.update_s_per_layer(d) for d in st.devices)
             for rep in plan.replicas for st in rep.stages)


def estimate(plan: Plan, cluster: Cluster, model: ModelConfig, setup: TrainSetup, exact: bool = True) -> dict:
  """Predicted step time of a training plan (seconds) with an additive breakdown:
  total = compute + bubble + tp_comm + pp_comm + dp_comm + tied_comm + update, the pipeline terms
  taken from the slowest replica. A calibrated cluster adds each device's host time per op to its
  ops' compute (so 'compute' includes it) and its epilogue time as 'update'. The pipeline overlaps sends with compute (the runtime's socket transport
  between processes does: transfers are asynchronous)."""
  m = plan.micro_batches
  best = None
  for r in range(plan.dp):
    fwd, bwd, tp, send, lat = _stage_times(plan, r, cluster, model, setup)
    zeros = [0.0] * len(send)
    half_tp = [t / 2 for t in tp]
    f_tp = [a + b for a, b in zip(fwd, half_tp)]
    b_tp = [a + b for a, b in zip(bwd, half_tp)]
    if exact:
      sim = lambda *a: simulate_pipeline(*a, m, plan.schedule)
    else:
      sim = lambda *a: pipeline_time_approx(*a, m, plan.schedule)
    t_plain = sim(fwd, bwd, zeros, zeros, zeros)
    t_tp = sim(f_tp, b_tp, zeros, zeros, zeros)
    t_all = sim(f_tp, b_tp, send, send, lat)
    compute = m * max(f + b for f, b in zip(fwd, bwd))
    row = {'compute': compute, 'bubble': t_plain - compute, 'tp_comm': t_tp - t_plain,
           'pp_comm': t_all - t_tp, 'pipeline': t_all}
    if best is None or row['pipeline'] > best['pipeline']:
      best = row
  best['dp_comm'] = dp_sync_time(plan, cluster, model, setup)
  best['tied_comm'] = tied_sync_time(plan, cluster, model, setup)
  best['update'] = update_time(plan, cluster)
  best['total'] = best['pipeline'] + best['dp_comm'] + best['tied_comm'] + best['update']
  tokens = setup.global_batch * setup.seq_len
  best['tokens_per_s'] = tokens / best['total']
  return {k: float(v) for k, v in best.items()}


# ------------------------------------------------------------------ memory
def activation_bytes_per_layer(model: ModelConfig, setup: TrainSetup, tp: int) -> float:
  """Stored activations of one layer for one micro-batch (Korthikanti et al. 2022, 16-bit, TP without
  sequence parallelism); with recomputation only the layer input is kept."""
  s, b, h, a = setup.seq_len, setup.micro_batch_size, model.hidden, model.num_heads
  if setup.recompute:
    return 2.0 * s * b * h
  return s * b * h * (10 + 24 / tp + 5 * a * s / (h * tp))


def in_flight(schedule: str, stage: int, num_stages: int, m: int) -> int:
  """Micro-batches whose activations a stage holds at its peak."""
  return m if schedule == 'gpipe' else min(num_stages - stage, m)


def memory_report(plan: Plan, cluster: Cluster, model: ModelConfig, setup: TrainSetup) -> list[dict]:
  """Per device: bytes needed (params + grads + optimizer, activations, logits) vs capacity."""
  rows = []
  for r, rep in enumerate(plan.replicas):
    for k, st in enumerate(rep.stages):
      params = stage_params(model, st.num_layers, st.embed, st.head) / st.tp
      state = params * setup.state_bytes_per_param
      n_mb = in_flight(plan.schedule, k, len(rep.stages), plan.micro_batches)
      act = n_mb * st.num_layers * activation_bytes_per_layer(model, setup, st.tp)
      logits = (setup.micro_batch_size * setup.seq_len * model.vocab_size * 6 / st.tp) if st.head else 0.0
      need = state + act + logits
      for d in st.devices:
        cap = cluster.memory_bytes(d) * setup.memory_fraction
        rows.append({'device': d, 'gpu': cluster.devices[d].gpu, 'replica': r, 'stage': k,
                     'state': state, 'activations': act, 'logits': logits, 'need': need, 'capacity': cap,
                     'ok': need <= cap})
  return rows


def check_memory(plan: Plan, cluster: Cluster, model: ModelConfig, setup: TrainSetup) -> list[dict]:
  """Raise HetjaxError naming the worst over-full device; return the report when everything fits."""
  rows = memory_report(plan, cluster, model, setup)
  bad = [r for r in rows if not r['ok']]
  if bad:
    w = max(bad, key=lambda r: r['need'] / r['capacity'])
    gb = lambda x: f'{x / 1e9:.2f}'
    raise HetjaxError(
        f"plan does not fit in memory: device {w['device']} ({w['gpu']}, replica {w['replica']} stage "
        f"{w['stage']}) needs {gb(w['need'])} GB (params+optimizer {gb(w['state'])}, activations "
        f"{gb(w['activations'])}, logits {gb(w['logits'])}) > {gb(w['capacity'])} GB usable; "
        f"{len(bad)} device(s) over")
  return rows
