"""Calibration by measurement: per-layer compute rates and link bandwidth/latency.

- Compute: one transformer block at the run's shapes (micro-batch x sequence x hidden), jitted
  forward and backward, timed on a device (mean over >= 0.3 s after a warm-up, so that a CFS
  quota shows as its average rate). The rate is the
  block's analytic FLOPs (ModelConfig.block_flops_per_token; backward = 2x forward) over the time.
- Links: a ping-pong over the real transport (`.move(wire, wire_shape, src, dst)`) at two message
  sizes. Half the round trip is t(s) = latency + s / bandwidth; two sizes give both.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hetjax.errors import HetjaxError
from hetjax.models.config import ModelConfig
from hetjax.models.layers import Block, sharding_scope
from hetjax.parallel.exchange import resolve


@dataclasses.dataclass
class LayerRate:
  forward_s: float      # one block, one micro-batch
  backward_s: float
  forward_flops: float
  cores: float = float('nan')  # CPU time / wall while timing: what this process actually got

  @property
  def tflops(self) -> float:
    """Achieved rate over forward + backward (backward counted as 2x forward FLOPs)."""
    return 3 * self.forward_flops / (self.forward_s + self.backward_s) / 1e12


MIN_WINDOW_S = 0.3  # many CFS periods: a quota-limited process shows its average rate, not a burst


def _mean_time(fn, reps: int) -> tuple[float, float, float]:
  """(mean time per call, wall s, process CPU s) of fn over at least `reps` calls and MIN_WINDOW_S
  seconds, after a warm-up. CPU time / wall is the share of cores the process got: under a CFS
  quota at most the quota, less when the machine is busier than the quotas allow."""
  jax.block_until_ready(fn())  # compile and warm up
  calls, start, cpu = 0, time.perf_counter(), time.process_time()
  while calls < reps or time.perf_counter() - start < MIN_WINDOW_S:
    jax.block_until_ready(fn())
    calls += 1
  wall = time.perf_counter() - start
  return wall / calls, wall, time.process_time() - cpu


def measure_layer(mcfg: ModelConfig, micro_batch: int, seq_len: int, device, reps: int = 5,
                  seed: int = 0) -> LayerRate:
  """Forward and backward time of one block at (micro_batch, seq_len) on `device`."""
  if micro_batch < 1 or seq_len < 1 or reps < 1:
    raise HetjaxError(f'calibration needs positive micro_batch, seq_len and reps, got '
                      f'{micro_batch}, {seq_len}, {reps}')
  with jax.default_device(device):
    with sharding_scope():
      block = Block(mcfg, nnx.Rngs(seed))
    graph, params = nnx.split(block)
    x = jax.random.normal(jax.random.key(seed), (micro_batch, seq_len, mcfg.hidden), jnp.float32)
    positions = jnp.broadcast_to(jnp.arange(seq_len), (micro_batch, seq_len))

    def forward(p, x):
      return nnx.merge(graph, p)(x, positions)[0]

    fwd = jax.jit(forward)

    @jax.jit
    def bwd(p, x, g):  # backward only: the VJP of a recomputed forward, minus the forward below
      _, vjp = jax.vjp(forward, p, x)
      return vjp(g)

    g = jnp.ones_like(x)
    forward_s, wall_f, cpu_f = _mean_time(lambda: fwd(params, x), reps)
    both_s, wall_b, cpu_b = _mean_time(lambda: bwd(params, x, g), reps)
  flops = micro_batch * seq_len * mcfg.block_flops_per_token(seq_len)
  return LayerRate(forward_s, max(both_s - forward_s, 1e-9), flops,
                   (cpu_f + cpu_b) / (wall_f + wall_b))


@dataclasses.dataclass
class RuntimeOverhead:
  op_s: float               # host time of one stage op beyond its compute (dispatch, exchange, sums)
  update_s_per_layer: float  # a step's epilogue (tied sum, norms, AdamW update) per layer of a stage


# The optimizer settings of the timed epilogue (AdamW costs the same whatever its rates).
TIMING_OPTIMIZER = dict(steps=100, lr=1e-3, warmup_steps=0, min_lr_ratio=0.1, weight_decay=0.1,
                        clip_norm=1.0)


def measure_runtime(mcfg: ModelConfig, micro_batch: int, seq_len: int, device, layer: LayerRate,
                    reps: int = 5, seed: int = 0) -> RuntimeOverhead:
  """What the pipeline runtime costs on `device` beyond the layers' compute, timed on the runtime
  itself: two 1-layer stages on the device, M = 2 and 4 micro-batches. A step's schedule takes
  fixed + M x (4 ops x op_s + compute per micro-batch), the compute from `layer` (stage 0 runs the
  forward, then a recomputed forward + backward; stage 1 its forward + backward and the head's, in
  one op); the slope over M gives op_s. The epilogue is timed as the step runs it (without the sum
  over processes, so processes calibrating at once do not wait for each other)."""
  from hetjax.costmodel.training import head_flops_per_token
  from hetjax.parallel.pipeline import Pipeline
  from hetjax.plan import Plan, Replica, Stage
  import ml_collections
  two = dataclasses.replace(mcfg, num_layers=2)
  tcfg = ml_collections.ConfigDict(dict(TIMING_OPTIMIZER, seq_len=seq_len))
  where = jax.devices().index(device)
  rng = np.random.default_rng(seed)
  per_micro, pipe, grads = {}, None, None
  for m in (2, 4):
    # Two plan devices that colocate wraps onto this one.
    plan = Plan([Replica([Stage(0, 1, [where]), Stage(1, 2, [where + len(jax.devices())])])],
                num_layers=2, micro_batches=m, micro_batch_size=micro_batch)
    pipe = Pipeline(plan, two, tcfg, seed=seed, colocate=True)
    tokens = rng.integers(0, two.vocab_size, (m * micro_batch, seq_len))
    inputs, targets, mb, act_shape = pipe._split({'inputs': tokens, 'targets': tokens})
    run = lambda: jax.block_until_ready(pipe.gradients(inputs, targets, None, mb, act_shape)[0])
    per_micro[m] = _mean_time(run, reps)[0]
  grads = pipe.gradients(inputs, targets, None, mb, act_shape)[0]

  def epilogue():
    summed = pipe._sum_tied(list(grads))
    for s, r in enumerate(pipe.runners):
      float(r.programs.sq_norm(summed[s], s == 1))
      r.params, r.opt_state = r.programs.update(r.params, r.opt_state, summed[s], jnp.float32(1e-9))
    return [r.params for r in pipe.runners]

  epilogue_s = _mean_time(epilogue, reps)[0]
  s_per_flop = layer.forward_s / layer.forward_flops
  head = 3 * micro_batch * seq_len * head_flops_per_token(two) * s_per_flop
  compute = 3 * layer.forward_s + 2 * layer.backward_s + head
  op_s = max((per_micro[4] - per_micro[2]) / 2 - compute, 0.0) / 4
  return RuntimeOverhead(op_s, epilogue_s / 2)


@dataclasses.dataclass
class LinkFit:
  latency_s: float
  bandwidth_gbps: float
  one_way_s: tuple[float, float]  # measured at the two sizes


def fit_link(sizes: tuple[int, int], one_way_s: tuple[float, float]) -> LinkFit:
  """latency + size / bandwidth through the two points; a non-increasing pair (noise) is refused."""
  (s1, s2), (t1, t2) = sizes, one_way_s
  if not s2 > s1 or not t2 > t1:
    raise HetjaxError(f'link calibration: the larger message ({s2} B, {t2 * 1e3:.3f} ms) was not '
                      f'slower than the smaller ({s1} B, {t1 * 1e3:.3f} ms); rerun on a quieter '
                      f'machine or with larger sizes')
  bytes_per_s = (s2 - s1) / (t2 - t1)
  return LinkFit(max(t1 - s1 / bytes_per_s, 0.0), bytes_per_s * 8 / 1e9, (t1, t2))


def ping_pong(transport, src, dst, nbytes: int, reps: int = 5) -> float | None:
  """Half the median round trip of an nbytes float32 message src -> dst -> src, as seen on the
  process owning src (None on the other processes, which take part)."""
  n = max(1, nbytes // 4)
  shape = jax.ShapeDtypeStruct((n,), jnp.float32)
  mine = lambda d: d.process_index == jax.process_index()
  msg = jax.device_put(jnp.ones((n,), jnp.float32), src) if mine(src) else None
  times = []
  for _ in range(reps + 1):  # the first trip compiles
    t = time.perf_counter()
    back = resolve(transport.move(msg, shape, src, dst))
    got = resolve(transport.move(back, shape, dst, src))
    if got is not None:
      jax.block_until_ready(got)
    times.append(time.perf_counter() - t)
  return statistics.median(times[1:]) / 2 if mine(src) else None


def calibrated_cluster(name: str, rates_tflops, delay_ms, bandwidth_gbps, gpus, memory_gb,
                       date: str, details: dict, hosts=None, regions=None, op_overhead_s=None,
                       update_s_per_layer=None) -> dict:
  """A configs/clusters/*.json full-form dict, one device per host (default names p<i>), marked
  as measured."""
  n = len(rates_tflops)
  delay, bw = np.array(delay_ms, float), np.array(bandwidth_gbps, float)
  delay, bw = (delay + delay.T) / 2, (bw + bw.T) / 2
  np.fill_diagonal(delay, 0.0)
  np.fill_diagonal(bw, 0.0)
  if not (np.all(np.isfinite(rates_tflops)) and np.all(np.asarray(rates_tflops) > 0)):
    raise HetjaxError(f'calibration measured non-positive or non-finite rates: {list(rates_tflops)}')
  return {'name': name, 'measured': True, 'date': date,
          'devices': [{'id': i, 'gpu': gpus[i], 'host': hosts[i] if hosts else f'p{i}',
                       'region': regions[i] if regions else 'measured',
                       'tflops': float(rates_tflops[i]), 'memory_gb': float(memory_gb[i]),
                       **({} if op_overhead_s is None else
                          {'op_overhead_s': float(op_overhead_s[i]),
                           'update_s_per_layer': float(update_s_per_layer[i])})}
                      for i in range(n)],
          'delay_ms': delay.tolist(), 'bandwidth_gbps': bw.tolist(), 'calibration': details}
