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
