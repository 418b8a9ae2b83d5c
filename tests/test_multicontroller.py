"""Multi-controller runs: local processes joined by jax.distributed (gloo), one per 'host'."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from configs import base
from hetjax.models.config import get_model_config
from hetjax.plan import Plan, Replica, Stage
from hetjax.train import train

pytestmark = pytest.mark.slow  # multi-process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3
# A 3-step run takes 15-60 s here; the launcher stops a group that hangs instead of the test hanging.
LAUNCH_TIMEOUT_S = 240


def launch_args(n, devices, plan_path, workdir, steps=STEPS):
  return [sys.executable, '-m', 'hetjax.launch', '-n', str(n), f'--devices={devices}', '--grace=30',
          f'--timeout={LAUNCH_TIMEOUT_S}',
          '--', sys.executable, 'run.py', '--config=configs/train.py',
          f'--config.pipeline.plan={plan_path}', '--config.model_overrides.num_layers=6',
          f'--config.train.steps={steps}', '--config.train.batch_size=8',
          '--config.train.seq_len=32', '--config.train.eval_every=0', '--config.train.log_every=1',
          f'--config.workdir={workdir}']


def env():
  return {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}


@pytest.fixture(scope='module')
def single_device_losses(tmp_path_factory):
  tcfg = base.train_fields()
  tcfg.update(steps=STEPS, batch_size=8, seq_len=32, eval_every=0, log_every=1)
  workdir = tmp_path_factory.mktemp('single')
  train(get_model_config('tiny_gpt', num_layers=6), tcfg, str(workdir), seed=0,
        print_fn=lambda *a: None)
  return [json.loads(l)['loss'] for l in open(workdir / 'metrics.jsonl')]


@pytest.mark.parametrize('n, devices, replicas, micro', [
    (2, '1,2', [[Stage(0, 2, [0]), Stage(2, 6, [1, 2])]], 4),
    (3, '1,2,4', [[Stage(0, 1, [0]), Stage(1, 3, [1, 2]), Stage(3, 6, [3, 4, 5, 6])]], 4),
    # Data parallel across processes: each stage's gradient average crosses hosts.
    (4, '1', [[Stage(0, 2, [0]), Stage(2, 6, [2])], [Stage(0, 2, [1]), Stage(2, 6, [3])]], 2),
])
def test_processes_match_single_device(tmp_path, single_device_losses, n, devices, replicas, micro):
  plan = Plan([Replica(r) for r in replicas], num_layers=6, micro_batches=micro, micro_batch_size=2)
  plan.save(str(tmp_path / 'plan.json'))
  workdir = tmp_path / 'run'
  r = subprocess.run(launch_args(n, devices, tmp_path / 'plan.json', workdir), cwd=ROOT, env=env(),
                     capture_output=True, text=True, timeout=2 * LAUNCH_TIMEOUT_S)
  assert r.returncode == 0, r.stderr[-3000:]
  records = [json.loads(l) for l in open(workdir / 'metrics.jsonl')]
  losses = [rec['loss'] for rec in records]
  assert len(losses) == STEPS
  assert max(abs(a - b) for a, b in zip(losses, single_device_losses)) < 1e-4, (losses, single_device_losses)
  assert all(rec['bytes_sent'] > 0 for rec in records)


def _children(pid):
  """Pids whose parent is `pid` (from /proc)."""
  kids = []
  for entry in os.listdir('/proc'):
    if entry.isdigit():
      try:
        with open(f'/proc/{entry}/stat') as f:
          if int(f.read().rsplit(')', 1)[1].split()[1]) == pid:
            kids.append(int(entry))
      except (OSError, IndexError, ValueError):
        pass
  return sorted(kids)


def test_killing_one_process_stops_the_group_with_a_clear_error(tmp_path):
  plan = Plan([Replica([Stage(0, 2, [0]), Stage(2, 6, [1])])], num_layers=6, micro_batches=4,
              micro_batch_size=2)
  plan.save(str(tmp_path / 'plan.json'))
  workdir = tmp_path / 'run'
  proc = subprocess.Popen(launch_args(2, '1', tmp_path / 'plan.json', workdir, steps=100000),
                          cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  metrics = workdir / 'metrics.jsonl'
  deadline = time.monotonic() + 300
  while not (metrics.exists() and metrics.stat().st_size > 0):  # training is under way
    assert proc.poll() is None and time.monotonic() < deadline, 'the run did not start'
    time.sleep(1)
  victim = next(pid for pid in _children(proc.pid)
                if b'HETJAX_PROCESS_ID=1\x00' in open(f'/proc/{pid}/environ', 'rb').read())
  os.kill(victim, signal.SIGKILL)
  killed_at = time.monotonic()
  try:
    _, stderr = proc.communicate(timeout=90)
  finally:
    proc.kill()
  assert time.monotonic() - killed_at < 60
  assert proc.returncode != 0
  assert 'error: process 1 was killed by signal 9' in stderr
