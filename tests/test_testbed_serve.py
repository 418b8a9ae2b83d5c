"""experiments/testbed_serve.py: the prediction's arithmetic (fast) and a short run on the testbed (slow)."""

import csv
import os
import subprocess
import sys

import numpy as np
import pytest

from hetjax import testbed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'experiments', 'testbed_serve.py')
NO_TESTBED = testbed.why_unavailable()



def test_runtime_period_one_stage_is_host_then_compute(experiment):
  # One stage: host 2 s, then compute 5 - 2 = 3 s; the head waits for its token: 5 s per token.
  ts = experiment('testbed_serve')
  period = ts.runtime_period([0], [2.0], [5.0], [5.0], lambda a, b, n: 0.0, lambda a, b: 0.0, T=4,
                             act_bytes=1, prompt_bytes=1, token_bytes=1)
  assert period == pytest.approx(5.0)


def test_runtime_period_two_stages_serialise_through_blocking_transfers(experiment):
  # Two processes, two groups, one decode step (T = 2), no compute: host 1 s (p0) and 2 s (p1) per
  # op; each transfer holds both hosts 0.5 s, then the receiver sleeps 0.25 s. By hand, in the
  # global order (h0, h1: the two hosts' clocks after each event):
  #   P(s0,g0) h0 1; act -> p1: 1-1.5, h1 1.75 | P(s0,g1) h0 2.5; act: 2.5-3, h1 3.25
  #   P(s1,g0) h1 5.25 = token g0 #0; token -> p0: 5.25-5.75, h0 6
  #   D(s0,g0) h0 7; act: 7-7.5, h1 7.75 | P(s1,g1) h1 9.75 = token g1 #0; token -> p0: h0 10.5
  #   D(s0,g1) h0 11.5; act: 11.5-12, h1 12.25 | D(s1,g0) h1 14.25 = token g0 #1
  #   D(s1,g1) h1 16.25 = token g1 #1
  # periods 14.25 - 5.25 = 9 and 16.25 - 9.75 = 6.5: mean 7.75 s. (The cost model's pipelined
  # period for these terms: ring 1 + 2 + 2 x 0.75 = 4.5 s, as if hops and stages overlapped.)
  ts = experiment('testbed_serve')
  period = ts.runtime_period([0, 1], [1.0, 2.0], [1.0, 2.0], [1.0, 2.0], lambda a, b, n: 0.5,
                             lambda a, b: 0.25, T=2, act_bytes=1, prompt_bytes=1, token_bytes=1)
  assert period == pytest.approx(7.75)


def test_stage_overhead_overrides_the_setup_overhead():
  from hetjax.cluster import Cluster, Device
  from hetjax.costmodel import inference as icm
  from hetjax.models.config import get_model_config
  model = get_model_config('tiny_gpt', num_layers=4)
  c = Cluster('t', [Device(i, 'CPU', f'h{i}', 'r', tflops=0.01, memory_gb=2) for i in range(2)],
              np.zeros((2, 2)), np.ones((2, 2)))
  setup = icm.ServeSetup(prompt_len=8, gen_len=5, op_overhead_s=0.001)
  plain = icm.replica_cost(c, model, [icm.StageLayout(2, [0]), icm.StageLayout(2, [1])], setup)
  own = icm.replica_cost(c, model, [icm.StageLayout(2, [0], overhead_s=0.004), icm.StageLayout(2, [1])],
                         setup)
  # stage 0 pays 3 ms more in each of its 4 decode steps; stage 1 is unchanged
  assert own['stage_decode'][0] - plain['stage_decode'][0] == pytest.approx(4 * 0.003)
  assert own['stage_decode'][1] == pytest.approx(plain['stage_decode'][1])


def test_scaled_layer_split(experiment):
  ts = experiment('testbed_serve')
  assert ts.scaled([(0, 4), (1, 2)], 6) == [(0, 4), (1, 2)]
  assert ts.scaled([(0, 3), (1, 2), (2, 1)], 12) == [(0, 6), (1, 4), (2, 2)]
  assert [n for _, n in ts.scaled([(0, 3), (1, 2), (2, 1)], 3)] == [1, 1, 1]


@pytest.mark.slow  # 2 processes, a calibration and 4 serving runs under the testbed: 4-6 minutes
@pytest.mark.skipif(bool(NO_TESTBED), reason=f'testbed unavailable here: {NO_TESTBED}')
def test_short_run_on_one_scenario(tmp_path):
  r = subprocess.run([sys.executable, SCRIPT, '--scenarios=two_uneven', '--batches=1', '--rounds=1',
                      '--tokens=4', f'--out={tmp_path}/'], cwd=ROOT, capture_output=True, text=True,
                     timeout=1200)
  assert r.returncode == 0, r.stderr[-2000:]
  rows = list(csv.DictReader(open(tmp_path / 'results.csv')))
  assert [(x['plan'], x['role'], x['stages']) for x in rows] == [
      ('alone', 'fit', 'p0:1'), ('alone', 'fit', 'p1:1'), ('alone', 'fit', 'p0:6'), ('alone', 'fit', 'p1:6'),
      ('fast+slow', 'prediction', 'p0:4 p1:2'), ('slow+fast', 'prediction', 'p1:3 p0:3')]
  for x in rows:
    assert 0 < float(x['measured_ms']) < 10_000 and 0 < float(x['predicted_ms']) < 10_000
  assert (tmp_path / 'testbed_serve.png').stat().st_size > 0
  assert r.stdout.strip().splitlines()[-1].startswith('two_uneven')   # the table is printed last
  # serving applied the emulated latency (the launcher's 1 ms between the two processes)
  log = open(tmp_path / 'runs' / 'two_uneven' / 'fast_slow' / 'b1' / 'launch' / 'p0.log').read()
  assert 'EMULATED latency' in log


# ---------------------------------------------------------------- --compare (hetjax vs symmetric)
def _rec(rid, first, done, tokens=4, replica=0):
  return {'id': rid, 'ttft_s': first, 'latency_s': done, 'ids': list(range(tokens)), 'replica': replica}


def test_round_stats_by_hand(experiment):
  # Three joint static rounds, all requests arriving at once, 4 tokens each. Replica 0 (2 requests a
  # round) ends the rounds: round 0 (compiling) at 10 s, round 1 at 12 s (done at 11.5, 12), round 2
  # at 15 s (done at 14, 15). Replica 1 (1 request a round) is faster and its process's clock reads
  # 3 s less: real times done 6 (round 0), first 10.3 / done 11 (round 1), first 12.3 / done 13.5.
  ts = experiment('testbed_serve')
  recs = [_rec('0-0', 9, 9.5), _rec('0-1', 9.2, 10), _rec('1-0', 10.5, 11.5), _rec('1-1', 10.6, 12),
          _rec('2-0', 12.5, 14), _rec('2-1', 12.4, 15),
          _rec('0-2', 2.0, 3.0, replica=1), _rec('1-2', 7.3, 8.0, replica=1), _rec('2-2', 9.3, 10.5, replica=1)]
  s = ts.round_stats(recs)
  assert s['rounds'] == 2 and s['requests'] == 6 and s['reference'] == 0
  # replica 0 is busy longest from its first token to its last (1.5 and 2.6 s a round, replica 1
  # 0.7 and 1.2 s); replica 1's own span (10.5 - 3 = 7.5 s) would hold its wait in round 0
  assert s['tokens_per_s'] == pytest.approx(6 * 4 / (15 - 10))
  # replica 0's latencies from its round's start: 1.5, 2 (round 1), 2, 3 (round 2)
  assert s['latency_p50_s'] == pytest.approx(2.0)
  assert s['latency_p99_s'] == pytest.approx(np.percentile([1.5, 2, 2, 3], 99))
  # a block whose request got its first token before its replica's block before it ended is not a round
  bad = [dict(r, ttft_s=11.9) if r['id'] == '2-0' else r for r in recs]
  with pytest.raises(ValueError, match='block 2 is not a round of replica 0'):
    ts.round_stats(bad)
  with pytest.raises(ValueError, match='blocks 0..R'):
    ts.round_stats(recs[:2])
  with pytest.raises(ValueError, match=r'\(2, 1\)'):
    ts.round_stats(recs[:-1])


def test_lockstep_tokens_per_s_waits_for_the_slowest_replica(experiment):
  ts = experiment('testbed_serve')
  # replicas with rounds of 0.2 s (32 tokens) and 0.5 s (64 tokens): independent 32/0.2 + 64/0.5 =
  # 288 tokens/s; in joint rounds every round takes 0.5 s: 96 / 0.5 = 192 tokens/s
  assert ts.lockstep_tokens_per_s([0.2, 0.5], [32, 64]) == pytest.approx(192.0)


def test_fitted_overhead_is_linear_in_layers_and_never_negative(experiment):
  ts = experiment('testbed_serve')
  fits = {(0, 1): 0.005, (0, 6): 0.010, (1, 1): 0.012, (1, 6): 0.002}
  over = ts.fitted_overhead(fits, 2, 6)
  assert over(0, 1) == pytest.approx(0.005) and over(0, 3) == pytest.approx(0.007)
  assert over(1, 6) == pytest.approx(0.002) and over(1, 9) == 0.0   # 0.012 - 8 x 0.002 < 0


def test_replica_predictions_pay_the_fitted_overhead_per_op(experiment):
  # One single-stage replica of max_batch 2 on device 1: one group, gen_len ops (a prefill and
  # gen_len - 1 decode steps), each paying the stage's overhead: 0.003 + 0.001 x (4 - 1) = 6 ms.
  from hetjax.cluster import Cluster, Device
  from hetjax.costmodel import inference as icm
  from hetjax.models.config import get_model_config
  from hetjax.plan import Plan, Replica, Stage
  ts = experiment('testbed_serve')
  model = get_model_config('tiny_gpt', num_layers=4)
  c = Cluster('t', [Device(i, 'CPU', f'h{i}', 'r', tflops=0.01, memory_gb=2) for i in range(2)],
              np.zeros((2, 2)), np.ones((2, 2)))
  setup = icm.ServeSetup(prompt_len=8, gen_len=5, bytes_per_value=4)
  plan = Plan([Replica([Stage(0, 4, [1])], max_batch=2)], num_layers=4, kind='serve')
  latency, tokens = ts.replica_predictions(c, model, setup, plan, lambda p, k: 0.003 + 0.001 * (k - 1))
  bare = icm.replica_cost(c, model, [icm.StageLayout(4, [1], overhead_s=0.0)], icm.ServeSetup(
      prompt_len=8, gen_len=5, bytes_per_value=4, batch=2))['latency']
  assert latency == [pytest.approx(bare + 5 * 0.006)] and tokens == [2 * 5]
  assert ts.describe_plan(plan) == 'p1:4 b2'


def _two_devices(overheads):
  from hetjax.cluster import Cluster, Device
  return Cluster('t', [Device(i, 'CPU', f'h{i}', 'r', tflops=0.01, memory_gb=2, op_overhead_s=o)
                       for i, o in enumerate(overheads)], np.ones((2, 2)), np.ones((2, 2)))


def test_hexgen_prices_each_stage_with_its_devices_measured_overhead():
  from hetjax.costmodel import inference as icm
  from hetjax.models.config import get_model_config
  from hetjax.search import hexgen
  from hetjax.search.hexgen_inner import make_pools
  model = get_model_config('tiny_gpt', num_layers=4)
  setup = icm.ServeSetup(prompt_len=8, gen_len=5, op_overhead_s=0.001)
  cfg = hexgen.HexGenConfig(objective='latency', rate=0.01, max_batch=1, population=8, evaluations=50)
  measured = hexgen.Planner(_two_devices([0.002, 0.05]), model, setup, cfg)
  q = {p.devices[0]: i for i, p in enumerate(measured.pools)}
  assert [s.overhead_s for s in measured.devices([(q[0], 1, 4)])] == [0.002]     # the cluster's, not the setup's
  assert [s.overhead_s for s in measured.devices([(q[1], 1, 4)])] == [0.05]
  # one stage, one request: gen_len = 5 ops, each 2 ms of host time over the bare compute
  bare = icm.replica_cost(measured.cluster, model, [icm.StageLayout(4, [0], overhead_s=0.0)], setup,
                          groups=1)['latency']
  assert measured.exact([(q[0], 1, 4)], 1, groups=1)['latency'] == pytest.approx(bare + 5 * 0.002)
  # a given overhead(devices, layers) wins over the cluster's; a datasheet cluster keeps the setup's
  fitted = hexgen.Planner(_two_devices([0.002, 0.05]), model, setup, cfg, lambda d, k: 0.01 * k)
  assert [s.overhead_s for s in fitted.devices([(q[0], 1, 4)])] == [0.04]
  datasheet = hexgen.Planner(_two_devices([None, None]), model, setup, cfg)
  assert [s.overhead_s for s in datasheet.devices([(0, 1, 4)])] == [None]
  # devices with different measured overheads are not interchangeable: separate pools on one host
  from hetjax.cluster import Cluster, Device
  same_host = Cluster('s', [Device(i, 'CPU', 'h', 'r', tflops=0.01, memory_gb=2, op_overhead_s=o)
                            for i, o in enumerate([0.001, 0.002])], np.ones((2, 2)), np.ones((2, 2)))
  assert len(make_pools(same_host)) == 2
  # the plan follows the overhead: identical devices serve as two replicas (less waiting), but
  # device 1's 50 ms per op (250 ms a request) leaves it out at this low rate
  both = hexgen.plan_serving(_two_devices([None, None]), model, setup, cfg)
  one = hexgen.plan_serving(_two_devices([0.002, 0.05]), model, setup, cfg)
  assert sorted(r.devices for r in both.plan.replicas) == [[0], [1]]
  assert [r.devices for r in one.plan.replicas] == [[0]]
  assert one.plan.prediction['latency_1_min_s'] == pytest.approx(bare + 5 * 0.002)


def _uneven_pair(model, tokens, block_s):
  """A measured-looking two_uneven cluster: device i runs one block of `tokens` tokens in block_s[i]."""
  from hetjax.cluster import Cluster, Device
  flops = tokens * model.block_flops_per_token(1)
  return Cluster('two_uneven', [Device(i, 'CPU', f'h{i}', 'emulated', tflops=flops / t / 1e12, memory_gb=2,
                                       mem_bw_gbs=1e9) for i, t in enumerate(block_s)],
                 np.array([[0, 4.0], [4.0, 0]]), np.array([[0, 0.8], [0.8, 0]]), measured=True)


def test_compare_plans_with_a_fake_server(experiment, monkeypatch, tmp_path):
  # The whole --compare path on a calibrated-looking 2-device cluster, serving replaced by a fake
  # that writes static rounds of 0.5 s (round 0: 5 s): both searches choose the same plan here
  # (each device a one-stage replica: the fitted overheads make pipelines lose), so the plan is
  # served once per transport and the ratio row says so.
  from hetjax.costmodel import inference as icm
  from hetjax.models.config import get_model_config
  ts = experiment('testbed_serve')
  model = get_model_config('tiny_gpt', num_layers=6)
  c = _uneven_pair(model, 4, [0.25e-3, 1.3e-3])
  setup = icm.ServeSetup(prompt_len=16, gen_len=16, batch=4, bytes_per_value=4, compute_efficiency=1.0,
                         memory_efficiency=1.0)
  fits = {(0, 1): 0.010, (0, 6): 0.008, (1, 1): 0.009, (1, 6): 0.014}
  calls = []

  def fake_serve(cluster_path, n, plan_path, per_round, batch, workdir, what, dispatch, transport):
    calls.append((os.path.basename(os.path.dirname(plan_path)), transport, per_round, dispatch))
    recs = []
    for k in range(4):
      start, end = (0.0, 5.0) if k == 0 else (5.0 + 0.5 * (k - 1), 5.0 + 0.5 * k)
      recs += [{'id': f'{k}-{i}', 'ttft_s': start + 0.01, 'latency_s': end - 0.1 * (i % 2),
                'ids': [0] * 16, 'replica': i % 2} for i in range(per_round)]
    return recs, 1.0

  monkeypatch.setattr(ts, 'serve', fake_serve)
  rows = ts.compare_plans('two_uneven', 2, 'nominal.json', c, setup, ts.fitted_overhead(fits, 2, 6),
                          model, 4, str(tmp_path), {'op_overhead_s': [0.001, 0.002]}, ['socket', 'pair'],
                          8.0)
  assert [(r['transport'], r['system']) for r in rows] == [
      ('socket', 'hetjax'), ('socket', 'symmetric'), ('socket', 'hetjax/symmetric'),
      ('pair', 'hetjax'), ('pair', 'symmetric'), ('pair', 'hetjax/symmetric')]
  het, sym, ratio = rows[:3]
  assert het['plan'] == sym['plan'] and ratio['plan'] == 'same plan'
  assert sym['note'] == 'same plan as hetjax: its run' and ratio['measured_tok_s'] == 1.0
  assert calls == [('hetjax', 'socket', 8, 'shortest_completion'), ('hetjax', 'pair', 8, 'shortest_completion')]
  # the fake's timed rounds: 3 x 8 requests x 16 tokens in 1.5 s; latency from the round's start
  assert het['measured_tok_s'] == pytest.approx(3 * 8 * 16 / 1.5, rel=1e-3)
  assert het['measured_p99_ms'] == pytest.approx(500.0)
  assert het['predicted_tok_s'] > het['predicted_lockstep_tok_s'] > 0
  assert os.path.isfile(tmp_path / 'compare_b4' / 'symmetric' / 'plan.json')
  ts.plot_compare(rows, str(tmp_path / 'c.png'))
  assert (tmp_path / 'c.png').stat().st_size > 0


def test_capped_memory_holds_exactly_the_layers_asked(experiment):
  from hetjax.costmodel import inference as icm
  from hetjax.models.config import get_model_config
  ts = experiment('testbed_serve')
  model = get_model_config('tiny_gpt', num_layers=6)
  setup = icm.ServeSetup(prompt_len=16, gen_len=16, batch=1, bytes_per_value=4)
  for layers in (2, 4, 5):
    gb = ts.capped_memory_gb(model, setup, layers, groups=2)
    assert icm.layers_that_fit(model, setup, 1, gb * 1e9, True, True, groups=2) == layers


def test_compare_plans_serves_both_when_the_plans_differ(experiment, monkeypatch, tmp_path):
  # Devices told to hold at most 5 of the 6 layers: one replica must pipeline over both; hetjax
  # splits its layers unevenly (the fast device takes more), the symmetric baseline 3 + 3. Both plans
  # are served, and the ratio row divides their measurements.
  from hetjax.costmodel import inference as icm
  from hetjax.models.config import get_model_config
  ts = experiment('testbed_serve')
  model = get_model_config('tiny_gpt', num_layers=6)
  c = _uneven_pair(model, 1, [0.25e-3, 1.0e-3])
  setup = icm.ServeSetup(prompt_len=16, gen_len=16, batch=1, bytes_per_value=4, compute_efficiency=1.0,
                         memory_efficiency=1.0)
  fits = {(0, 1): 0.0055, (0, 6): 0.0081, (1, 1): 0.012, (1, 6): 0.0169}
  seconds = {'hetjax': 0.4, 'symmetric': 0.5}

  def fake_serve(cluster_path, n, plan_path, per_round, batch, workdir, what, dispatch, transport):
    r = seconds[os.path.basename(os.path.dirname(plan_path))]
    return [{'id': f'{k}-{i}', 'ttft_s': 5.0 + r * (k - 1) + 0.01 if k else 0.1,
             'latency_s': 5.0 + r * k if k else 5.0, 'ids': [0] * 16, 'replica': 0}
            for k in range(3) for i in range(per_round)], 1.0

  monkeypatch.setattr(ts, 'serve', fake_serve)
  rows = ts.compare_plans('two_uneven', 2, 'nominal.json', c, setup, ts.fitted_overhead(fits, 2, 6),
                          model, 1, str(tmp_path), {}, ['socket'], 8.0, device_layers=5)
  het, sym, ratio = rows
  assert het['plan'] == 'p0:5+p1:1 b1' and sym['plan'] == 'p0:3+p1:3 b1'
  assert ratio['plan'] == 'different plans' and het['device_layers'] == 5
  assert ratio['measured_tok_s'] == pytest.approx(0.5 / 0.4, rel=1e-3)
  assert ratio['predicted_tok_s'] == pytest.approx(het['predicted_tok_s'] / sym['predicted_tok_s'], rel=1e-2)
  assert ratio['predicted_tok_s'] > 1
  assert os.path.isfile(tmp_path / 'compare_b1_l5' / 'hetjax' / 'plan.json')


def test_round_stats_from_round_two(experiment):
  # The same rounds as test_round_stats_by_hand, timed from round 2: replica 0 (busy 2.6 s against
  # 1.2 s) ends rounds 1 and 2 at 12 and 15 s; replica 1's own span, 10.5 - 8 = 2.5 s, is not the
  # rounds' (it waited 1 s in round 1 and 1.5 s in round 2)
  ts = experiment('testbed_serve')
  recs = [_rec('0-0', 9, 9.5), _rec('0-1', 9.2, 10), _rec('1-0', 10.5, 11.5), _rec('1-1', 10.6, 12),
          _rec('2-0', 12.5, 14), _rec('2-1', 12.4, 15),
          _rec('0-2', 2.0, 3.0, replica=1), _rec('1-2', 7.3, 8.0, replica=1), _rec('2-2', 9.3, 10.5, replica=1)]
  s = ts.round_stats(recs, warmup=2)
  assert s['rounds'] == 1 and s['requests'] == 3 and s['reference'] == 0
  assert s['tokens_per_s'] == pytest.approx(3 * 4 / 3.0)
  assert s['latency_p99_s'] == pytest.approx(np.percentile([14 - 12, 15 - 12], 99))
  with pytest.raises(ValueError, match='warmup'):
    ts.round_stats(recs, warmup=3)
