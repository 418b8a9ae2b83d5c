"""Pipelined decode in the inference cost model (hand-computed cases and the engine's schedule's tick
structure), and the HexGen search choosing a multi-stage replica where stages split the weights."""

import dataclasses

import numpy as np
import pytest

from hetjax.cluster import Cluster
from hetjax.costmodel import inference as icm
from hetjax.errors import HetjaxError
from hetjax.models.config import get_model_config
from hetjax.parallel import schedules
from hetjax.search import hexgen


def test_pipelined_time_hand_computed():
  # 2 stages: prefill 2 and 1 s; decode steps 1 and 3 s (2 steps); hop 0.5 s forward, token back 0.25 s
  args = ([2.0, 1.0], [[1.0, 1.0], [3.0, 3.0]], [0.5], [0.5, 0.25])
  one = icm.pipelined_time(*args, groups=1)
  # wave 2 + 1 + 0.5; each step the ring 1 + 3 + 0.5 + 0.25 = 4.75
  assert one['prefill'] == pytest.approx(3.5)
  assert one['period'].tolist() == pytest.approx([4.75, 4.75])
  assert one['latency'] == pytest.approx(13.0)
  two = icm.pipelined_time(*args, groups=2)
  # the second group enters one busiest prefill (2 s) later; stage 1 (3 s) serves 2 groups per step
  assert two['prefill'] == pytest.approx(5.5)
  assert two['period'].tolist() == pytest.approx([6.0, 6.0])
  assert two['latency'] == pytest.approx(17.5)
  three = icm.pipelined_time(*args, groups=3)
  assert three['latency'] == pytest.approx(3.5 + 2 * 2 + 2 * 9)
  with pytest.raises(HetjaxError, match='groups'):
    icm.pipelined_time(*args, groups=0)


@pytest.mark.parametrize('stages', [1, 2, 3, 4])
def test_pipelined_time_counts_the_ticks_of_the_decode_schedule(stages):
  """Unit-time ops, free hops: the formula equals the number of ticks of schedules.decode, the
  schedule the engine runs, for fewer, as many and more groups than stages."""
  for groups in range(1, 6):
    for tokens in range(1, 5):
      order = schedules.global_order(schedules.decode(stages, groups, tokens))
      ticks = max(op.tick for op in order) + 1
      pred = icm.pipelined_time([1.0] * stages, np.ones((stages, tokens - 1)), [0.0] * (stages - 1),
                                [0.0] * stages, groups)
      assert pred['latency'] == pytest.approx(ticks), (stages, groups, tokens)


def two_hosts(gpu: str) -> Cluster:
  """Two hosts with one GPU each: TP cannot span them, stages can."""
  return Cluster.from_dict({'name': 'two', 'devices': [
      {'gpu': gpu, 'host': 'a', 'region': 'r', 'count': 1},
      {'gpu': gpu, 'host': 'b', 'region': 'r', 'count': 1}],
      'links': {'intra_host': [0.01, 100.0], 'intra_region': [0.1, 25.0], 'inter_region_default': [30.0, 1.0]}})


def test_replica_cost_pipelines_one_group_per_stage():
  c, m = two_hosts('A6000'), get_model_config('llama2_7b')
  setup = icm.ServeSetup(prompt_len=64, gen_len=16, batch=4)
  st = [icm.StageLayout(16, [0]), icm.StageLayout(16, [1])]
  one = icm.replica_cost(c, m, st, setup, groups=1)
  two = icm.replica_cost(c, m, st, setup)            # default: one group per stage
  assert two['groups'] == 2 and one['groups'] == 1
  # equal layers, but the last stage also runs the LM head (longer than a hop), so it is the
  # bottleneck: each token period is 2 x its step, slightly more than one group's ring
  assert two['decode'] == pytest.approx(2 * one['stage_decode'][1])
  assert one['decode'] < two['decode'] < 1.1 * one['decode']
  # the second group's prefill enters one (slowest) stage prefill later
  assert two['prefill'] == pytest.approx(one['prefill'] + max(one['stage_prefill']))
  assert two['requests_per_s'] / one['requests_per_s'] == pytest.approx(
      2 * one['latency'] / two['latency'])
  assert two['requests_per_s'] > 1.5 * one['requests_per_s']
  # the KV cache holds both groups
  assert two['memory'][0]['kv'] == pytest.approx(2 * one['memory'][0]['kv'])
  # a single stage gains nothing from pipelining: groups=1 is its default
  whole = [icm.StageLayout(32, [0])]
  assert icm.replica_cost(c, m, whole, setup)['latency'] == pytest.approx(
      icm.replica_cost(c, m, whole, setup, groups=1)['latency'])


def test_service_times_follow_the_engines_rounds():
  c, m = two_hosts('A6000'), get_model_config('llama2_7b')
  setup = icm.ServeSetup(prompt_len=64, gen_len=16)
  st = [icm.StageLayout(16, [0]), icm.StageLayout(16, [1])]
  times = icm.service_time_fn(c, m, st, setup, 5)
  # 3 requests: groups of 2 and 1 -> two groups of (at most) 2
  assert times[3] == pytest.approx(
      icm.replica_cost(c, m, st, dataclasses.replace(setup, batch=2), groups=2)['latency'])
  assert times[1] == pytest.approx(icm.replica_cost(c, m, st, setup, groups=1)['latency'])


def test_a_measured_memory_bandwidth_sets_the_memory_bound_decode_step():
  c, m = two_hosts('A6000'), get_model_config('llama2_7b')
  half = Cluster(c.name, [dataclasses.replace(d, mem_bw_gbs=c.spec(0).mem_bw_gbs / 2) for d in c.devices],
                 c.delay_ms, c.bandwidth_gbps)
  setup = icm.ServeSetup(prompt_len=64, gen_len=16, batch=1)   # batch 1: memory-bound
  st = [icm.StageLayout(32, [0])]
  assert icm.replica_cost(half, m, st, setup)['step'] == pytest.approx(
      2 * icm.replica_cost(c, m, st, setup)['step'], rel=0.02)


def test_dispatch_rounds_take_a_group_per_stage():
  """The simulator's replica takes what an engine round takes: max_batch requests per stage."""
  from hetjax.inference import dispatch
  from hetjax.plan import Plan, Replica, Stage
  c, m = two_hosts('A6000'), get_model_config('llama2_7b')
  setup = icm.ServeSetup(prompt_len=64, gen_len=16)
  plan = Plan([Replica([Stage(0, 16, [0]), Stage(16, 32, [1])], max_batch=3)], num_layers=32, kind='serve')
  (state,) = dispatch.replicas_from_plan(plan, c, m, setup)
  assert state.max_batch == 6
  # a full round is two groups of 3, decoded pipelined
  assert state.service[6] == pytest.approx(
      icm.replica_cost(c, m, icm.plan_stages(plan, 0), dataclasses.replace(setup, batch=3), groups=2)['latency'])


def test_search_splits_the_weights_over_stages_when_memory_bounds_the_batch():
  """Llama-2-7B on two 16 GB A4000 hosts: one GPU holds the weights with room for 2 requests' KV
  cache; two stages hold half the weights each, decode 2 groups at once and fit far larger
  batches. The search must pick the 2-stage replica over two 1-stage replicas."""
  c, m = two_hosts('A4000'), get_model_config('llama2_7b')
  setup = icm.ServeSetup(prompt_len=512, gen_len=128)
  cfg = hexgen.HexGenConfig(deadline=1000.0, max_batch=64, population=10, evaluations=60)
  res = hexgen.plan_serving(c, m, setup, cfg, seed=0)
  (rep,) = res.plan.replicas
  assert [s.num_layers for s in rep.stages] == [16, 16]
  assert rep.max_batch >= 8
  planner = hexgen.Planner(c, m, setup, cfg)
  apart = planner.score(((1, 0), (0, 1)))
  assert [r.batch for r in apart[1]] == [2, 2]
  assert res.fitness < 2 * apart[0]          # fitness is minus the capacity: more than twice as much


def test_virtual_cpu_devices_share_one_host():
  """JAX's CPU devices are threads on one host's cores: TP does not add compute (and the head, which
  every device of the group runs whole, costs once more per further device) and pipelined groups
  do not overlap, so neither helps in the model."""
  c = Cluster.from_dict({'name': 'cpu', 'devices': [{'gpu': 'CPU', 'host': 'h', 'region': 'r', 'count': 4}],
                         'links': {'intra_host': [0.0, 1e6], 'intra_region': [0.0, 1e6],
                                   'inter_region_default': [0.0, 1e6]}})
  m = get_model_config('tiny_gpt')
  setup = icm.ServeSetup(prompt_len=32, gen_len=8, batch=2)
  one = icm.replica_cost(c, m, [icm.StageLayout(4, [0])], setup)
  tp2 = icm.replica_cost(c, m, [icm.StageLayout(4, [0, 1])], setup)
  head = icm.head_time(m, setup, c.tflops(0), c.mem_bw_gbs(0), 1) / setup.gen_len   # one call
  # free links: no all-reduce cost; the second device's copy of the head at each decode step
  assert tp2['decode'] - one['decode'] == pytest.approx((setup.gen_len - 1) * head, rel=1e-4)
  two = [icm.StageLayout(2, [0]), icm.StageLayout(2, [1])]
  alone = icm.replica_cost(c, m, two, setup, groups=1)
  both = icm.replica_cost(c, m, two, setup, groups=2)
  assert alone['latency'] == pytest.approx(one['latency'], rel=1e-3)
  assert both['requests_per_s'] == pytest.approx(alone['requests_per_s'], rel=1e-3)
  assert both['latency'] == pytest.approx(2 * alone['latency'], rel=1e-3)


def test_host_overheads_per_stage_op_and_per_shared_compute_device():
  """op_overhead_s is paid by every stage op; device_overhead_s by each further device of a TP group
  whose devices share compute (CPU), not by GPUs."""
  cpu = Cluster.from_dict({'name': 'cpu', 'devices': [{'gpu': 'CPU', 'host': 'h', 'region': 'r', 'count': 4}],
                           'links': {'intra_host': [0.0, 1e6], 'intra_region': [0.0, 1e6],
                                     'inter_region_default': [0.0, 1e6]}})
  m = get_model_config('tiny_gpt')
  base = icm.ServeSetup(prompt_len=32, gen_len=8, batch=2)
  over = dataclasses.replace(base, op_overhead_s=1e-3, device_overhead_s=5e-4)
  for layout, extra in (([icm.StageLayout(4, [0])], 1e-3),
                        ([icm.StageLayout(2, [0]), icm.StageLayout(2, [1])], 2e-3),
                        ([icm.StageLayout(4, [0, 1, 2, 3])], 1e-3 + 3 * 5e-4)):
    step = lambda s: icm.replica_cost(cpu, m, layout, s, groups=1)['step']
    assert step(over) - step(base) == pytest.approx(extra, rel=1e-6)
  gpus = two_hosts('A6000')
  st = [icm.StageLayout(16, [0]), icm.StageLayout(16, [1])]
  llama = get_model_config('llama2_7b')
  gap = (icm.replica_cost(gpus, llama, st, over, groups=1)['step']
         - icm.replica_cost(gpus, llama, st, base, groups=1)['step'])
  assert gap == pytest.approx(2e-3, rel=1e-6)
  with pytest.raises(HetjaxError, match='op_overhead_s'):
    dataclasses.replace(base, op_overhead_s=float('nan')).validate()


def test_the_head_runs_whole_on_each_device_at_its_own_efficiency():
  """The engine does not split the LM head over a TP group, so its time does not shrink with tp;
  head_compute_efficiency (0: compute_efficiency) prices its one large matmul."""
  m = get_model_config('tiny_gpt')
  s = icm.ServeSetup(prompt_len=8, gen_len=4, batch=8, compute_efficiency=0.25)
  flops = 2 * 8 * m.hidden * m.vocab_size                 # one call; memory is free at 1e9 GB/s
  assert icm.head_time(m, s, 1.0, 1e9, 1) == pytest.approx(4 * flops / 0.25e12)
  fast = dataclasses.replace(s, head_compute_efficiency=0.5)
  assert icm.head_time(m, fast, 1.0, 1e9, 1) == pytest.approx(4 * flops / 0.5e12)
  assert icm.head_time(m, fast, 1.0, 1e9, 4) == icm.head_time(m, fast, 1.0, 1e9, 1)
  with pytest.raises(HetjaxError, match='head_compute_efficiency'):
    dataclasses.replace(s, head_compute_efficiency=1.5).validate()
