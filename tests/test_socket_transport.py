"""The asynchronous socket transport between two processes: exact data, a sender that never waits
for a busy receiver, and emulated latency that overlaps the receiver's compute."""

import json
import subprocess
import sys

import pytest

from tests.test_multicontroller import ROOT, env

pytestmark = pytest.mark.slow  # spawns processes

PROBE = r'''
import json, sys, time
sys.path.insert(0, {root!r})
import jax, jax.numpy as jnp, numpy as np
from hetjax import distributed
distributed.initialize()
from hetjax.parallel.emulated_link import EmulatedLatencyTransport
from hetjax.parallel.exchange import resolve
from hetjax.parallel.socket_transport import SocketTransport

me = jax.process_index()
d0, d1 = jax.devices()  # one device per process
transport = SocketTransport()

def message(k):
  return {{'f32': np.arange(6, dtype=np.float32).reshape(2, 3) * k,
           'i8': (np.arange(5) - k).astype(np.int8),
           'bf16': np.full((4,), k + 0.5, jnp.bfloat16)}}

spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), message(0))
same = lambda a, b: all(np.array_equal(np.asarray(x), np.asarray(y))
                        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
out = {{}}
# 1. Ten messages to a receiver that is busy for 1 s first: the sender does not wait for it.
distributed.barrier('probe/1')
if me == 0:
  t = time.perf_counter()
  for k in range(10):
    assert transport.move(jax.device_put(message(k), d0), spec, d0, d1) is None
  out['send_s'] = time.perf_counter() - t
else:
  pending = [transport.move(None, spec, d0, d1) for _ in range(10)]
  time.sleep(1.0)
  got = [resolve(p) for p in pending]
  out['exact'] = all(same(g, message(k)) for k, g in enumerate(got))
  out['on_device'] = all(x.devices() == {{d1}} for g in got for x in jax.tree.leaves(g))
  # 2. Back the other way, each message echoed.
  for g in got:
    transport.move(g, spec, d1, d0)
if me == 0:
  back = [resolve(transport.move(None, spec, d1, d0)) for _ in range(10)]
  out['echo_exact'] = all(same(g, message(k)) for k, g in enumerate(back))
# 3. Emulated latency of 0.5 s while the receiver computes for 0.4 s: it waits about 0.5 s in all
#    (the delay runs from the arrival, alongside the compute), not 0.9 s.
delayed = EmulatedLatencyTransport(transport, lambda src, dst: 0.5)
distributed.barrier('probe/3')
t = time.perf_counter()
if me == 0:
  delayed.move(jax.device_put(message(1), d0), spec, d0, d1)
else:
  pending = delayed.move(None, spec, d0, d1)
  time.sleep(0.4)  # compute meanwhile
  out['latency_exact'] = same(resolve(pending), message(1))
  out['latency_total_s'] = time.perf_counter() - t
print('PROBE ' + json.dumps(out), flush=True)
distributed.barrier('probe/end')
'''


def test_two_processes_move_exact_data_without_waiting_for_each_other(tmp_path):
  probe = tmp_path / 'probe.py'
  probe.write_text(PROBE.format(root=ROOT))
  r = subprocess.run([sys.executable, '-m', 'hetjax.launch', '-n', '2', '--grace=30', '--timeout=180',
                      '--', sys.executable, str(probe)], cwd=ROOT, env=env(), capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  found = {}
  for line in r.stdout.splitlines():
    if 'PROBE ' in line:
      found.update(json.loads(line[line.index('PROBE ') + 6:]))
  assert found['exact'] and found['on_device'] and found['echo_exact'] and found['latency_exact'], found
  assert found['send_s'] < 0.5, found          # the receiver slept 1 s before taking any
  assert 0.49 <= found['latency_total_s'] < 0.8, found  # 0.9 s if latency and compute serialised


def test_a_multi_controller_profile_merges_every_process_and_times_only_real_ops(tmp_path):
  """Each process records only the ops it runs; the leader's timeline holds every stage's ops
  once, from both processes, and a forward takes real time (not a skipped op's microseconds)."""
  from hetjax.plan import Plan, Replica, Stage
  from tests.test_multicontroller import launch_args
  plan = Plan([Replica([Stage(0, 3, [0]), Stage(3, 6, [1])])], num_layers=6, micro_batches=2,
              micro_batch_size=4)
  plan.save(str(tmp_path / 'plan.json'))
  workdir = tmp_path / 'run'
  r = subprocess.run(launch_args(2, '1', tmp_path / 'plan.json', workdir, steps=2)
                     + ['--config.pipeline.profile_every=2'], cwd=ROOT, env=env(),
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  trace = json.load(open(workdir / 'timeline.json'))['traceEvents']
  ops = [e for e in trace if e['ph'] == 'X']
  assert sorted((e['pid'], e['tid'], e['name']) for e in ops) == sorted(
      [(0, 0, f'{k}{m}') for k in 'FB' for m in range(2)]
      + [(1, 1, f'F+B{m}') for m in range(2)] + [(1, 1, f'B{m}') for m in range(2)])
  forwards = [e['dur'] for e in ops if e['name'].startswith('F')]
  assert min(forwards) > 200, forwards  # microseconds: three layers' compute, not a skipped op
  rows = [json.loads(l) for l in open(workdir / 'metrics.jsonl')]
  assert rows[-1]['stage0_fwd_s'] > 0 and rows[-1]['stage1_fwd_s'] > 0
