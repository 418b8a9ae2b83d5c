"""The emulated testbed: compute quotas (arithmetic, cgroups), user-space link latency, clean-up."""

import os
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from hetjax import testbed
from hetjax.errors import HetjaxError
from hetjax.parallel.emulated_link import EmulatedLatencyTransport, from_environment, process_delays

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_TESTBED = testbed.why_unavailable()


def check_shares(shares, speeds, cpus, cores):
  quotas = np.array([s.quota for s in shares])
  assert quotas.sum() <= cpus + 1e-9
  assert np.all(quotas <= 1 + 1e-9)
  np.testing.assert_allclose(quotas / quotas.max(), np.asarray(speeds) / max(speeds), rtol=1e-9)
  for c in cores:  # no core carries more than one core of quota
    assert sum(s.quota for s in shares if s.core == c) <= 1 + 1e-9
  assert {s.core for s in shares} <= set(cores)


def test_quotas_issue_example_fills_two_cores():
  shares = testbed.plan_quotas([1, 0.5, 0.25], 2, [0, 1])
  assert [round(s.quota, 6) for s in shares] == [1.0, 0.5, 0.25]
  assert shares[0].core != shares[1].core == shares[2].core
  check_shares(shares, [1, 0.5, 0.25], 2, [0, 1])


def test_quotas_shrink_to_the_budget():
  shares = testbed.plan_quotas([2, 2, 1], 1.0, [0, 1])
  check_shares(shares, [2, 2, 1], 1.0, [0, 1])
  assert sum(s.quota for s in shares) == pytest.approx(1.0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.05, 10), min_size=1, max_size=6), st.floats(0.5, 4),
       st.integers(1, 4))
def test_quotas_property(speeds, cpus, ncores):
  cores = list(range(ncores))
  try:
    shares = testbed.plan_quotas(speeds, cpus, cores)
  except HetjaxError:
    return  # too many processes or too wide a range for the budget: refused in words
  check_shares(shares, speeds, cpus, cores)


@pytest.mark.parametrize('speeds,cpus', [([1, 0], 2), ([1, float('nan')], 2), ([], 2), ([1], 0),
                                         ([1], float('inf'))])
def test_quotas_bad_input(speeds, cpus):
  with pytest.raises(HetjaxError):
    testbed.plan_quotas(speeds, cpus, [0, 1])


class CountingTransport:
  name = 'counting'

  def __init__(self):
    self.moves = 0

  def move(self, wire, wire_shape, src, dst):
    self.moves += 1
    return wire


def test_latency_once_per_transfer_not_per_leaf():
  devices = jax.devices()
  slept = []
  inner = CountingTransport()
  link = EmulatedLatencyTransport(inner, process_delays([[0.0]]), sleep=slept.append)
  link.delay_s = lambda s, d: 0.025
  wire = {'q': jnp.ones(4), 'scale': jnp.ones(2), 'extra': (jnp.zeros(3), jnp.zeros(1))}
  got = link.move(wire, jax.eval_shape(lambda: wire), devices[0], devices[1])
  assert got is wire and inner.moves == 1
  assert slept == [0.025] and link.waited_s == pytest.approx(0.025)
  link.move(wire, None, devices[1], devices[0])
  assert slept == [0.025, 0.025]


def test_latency_from_environment(monkeypatch):
  inner = CountingTransport()
  monkeypatch.delenv('HETJAX_LINK_DELAY_MS', raising=False)
  assert from_environment(inner, lambda *a: None) is inner
  said = []
  monkeypatch.setenv('HETJAX_LINK_DELAY_MS', '[[0, 40], [40, 0]]')
  wrapped = from_environment(inner, said.append)
  assert 'EMULATED' in said[0]
  d = jax.devices()[0]
  assert wrapped.delay_s(d, d) == 0.0  # both on process 0
  for bad in ('[[0, -1], [-1, 0]]', '[1, 2]', 'nope'):
    monkeypatch.setenv('HETJAX_LINK_DELAY_MS', bad)
    with pytest.raises(HetjaxError):
      from_environment(inner, said.append)


def groups_of(pid):
  names = []
  for base in (f'{testbed.CGROUP_ROOT}/cpu', f'{testbed.CGROUP_ROOT}/cpuset', testbed.CGROUP_ROOT):
    if os.path.isdir(base):
      names += [n for n in os.listdir(base) if n.startswith(f'{testbed.PREFIX}{pid}-')]
  return names


def netns_of(pid):
  out = subprocess.run(['ip', 'netns', 'list'], capture_output=True, text=True).stdout
  return re.findall(rf'^hj{pid}n\d+', out, re.M)


# Each process reports its cpu cgroup and the CPU share it got while spinning for 1.5 s.
PROBE = ('import os, time; g = [l.split(":") for l in open("/proc/self/cgroup").read().splitlines()]; '
         'name = [x[2] for x in g if "cpu" in x[1].split(",")][0]; t0 = time.time(); c0 = time.process_time()\n'
         'while time.time() - t0 < 1.5: pass\n'
         'print("GOT", os.environ["HETJAX_PROCESS_ID"], name, (time.process_time() - c0) / (time.time() - t0))')


@pytest.mark.slow
@pytest.mark.skipif(bool(NO_TESTBED), reason=f'testbed unavailable here: {NO_TESTBED}')
def test_two_process_testbed_applies_quotas_and_cleans_up(tmp_path):
  if testbed.cgroup_version() != 1:
    pytest.skip('the probe reads cgroup v1 files')
  r = subprocess.run([sys.executable, '-m', 'hetjax.launch', '-n', '2', '--emulate=local_hetero',
                      '--cpus=1', f'--logs={tmp_path}', '--timeout=60', '--',
                      sys.executable, '-c', PROBE], cwd=ROOT, capture_output=True, text=True,
                     timeout=120)
  assert r.returncode == 0, r.stderr
  assert 'quota (cores)' in r.stdout and 'user-space emulation' in r.stdout
  # local_hetero's first two hosts run at 0.005 and 0.01 TFLOP/s: 1/3 and 2/3 of one core
  table = dict(re.findall(r'^\s+p(\d)\s+([\d.]+)\s+\d+$', r.stdout, re.M))
  assert table == {'0': '0.333', '1': '0.667'}, r.stdout
  got = re.findall(r'GOT (\d) (\S+) ([\d.]+)', r.stdout)
  assert len(got) == 2, r.stdout
  for i, group, share in got:
    assert group.startswith(f'/{testbed.PREFIX}') and group.endswith(f'-p{i}')
    assert float(share) <= float(table[i]) * 1.15 + 0.03, r.stdout  # the quota caps what it got
  # the launcher's account of the run: CPU seconds per group (cpuacct), at least the 1.5 s spin
  # times the share each probe saw, and never more cores than its quota over the whole run
  used = re.findall(r'^\s+p(\d)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$', r.stdout, re.M)
  assert len(used) == 2 and 'cores got' in r.stdout, r.stdout
  share_of = {i: share for i, _, share in got}   # the GOT lines come in whichever order processes print
  for i, quota, cpu, cores, _ in used:
    assert float(cpu) >= 1.5 * float(share_of[i]) * 0.9 and float(cores) <= float(quota) * 1.15 + 0.03
  assert not [n for n in os.listdir(f'{testbed.CGROUP_ROOT}/cpu') if n.startswith(testbed.PREFIX)
              and not testbed._alive(int(n.split('-')[1]))]


@pytest.mark.slow
@pytest.mark.skipif(bool(NO_TESTBED), reason=f'testbed unavailable here: {NO_TESTBED}')
def test_sigkill_of_the_launcher_leaves_nothing_after_the_sweep(tmp_path):
  p = subprocess.Popen([sys.executable, '-m', 'hetjax.launch', '-n', '2', '--emulate=local_hetero',
                        '--cpus=1', f'--logs={tmp_path}', '--', 'sleep', '60'], cwd=ROOT,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 60
  while not groups_of(p.pid) and time.time() < deadline:
    time.sleep(0.2)
  time.sleep(1.0)
  assert groups_of(p.pid) and netns_of(p.pid)
  os.kill(p.pid, signal.SIGKILL)
  p.wait()
  assert groups_of(p.pid)  # a killed launcher cannot clean up itself ...
  testbed.sweep_stale()    # ... the next launcher's start does
  assert not groups_of(p.pid) and not netns_of(p.pid)
  assert not [l for l in subprocess.run(['ip', 'link'], capture_output=True, text=True).stdout
              .splitlines() if re.search(r'\bv\d+x\d+@', l)]


class SleepingTransport:
  """A synthetic link: each move takes latency + bytes / bandwidth."""
  name = 'sleeping'

  def __init__(self, latency_s, bytes_per_s):
    self.latency_s, self.bytes_per_s = latency_s, bytes_per_s

  def move(self, wire, wire_shape, src, dst):
    time.sleep(self.latency_s + wire.nbytes / self.bytes_per_s)
    return wire


def test_link_calibration_recovers_a_known_synthetic_link():
  from hetjax import calibration
  d = jax.devices()
  link = SleepingTransport(0.02, 50e6)  # 20 ms, 400 Mbit/s
  sizes = (64 * 1024, 2 * 1024 * 1024)
  one_way = tuple(calibration.ping_pong(link, d[0], d[1], s, reps=3) for s in sizes)
  fit = calibration.fit_link(sizes, one_way)
  # stated factor: within 1.5x of the synthetic link (sleep overshoots a little on a busy machine)
  assert 0.02 / 1.5 < fit.latency_s < 0.02 * 1.5, fit
  assert 0.4 / 1.5 < fit.bandwidth_gbps < 0.4 * 1.5, fit
  with pytest.raises(HetjaxError):
    calibration.fit_link(sizes, (0.01, 0.01))


@pytest.mark.slow  # a subprocess compiling under load: up to a minute here
def test_calibrate_mode_writes_a_measured_cluster(tmp_path):
  r = subprocess.run([sys.executable, 'run.py', '--config=configs/calibrate.py',
                      '--config.model_overrides.num_layers=1', '--config.calibrate.seq_len=16',
                      '--config.calibrate.micro_batch_size=2', '--config.calibrate.reps=2',
                      f'--config.workdir={tmp_path}'], cwd=ROOT, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  import json
  from hetjax.cluster import Cluster
  d = json.load(open(tmp_path / 'cluster.json'))
  assert d['measured'] is True and d['date'] and len(d['devices']) == 2
  cluster = Cluster.from_dict(d)
  assert np.all(cluster.tflops_array() > 0) and cluster.bandwidth_gbps[0, 1] > 0
  # The runtime's own host time was timed too: an AdamW update takes time; op overhead is >= 0.
  assert all(cluster.update_s_per_layer(i) > 0 and cluster.op_overhead_s(i) >= 0 for i in range(2))


def test_tbf_bucket_keeps_the_latency_bias_near_a_millisecond():
  from hetjax.netem import burst_bytes
  for mbit in (20, 50, 100, 1000, 10000):
    bias_ms = burst_bytes(mbit) * 8 / (mbit * 1e6) * 1e3  # a bucket's worth leaves at line rate
    assert bias_ms <= 1.7, (mbit, bias_ms)  # the old >= 32 KB bucket: 13 ms at 20 Mbit/s
    assert burst_bytes(mbit) >= 2 * 1514  # full-size Ethernet frames still pass


def test_measured_cluster_plans_with_efficiency_one():
  from hetjax.cluster import Cluster
  from hetjax.costmodel.training import TrainSetup, efficiency_for
  d = {'devices': [{'gpu': 'CPU', 'host': 'a', 'region': 'r', 'tflops': 0.01}] * 2,
       'delay_ms': [[0, 1], [1, 0]], 'bandwidth_gbps': [[0, 1], [1, 0]]}
  plain, measured = Cluster.from_dict(d), Cluster.from_dict({**d, 'measured': True})
  assert not plain.measured and measured.measured
  assert efficiency_for(plain) == TrainSetup.efficiency and efficiency_for(measured) == 1.0
  assert efficiency_for(measured, 0.5) == 0.5  # set by hand: kept
  assert Cluster.from_dict(measured.to_dict()).measured and measured.subset([1]).measured
  with pytest.raises(HetjaxError):
    Cluster.from_dict({**d, 'measured': 'yes'})
  with pytest.raises(HetjaxError):
    efficiency_for(plain, float('nan'))


def test_measured_runtime_overheads_enter_the_prediction_by_hand():
  from hetjax.cluster import Cluster
  from hetjax.costmodel import training as cm
  from hetjax.models.config import get_model_config
  from hetjax.plan import Plan, Replica, Stage
  d = {'devices': [{'gpu': 'CPU', 'host': 'a', 'region': 'r', 'tflops': 0.01}] * 2,
       'delay_ms': [[0, 1], [1, 0]], 'bandwidth_gbps': [[0, 1], [1, 0]], 'measured': True}
  timed = {**d, 'devices': [{**d['devices'][0], 'op_overhead_s': 0.002, 'update_s_per_layer': 0.01},
                            {**d['devices'][0], 'op_overhead_s': 0.001, 'update_s_per_layer': 0.03}]}
  plain, measured = Cluster.from_dict(d), Cluster.from_dict(timed)
  assert Cluster.from_dict(measured.to_dict()).devices == measured.devices
  model = get_model_config('tiny_gpt', num_layers=6)
  setup = cm.TrainSetup(global_batch=16, seq_len=32, micro_batch_size=4, efficiency=1.0)
  one = Plan([Replica([Stage(0, 6, [0])])], 6, micro_batches=4, micro_batch_size=4)
  a, b = cm.estimate(one, plain, model, setup), cm.estimate(one, measured, model, setup)
  # one stage, 4 micro-batches: a forward and a backward op each, then 6 layers' epilogue
  assert b['update'] == pytest.approx(6 * 0.01) and a['update'] == 0.0
  assert b['total'] - a['total'] == pytest.approx(4 * 2 * 0.002 + 6 * 0.01)
  two = Plan([Replica([Stage(0, 2, [0]), Stage(2, 6, [1])])], 6, micro_batches=4, micro_batch_size=4)
  assert cm.estimate(two, measured, model, setup)['update'] == pytest.approx(max(2 * 0.01, 4 * 0.03))
  for bad in (-0.001, float('inf'), 'fast'):
    with pytest.raises(HetjaxError):
      Cluster.from_dict({**d, 'devices': [{**d['devices'][0], 'op_overhead_s': bad}] * 2})


@pytest.mark.slow  # compiles and times a block on two devices: about 10 s
def test_pipeline_calibrate_plans_over_what_it_measured(tmp_path):
  import json
  import ml_collections
  from hetjax.cluster import Cluster
  from hetjax.costmodel.training import TrainSetup, estimate
  from hetjax.models.config import get_model_config
  from hetjax.modes.planning import training_plan
  nominal = tmp_path / 'nominal.json'
  nominal.write_text(json.dumps({
      'devices': [{'gpu': 'CPU', 'host': f'h{i}', 'region': 'r', 'tflops': 5.0} for i in range(2)],
      'delay_ms': [[0, 1], [1, 0]], 'bandwidth_gbps': [[0, 1], [1, 0]]}))
  pcfg = ml_collections.ConfigDict(dict(plan='search', cluster=str(nominal), calibrate=True,
                                        micro_batch_size=2, schedule='1f1b', codec='fp32',
                                        search_evaluations=20))
  tcfg = ml_collections.ConfigDict(dict(batch_size=4, seq_len=16))
  model = get_model_config('tiny_gpt', num_layers=2)
  plan = training_plan(pcfg, tcfg, model, 'tiny_gpt', 0, lambda *a, **k: None, str(tmp_path))
  cal = Cluster.load(str(tmp_path / 'calibrated_cluster.json'))
  assert cal.measured and cal.n == 2 and [d.host for d in cal.devices] == ['h0', 'h1']
  assert np.all(cal.tflops_array() < 1.0)  # measured CPU rates, not the nominal 5 TFLOP/s
  setup = TrainSetup(global_batch=4, seq_len=16, micro_batch_size=2, efficiency=1.0, act_bytes=4,
                     recompute=True)
  assert plan.prediction['total'] == pytest.approx(estimate(plan, cal, model, setup)['total'])


@pytest.mark.slow  # two processes on a shaped link, compiling under load: about 40 s
@pytest.mark.skipif(bool(NO_TESTBED), reason=f'testbed unavailable here: {NO_TESTBED}')
def test_link_calibration_on_an_emulated_link(tmp_path):
  import json
  spec = tmp_path / 'link.json'
  spec.write_text(json.dumps({
      'devices': [{'gpu': 'CPU', 'host': f'h{i}', 'region': 'r', 'tflops': 0.01} for i in range(2)],
      'delay_ms': [[0, 30], [30, 0]], 'bandwidth_gbps': [[0, 0.02], [0.02, 0]]}))
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  r = subprocess.run([sys.executable, '-m', 'hetjax.launch', '-n', '2', f'--emulate={spec}',
                      '--cpus=1', '--timeout=200', '--', sys.executable, 'run.py',
                      '--config=configs/calibrate.py', '--config.model_overrides.num_layers=1',
                      '--config.calibrate.seq_len=16', '--config.calibrate.reps=3',
                      f'--config.calibrate.large_bytes={1 << 20}', f'--config.workdir={tmp_path}'],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
  got = json.load(open(tmp_path / 'cluster.json'))
  # tbf at 20 Mbit/s, 30 ms one-way in user space; the fit adds gloo's software latency (a few ms)
  assert 27 < got['delay_ms'][0][1] < 40, got['calibration']['links']
  assert 0.017 < got['bandwidth_gbps'][0][1] < 0.021, got['calibration']['links']
