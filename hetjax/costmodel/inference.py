"""Inference cost model (HexGen-style): prefill and decode time of pipeline stages, TP and PP
communication, memory, request latency and replica throughput.

A stage runs `n` layers on a TP group of `t` devices of one GPU type. Every term names its inputs:
  compute    FLOPs / (t * peak TFLOP/s * compute_efficiency)         FLOPs from ModelConfig
             (the head's one large matmul at head_compute_efficiency, where set: matmul
             efficiency depends on the shape)
  memory     bytes / (peak GB/s * memory_efficiency)                  weight scan (1/t of the layer)
                                                                      + KV-cache reads/writes (1/t, GQA heads)
  layer      max(compute, memory)                                     (roofline)
  TP         2 ring all-reduces per layer of the activations:
             2 (t-1) (alpha + bytes / (t beta)), alpha/beta = worst delay/bandwidth inside the group
  PP         delay + bytes / bandwidth between consecutive stage leaders, plus the sampled token's hop
             from the last stage back to the first before each decode step
  head       the LM head on the last stage, replicated over its TP group (one device's time: on
             shared compute, t devices doing the same work on the same cores cost t times)
  overhead   op_overhead_s of host time per stage op (one prefill or one decode step of one group):
             the program launch and the runtime's bookkeeping, measured by a probe (or per stage,
             StageLayout.overhead_s, e.g. measured per process on the testbed); on shared
             compute, device_overhead_s more for each further device of the TP group (each runs
             its part of the program on the same cores)
A request (or a batch of B requests served together) = prefill of the prompt, which yields the first
token, then gen_len - 1 decode steps at contexts prompt_len + 1 ... prompt_len + gen_len - 1.

Pipelined decode (what the engine runs, parallel/schedules.decode(S, M, T)): a replica with S stages
works on M request groups of B requests at once. Stage s runs its ops in the order (token t, group m),
each after its dependency: stage s - 1's op of the same group and token, and for stage 0 at token
t > 0 the last stage's op of token t - 1 (the sampled token's return). With stage times d_s, hop times
h (activations forward and the token back) and unit ops, that tick structure gives (`pipelined_time`):
  prefill wave  sum_s p_s + sum hops + (M - 1) max(p_s, hops)        the last group enters M - 1 ops later
  token period  max(C, M max(d_s, hops)),  C = sum_s d_s + sum hops   a group's ring vs the busiest stage
  round         prefill wave + sum over the T - 1 decode steps of the token period
So M <= S groups cost no more per token than one (C dominates while stages are balanced), and a
replica's throughput is M B gen_len / round. M = 1 is a replica that serves one batch at a time; the
engine's serving rounds use M = min(waiting groups, S), so `replica_cost` defaults to M = S.
The KV cache holds M B sequences; the prefill workspace is one group's.

Shared compute. Devices of a kind in SHARED_COMPUTE (JAX's virtual CPU devices) are threads of one
process on one host's cores: a TP group of t of them has one device's rate and bandwidth, not t
times, and all of a host's stages are one resource, so the busiest resource of the token period is
the host with the sum of its stages' times (pipelining gains nothing there).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence

import numpy as np

from hetjax import checks
from hetjax.cluster import Cluster
from hetjax.errors import HetjaxError
from hetjax.models.config import ModelConfig


SHARED_COMPUTE = ('CPU',)   # device kinds whose devices on one host share the host's cores


@dataclasses.dataclass(frozen=True)
class ServeSetup:
  """The workload and the knobs of the model."""
  prompt_len: int = 128           # s_in
  gen_len: int = 128              # s_out (the first token comes from prefill)
  batch: int = 1                  # requests served together by one replica
  bytes_per_value: int = 2        # fp16/bf16 weights, KV cache and activations
  compute_efficiency: float = 0.6  # achieved share of datasheet TFLOP/s
  memory_efficiency: float = 0.8   # achieved share of datasheet memory bandwidth
  memory_fraction: float = 0.9     # usable share of device memory
  op_overhead_s: float = 0.0       # host time of one stage op (program launch, runtime bookkeeping)
  device_overhead_s: float = 0.0   # and of each further device of its TP group, on shared compute
  head_compute_efficiency: float = 0.0  # the LM head's one large matmul (0: compute_efficiency)

  def validate(self) -> 'ServeSetup':
    for name in ('prompt_len', 'gen_len', 'batch', 'bytes_per_value'):
      checks.integer(getattr(self, name), name, 1)
    for name in ('compute_efficiency', 'memory_efficiency', 'memory_fraction'):
      checks.real(getattr(self, name), name, 0, 1, lo_open=True)
    checks.real(self.head_compute_efficiency, 'head_compute_efficiency (0: compute_efficiency)', 0, 1)
    for name in ('op_overhead_s', 'device_overhead_s'):
      checks.real(getattr(self, name), f'{name} (seconds)', 0, 1)
    return self


def allowed_tp(model: ModelConfig, max_tp: int = 8) -> list[int]:
  """TP degrees that split heads, KV heads and the MLP evenly."""
  return [t for t in range(1, max_tp + 1)
          if model.num_heads % t == 0 and model.num_kv_heads % t == 0 and model.ffn % t == 0]


def allreduce_time(nbytes: float, t: int, alpha_s: float, beta_gbps: float) -> float:
  """Ring all-reduce of nbytes over t devices: 2(t-1) steps of nbytes/t each."""
  if t <= 1:
    return 0.0
  return 2 * (t - 1) * (alpha_s + nbytes / t * 8 / (beta_gbps * 1e9))


def group_link(cluster: Cluster, devices: Sequence[int]) -> tuple[float, float]:
  """(alpha seconds, beta Gbit/s): the worst delay and bandwidth between members of a TP group."""
  if len(devices) <= 1:
    return 0.0, float('inf')
  idx = np.ix_(devices, devices)
  off = ~np.eye(len(devices), dtype=bool)
  return float(cluster.delay_ms[idx][off].max()) / 1e3, float(cluster.bandwidth_gbps[idx][off].min())


@dataclasses.dataclass(frozen=True)
class LayerCost:
  """Seconds and bytes of ONE layer on one TP group, for a batch of B requests."""
  prefill: float            # whole prompt
  decode: float             # all gen_len - 1 decode steps together
  decode_steps: int
  decode_step: np.ndarray   # seconds of each decode step (TP all-reduce included), len decode_steps
  compute_prefill: float    # the roofline terms behind `prefill`, for reports
  memory_prefill: float
  tp_comm: float            # all-reduce share of prefill + decode
  weight_bytes: float       # per device
  kv_bytes: float           # per device, B x (prompt + gen) tokens


@functools.lru_cache(maxsize=100_000)
def layer_cost(model: ModelConfig, setup: ServeSetup, tflops: float, mem_bw_gbs: float, tp: int,
               alpha_s: float = 0.0, beta_gbps: float = float('inf')) -> LayerCost:
  b, s_in, s_out, v = setup.batch, setup.prompt_len, setup.gen_len, setup.bytes_per_value
  rate = tp * tflops * 1e12 * setup.compute_efficiency
  bw = mem_bw_gbs * 1e9 * setup.memory_efficiency
  w_bytes = model.block_params() * v / tp
  kv_tok = model.kv_bytes_per_token(v) / tp               # per token, this device's KV heads
  # prefill: causal attention, token i attends to i + 1 keys -> mean context (s_in + 1) / 2
  flops_p = b * s_in * model.block_flops_per_token((s_in + 1) / 2)
  comp_p = flops_p / rate
  mem_p = (w_bytes + b * s_in * kv_tok) / bw
  act = b * model.hidden * v                              # one token's activations per request
  tp_p = 2 * allreduce_time(act * s_in, tp, alpha_s, beta_gbps)
  # decode steps at contexts s_in + 1 ... s_in + s_out - 1 (the new token included)
  ctx = np.arange(s_in + 1, s_in + s_out, dtype=np.float64)
  comp_d = b * (2 * model.block_matmul_params() + 4 * ctx * model.hidden) / rate
  mem_d = (w_bytes + b * ctx * kv_tok) / bw
  tp_d = 2 * allreduce_time(act, tp, alpha_s, beta_gbps)
  step = np.maximum(comp_d, mem_d) + tp_d
  step.flags.writeable = False                            # shared through the lru_cache
  return LayerCost(prefill=max(comp_p, mem_p) + tp_p, decode=float(step.sum()), decode_steps=len(ctx),
                   decode_step=step,
                   compute_prefill=comp_p, memory_prefill=mem_p, tp_comm=tp_p + len(ctx) * tp_d,
                   weight_bytes=w_bytes, kv_bytes=b * (s_in + s_out) * kv_tok)


def head_time(model: ModelConfig, setup: ServeSetup, tflops: float, mem_bw_gbs: float, tp: int) -> float:
  """LM head for the last prompt token and every decode step (gen_len calls). The engine's head is
  not split over the TP group (models/model.py: its table is replicated), so each of the tp devices
  reads the whole table and does all of its FLOPs: one device's time, whatever tp is."""
  b, v = setup.batch, setup.bytes_per_value
  rate = tflops * 1e12 * (setup.head_compute_efficiency or setup.compute_efficiency)
  bw = mem_bw_gbs * 1e9 * setup.memory_efficiency
  per_step = max(2 * b * model.hidden * model.vocab_size / rate, model.vocab_size * model.hidden * v / bw)
  return setup.gen_len * per_step


def stage_memory(model: ModelConfig, setup: ServeSetup, num_layers: int, tp: int, embed: bool,
                 head: bool, groups: int = 1) -> dict[str, float]:
  """Bytes per device of a stage: weights, KV cache for groups x batch x (prompt + gen), activations
  (one group's prefill at a time)."""
  b, s, v = setup.batch, setup.prompt_len, setup.bytes_per_value
  params = num_layers * model.block_params()
  if embed:
    params += model.embed_params()
  if head:
    params += model.head_params() + (model.vocab_size * model.hidden if model.tie_embeddings and not embed else 0)
  weights = params * v / tp
  kv = num_layers * groups * b * (s + setup.gen_len) * model.kv_bytes_per_token(v) / tp
  # prefill workspace: residual + normed input + q/k/v + MLP intermediate + attention scores (no flash)
  act = b * s * (4 * model.hidden + 2 * model.ffn / tp + model.num_heads / tp * s) * v
  if head:
    act += b * model.vocab_size / tp * 4          # fp32 logits of the last position
  return {'weights': weights, 'kv': kv, 'activations': act, 'total': weights + kv + act}


def layers_that_fit(model: ModelConfig, setup: ServeSetup, tp: int, mem_bytes: float, embed: bool,
                    head: bool, groups: int = 1) -> int:
  """Most layers one TP group can hold (0 if none) with `groups` request groups' KV cache;
  mem_bytes = one device's memory."""
  cap = mem_bytes * setup.memory_fraction
  mem = lambda n, e, h: stage_memory(model, setup, n, tp, e, h, groups)['total']
  fixed = mem(0, embed, head)
  per = mem(1, False, False) - mem(0, False, False)
  return max(0, int((cap - fixed) // per))


def pp_hop(cluster: Cluster, src: int, dst: int, nbytes: float) -> float:
  return float(cluster.transfer_time(nbytes, src, dst)) if src != dst else 0.0


@dataclasses.dataclass
class StageLayout:
  """What the cost model needs of a stage: layers and its TP group (devices[0] is the leader);
  overhead_s: this stage's host time per op where it differs from setup.op_overhead_s (e.g.
  measured per process on an emulated testbed)."""
  num_layers: int
  devices: list[int]
  overhead_s: Optional[float] = None


def check_stage(cluster: Cluster, model: ModelConfig, devices: Sequence[int], where: str = 'stage') -> None:
  """TP groups stay inside one host and one GPU type, and split heads evenly."""
  hosts = {cluster.devices[d].host for d in devices}
  kinds = {cluster.devices[d].gpu for d in devices}
  if len(hosts) > 1 or len(kinds) > 1:
    raise HetjaxError(f'{where}: a TP group must be one host and one GPU type, got hosts {sorted(hosts)} '
                      f'and GPUs {sorted(kinds)}')
  if len(devices) not in allowed_tp(model, max(len(devices), 1)):
    raise HetjaxError(f'{where}: tp={len(devices)} does not divide heads={model.num_heads}, '
                      f'kv_heads={model.num_kv_heads}, ffn={model.ffn}')


def pipelined_time(prefill: Sequence[float], decode: np.ndarray, hops_prefill: Sequence[float],
                   hops_decode: Sequence[float], groups: int,
                   resources: Optional[Sequence] = None) -> dict:
  """Seconds of one round of schedules.decode(S, M = groups, T) from per-stage times (module doc).

  prefill[s]: stage s's prefill of one group; decode[s, i]: its decode step i of one group (T - 1
  steps); hops_prefill / hops_decode: every transfer of one group on the ring (the S - 1 forward
  hops, and for decode the token's return), each a resource of its own like a stage. resources[s]:
  the compute resource stage s runs on (default: its own); stages sharing one add up."""
  if groups < 1:
    raise HetjaxError(f'groups must be >= 1, got {groups}')
  decode = np.asarray(decode, np.float64).reshape(len(prefill), -1)
  if resources is not None:
    keys = sorted(set(resources), key=list(resources).index)
    prefill_r = [sum(p for p, r in zip(prefill, resources) if r == k) for k in keys]
    decode_r = np.stack([decode[[i for i, r in enumerate(resources) if r == k]].sum(axis=0) for k in keys])
  else:
    prefill_r, decode_r = prefill, decode
  busiest_p = max(max(prefill_r), max(hops_prefill, default=0.0))
  wave = sum(prefill) + sum(hops_prefill) + (groups - 1) * busiest_p
  ring = decode.sum(axis=0) + sum(hops_decode)                        # C per decode step
  busiest = np.maximum(decode_r.max(axis=0), max(hops_decode, default=0.0))
  period = np.maximum(ring, groups * busiest)
  return {'prefill': wave, 'decode': float(period.sum()), 'latency': wave + float(period.sum()),
          'period': period, 'ring': ring, 'busiest': busiest}


def replica_cost(cluster: Cluster, model: ModelConfig, stages: Sequence[StageLayout], setup: ServeSetup,
                 check_memory: bool = True, groups: Optional[int] = None) -> dict:
  """One round of a replica: `groups` request groups (default: one per stage, as the engine's
  serving rounds) of `setup.batch` requests each, decoded pipelined. Returns the round's latency
  (every request of the round has all its tokens), throughput and memory per stage.

  Raises HetjaxError naming the numbers when a stage does not fit in memory (check_memory=True)."""
  setup.validate()
  if not stages:
    raise HetjaxError('a replica needs at least one stage')
  if sum(s.num_layers for s in stages) != model.num_layers or min(s.num_layers for s in stages) < 1:
    raise HetjaxError(f'stage layer counts {[s.num_layers for s in stages]} must be >= 1 and sum to '
                      f'{model.num_layers}')
  m_groups = len(stages) if groups is None else groups
  v, b = setup.bytes_per_value, setup.batch
  prefill, decode, tp = [], [], 0.0
  mem = []
  for k, st in enumerate(stages):
    check_stage(cluster, model, st.devices, f'stage {k}')
    t = len(st.devices)
    alpha, beta = group_link(cluster, st.devices)
    spec = cluster.spec(st.devices[0])
    tfl, bw = min(cluster.tflops(d) for d in st.devices), min(cluster.mem_bw_gbs(d) for d in st.devices)
    if spec.name in SHARED_COMPUTE:      # t threads of one host: one device's rate in all
      tfl, bw = tfl / t, bw / t
    lc = layer_cost(model, setup, tfl, bw, t, alpha, beta)
    p_s, d_s = st.num_layers * lc.prefill, st.num_layers * lc.decode_step
    tp += st.num_layers * lc.tp_comm
    if k == len(stages) - 1:
      h = head_time(model, setup, tfl, bw, t) / setup.gen_len   # one call
      p_s, d_s = p_s + h, d_s + h
    own = setup.op_overhead_s if st.overhead_s is None else st.overhead_s
    over = own + (t - 1) * setup.device_overhead_s * (spec.name in SHARED_COMPUTE)
    p_s, d_s = p_s + over, d_s + over
    prefill.append(p_s)
    decode.append(d_s)
    m = stage_memory(model, setup, st.num_layers, t, k == 0, k == len(stages) - 1, m_groups)
    cap = min(cluster.memory_bytes(d) for d in st.devices) * setup.memory_fraction
    mem.append({**m, 'capacity': cap})
    if check_memory and m['total'] > cap:
      raise HetjaxError(
          f'stage {k} ({st.num_layers} layers, tp={t} on {spec.name}) needs {m["total"] / 1e9:.2f} GB per device '
          f'(weights {m["weights"] / 1e9:.2f} + KV {m["kv"] / 1e9:.2f} for {m_groups} x {b} requests + '
          f'activations {m["activations"] / 1e9:.2f}) '
          f'but has {cap / 1e9:.2f} GB ({setup.memory_fraction:.0%} of {cap / setup.memory_fraction / 1e9:.1f})')
  leaders = [st.devices[0] for st in stages]
  act = b * model.hidden * v
  hops_p = [pp_hop(cluster, a, c, act * setup.prompt_len) for a, c in zip(leaders, leaders[1:])]
  hops_d = [pp_hop(cluster, a, c, act) for a, c in zip(leaders, leaders[1:])]
  back = pp_hop(cluster, leaders[-1], leaders[0], 4 * b)      # sampled token ids return to stage 0
  decode = np.stack(decode)
  resources = [cluster.devices[st.devices[0]].host if cluster.spec(st.devices[0]).name in SHARED_COMPUTE
               else k for k, st in enumerate(stages)]
  pipe = pipelined_time(prefill, decode, hops_p, hops_d + [back], m_groups, resources)
  steps = setup.gen_len - 1
  n = m_groups * b
  return {'latency': pipe['latency'], 'prefill': pipe['prefill'], 'decode': pipe['decode'],
          'step': pipe['decode'] / max(steps, 1), 'tp_comm': tp, 'pp_comm': sum(hops_p) + steps * (sum(hops_d) + back),
          'batch': b, 'groups': m_groups, 'stage_prefill': prefill,
          'stage_decode': decode.sum(axis=1).tolist(),
          'requests_per_s': n / pipe['latency'], 'tokens_per_s': n * setup.gen_len / pipe['latency'],
          'memory': mem}


def plan_stages(plan, replica: int) -> list[StageLayout]:
  return [StageLayout(s.num_layers, list(s.devices)) for s in plan.replicas[replica].stages]


def plan_cost(plan, cluster: Cluster, model: ModelConfig, setup: ServeSetup) -> list[dict]:
  """replica_cost of every replica of a serve Plan: one request alone, and full rounds (one group of
  max_batch requests per stage)."""
  out = []
  for i, r in enumerate(plan.replicas):
    st = plan_stages(plan, i)
    one = replica_cost(cluster, model, st, dataclasses.replace(setup, batch=1), groups=1)
    full = replica_cost(cluster, model, st, dataclasses.replace(setup, batch=max(1, r.max_batch)))
    out.append({'latency_1': one['latency'], 'latency_max_batch': full['latency'],
                'max_batch': max(1, r.max_batch), 'requests_per_s': full['requests_per_s'],
                'tokens_per_s': full['tokens_per_s']})
  return out


def service_time_fn(cluster: Cluster, model: ModelConfig, stages: Sequence[StageLayout], setup: ServeSetup,
                    max_batch: int) -> np.ndarray:
  """Latency of a round of n = 0..max_batch requests (index n; entry 0 is 0) for the dispatch
  simulator, split as the engine splits a round: min(n, stages) groups of at most ceil(n / groups)."""
  times = np.zeros(max_batch + 1)
  for n in range(1, max_batch + 1):
    groups = min(n, len(stages))
    times[n] = replica_cost(cluster, model, stages, dataclasses.replace(setup, batch=-(-n // groups)),
                            groups=groups)['latency']
  return times
