"""Multi-controller runs: local processes joined by jax.distributed (gloo), one per 'host'."""

import json
import os
import shutil
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


def _start_and_signal(tmp_path, sig, victim_index=1):
  """A 3-process pipeline run; once it trains, send `sig` to one process. Returns (launcher
  stderr, seconds from the signal to the launcher's exit, launcher exit code)."""
  plan = Plan([Replica([Stage(0, 2, [0]), Stage(2, 4, [1]), Stage(4, 6, [2])])], num_layers=6,
              micro_batches=4, micro_batch_size=2)
  plan.save(str(tmp_path / 'plan.json'))
  workdir = tmp_path / 'run'
  args = launch_args(3, '1', tmp_path / 'plan.json', workdir, steps=100000)
  args[args.index('--grace=30')] = '--grace=5'
  proc = subprocess.Popen(args, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  metrics = workdir / 'metrics.jsonl'
  deadline = time.monotonic() + 300
  while not (metrics.exists() and metrics.stat().st_size > 0):  # training is under way
    assert proc.poll() is None and time.monotonic() < deadline, 'the run did not start'
    time.sleep(1)
  victim = next(pid for pid in _children(proc.pid)
                if f'HETJAX_PROCESS_ID={victim_index}\x00'.encode() in open(f'/proc/{pid}/environ', 'rb').read())
  os.kill(victim, sig)
  signalled_at = time.monotonic()
  try:
    stdout, stderr = proc.communicate(timeout=120)
  finally:
    proc.kill()
  assert not any(l.startswith('[p') and 'Gloo' in l for l in stdout.splitlines())
  assert (workdir / 'launch' / f'p{victim_index}.log').exists()  # raw logs kept
  return stderr, time.monotonic() - signalled_at, proc.returncode


@pytest.mark.slow
def test_a_frozen_process_is_named_not_the_peers_that_exit_first(tmp_path):
  stderr, seconds, code = _start_and_signal(tmp_path, signal.SIGSTOP, victim_index=1)
  assert code == 1 and seconds < 40, (seconds, stderr)
  summary = [l for l in stderr.splitlines() if not l.startswith('[p')]
  assert summary[0].startswith('error: process 1 was frozen'), stderr
  assert len(summary) <= 3, summary  # one line per failed process, no gloo/gRPC noise


THREE_STAGES = [Stage(0, 2, [0]), Stage(2, 4, [1]), Stage(4, 6, [2])]


def _metrics(workdir):
  return [json.loads(l) for l in open(workdir / 'metrics.jsonl')]


def test_three_processes_killed_and_restarted_resume_exactly(tmp_path):
  """Every process writes its own stage; SIGKILL of the whole group after the first committed
  step; the restarted group resumes and matches an uninterrupted run. Then one device, under
  another split, resumes the processes' checkpoint and matches too."""
  steps, every = 40, 10
  Plan([Replica(THREE_STAGES)], num_layers=6, micro_batches=4, micro_batch_size=2).save(
      str(tmp_path / 'plan.json'))
  ckpt_args = [f'--config.ckpt.every={every}', '--config.ckpt.keep=0']

  def start(workdir):
    return subprocess.Popen(launch_args(3, '1', tmp_path / 'plan.json', workdir, steps) + ckpt_args,
                            cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
  straight = start(tmp_path / 'straight')
  killed = tmp_path / 'killed'
  proc = start(killed)
  committed = killed / 'checkpoints' / str(every) / 'meta.json'
  deadline = time.monotonic() + 300
  while not committed.exists():
    assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
    time.sleep(0.02)
  for pid in _children(proc.pid) + [proc.pid]:  # the whole group at once
    os.kill(pid, signal.SIGKILL)
  proc.wait()
  assert _metrics(killed)[-1]['step'] < steps, 'the run finished before it could be killed'
  assert straight.wait(timeout=2 * LAUNCH_TIMEOUT_S) == 0, straight.stderr.read()[-3000:]

  r = subprocess.run(launch_args(3, '1', tmp_path / 'plan.json', killed, steps) + ckpt_args,
                     cwd=ROOT, env=env(), capture_output=True, text=True,
                     timeout=2 * LAUNCH_TIMEOUT_S)
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'resumed from' in r.stdout, r.stdout[-2000:]
  want, got = _metrics(tmp_path / 'straight'), _metrics(killed)
  assert [x['step'] for x in got] == [x['step'] for x in want] == list(range(1, steps + 1))
  assert [x['loss'] for x in got] == [x['loss'] for x in want]  # exact
  step_dirs = sorted(int(d) for d in os.listdir(killed / 'checkpoints') if d.isdigit())
  assert step_dirs == list(range(every, steps + 1, every))
  assert sorted(os.listdir(killed / 'checkpoints' / str(steps))) == [
      '_CHECKPOINT_METADATA', 'index-p0.json', 'index-p1.json', 'index-p2.json', 'meta.json',
      'p0_stage0_0_2.npz', 'p1_stage0_2_4.npz', 'p2_stage0_4_6.npz']  # each process its own stage

  # One device (one stage holding all layers) resumes the processes' step 30.
  single = tmp_path / 'single'
  shutil.copytree(killed, single)
  shutil.rmtree(single / 'checkpoints' / str(steps))
  tcfg = base.train_fields()
  tcfg.update(steps=steps, batch_size=8, seq_len=32, eval_every=0, log_every=1)
  ckpt_cfg = base.checkpoint_fields()
  ckpt_cfg.update(every=every, keep=0, async_save=False)
  said = []
  train(get_model_config('tiny_gpt', num_layers=6), tcfg, str(single), seed=0,
        print_fn=lambda *a: said.append(' '.join(map(str, a))), ckpt_cfg=ckpt_cfg)
  assert any('resumed from' in l and f'at step {steps - every}' in l for l in said), said
  tail = [x['loss'] for x in _metrics(single)[steps - every:]]
  assert max(abs(a - b['loss']) for a, b in zip(tail, want[steps - every:])) < 1e-3


def test_killing_one_process_stops_the_group_with_a_clear_error(tmp_path):
  stderr, seconds, code = _start_and_signal(tmp_path, signal.SIGKILL, victim_index=1)
  assert code == 1 and seconds < 60, (seconds, stderr)
  assert 'error: process 1 was killed by signal 9' in stderr


FAKE_MEMBER = '''
import os, signal, sys, time
me = int(os.environ['HETJAX_PROCESS_ID'])
print(f'[Gloo] Rank {me} is connected to 2 peer ranks. Expected number of connected peer ranks is : 2', flush=True)
print(f'hello from {me}', flush=True)
if me == 1:
  time.sleep(0.5)
  os.kill(os.getpid(), signal.SIGSTOP)  # frozen: its peers notice and exit first
time.sleep(2.5)
for _ in range(40):
  print('E1127 12:00:00.000 gloo/transport: Connection closed by peer', file=sys.stderr, flush=True)
sys.exit(1)
'''


def test_launcher_names_the_frozen_process_and_keeps_noise_in_the_logs(tmp_path):
  """No JAX: three stand-in processes; process 1 freezes, 0 and 2 then fail with gloo-like noise."""
  r = subprocess.run([sys.executable, '-m', 'hetjax.launch', '-n', '3', '--stall=30', '--grace=2',
                      f'--logs={tmp_path}', '--', sys.executable, '-c', FAKE_MEMBER],
                     cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert r.returncode == 1
  assert sorted(l for l in r.stdout.splitlines()) == ['[p0] hello from 0', '[p1] hello from 1',
                                                      '[p2] hello from 2']
  lines = r.stderr.splitlines()
  assert lines[0].startswith('error: process 1 was frozen (stopped, e.g. by SIGSTOP) and was the first '
                            'to go silent'), r.stderr
  assert lines[0].endswith(f'(logs: {tmp_path})')
  assert sorted(lines[1:]) == ['  process 0 exited with code 1 after process 1 stopped',
                               '  process 2 exited with code 1 after process 1 stopped'], r.stderr
  log = (tmp_path / 'p0.log').read_text()
  assert '[Gloo] Rank 0 is connected' in log and log.count('Connection closed by peer') == 40


def _lose_a_process(tmp_path, devices, workdir, steps, every, victim):
  """A 3-process run of tmp_path/plan.json with --on_failure=replan; `victim` is SIGKILLed after
  the first checkpoint. Returns the metrics rows once the job has finished on the others."""
  args = launch_args(3, devices, tmp_path / 'plan.json', workdir, steps) + [
      f'--config.ckpt.every={every}', '--config.ckpt.keep=0']
  args.insert(args.index('--'), '--on_failure=replan')
  args[args.index('--grace=30')] = '--grace=5'
  proc = subprocess.Popen(args, cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  committed = workdir / 'checkpoints' / str(every) / 'meta.json'
  deadline = time.monotonic() + 300
  while not committed.exists():
    assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
    time.sleep(0.05)
  pid = next(pid for pid in _children(proc.pid)
             if f'HETJAX_PROCESS_ID={victim}\x00'.encode() in open(f'/proc/{pid}/environ', 'rb').read())
  os.kill(pid, signal.SIGKILL)
  stdout, stderr = proc.communicate(timeout=2 * LAUNCH_TIMEOUT_S)
  assert proc.returncode == 0, stderr[-3000:]
  assert f'replanning: original process {victim} is lost' in stderr, stderr[-3000:]
  return _metrics(workdir)


def test_a_lost_host_is_replanned_over_the_plans_cluster_without_it(tmp_path):
  """Three processes laid out as local_hetero's hosts (2 slow, 2 mid, 4 fast devices); 'mid' is
  SIGKILLed: the job re-plans with the planner over local_hetero without process 1's devices (an
  uneven plan whose processes may hold several stages) and finishes every step."""
  steps, every = 20, 5
  Plan([Replica([Stage(0, 2, [0, 1]), Stage(2, 4, [2, 3]), Stage(4, 6, [4, 5, 6, 7])])],
       num_layers=6, micro_batches=4, micro_batch_size=2, cluster='local_hetero').save(
           str(tmp_path / 'plan.json'))
  workdir = tmp_path / 'elastic'
  rows = _lose_a_process(tmp_path, '2,2,4', workdir, steps, every, victim=1)
  (event,) = [r for r in rows if r.get('event') == 'replan']
  new_plan = Plan.load(str(workdir / 'plan.json'))
  assert event['cluster'] == new_plan.cluster == 'local_hetero-without-p1'
  assert event['lost_processes'] == [1] and event['processes'] == 2
  assert event['predicted_step_s'] == new_plan.prediction['total']
  assert sorted(d for r in new_plan.replicas for s in r.stages for d in s.devices) == list(range(6))
  assert [r['step'] for r in rows if 'loss' in r] == list(range(1, steps + 1))


def test_a_lost_process_is_replanned_away_and_the_run_continues(tmp_path):
  """--on_failure=replan: process 2 of 3 is SIGKILLed after the first checkpoint; the job restarts
  on 2 processes, re-plans with the training planner (over the 2 probed processes it may pick data
  parallelism), resumes and finishes; its losses equal an uninterrupted 2-process run
  on the new plan from the same checkpoint."""
  steps, every = 40, 10
  Plan([Replica(THREE_STAGES)], num_layers=6, micro_batches=4, micro_batch_size=2).save(
      str(tmp_path / 'plan.json'))
  ckpt_args = [f'--config.ckpt.every={every}', '--config.ckpt.keep=0']
  workdir = tmp_path / 'elastic'
  rows = _lose_a_process(tmp_path, '1', workdir, steps, every, victim=2)
  (event,) = [r for r in rows if r.get('event') == 'replan']
  assert event['lost_processes'] == [2] and event['processes'] == 2
  new_plan = Plan.load(str(workdir / 'plan.json'))  # the planner's, over the 2 probed survivors
  assert new_plan.search['method'] == 'hetjax' and event['replicas'] == new_plan.dp
  assert event['plan'] == [[s.start, s.end, s.devices] for s in new_plan.replicas[0].stages]
  assert event['predicted_step_s'] == new_plan.prediction['total']
  resumed = event['resumed_from']
  assert resumed % every == 0 and every <= resumed < steps and event['steps_redone'] >= 0
  after = rows[rows.index(event) + 1:]
  assert [r['step'] for r in rows if 'loss' in r] == list(range(1, steps + 1))
  assert [r['step'] for r in after] == list(range(resumed + 1, steps + 1))

  # The same checkpoint, the new plan, 2 processes, no failure.
  reference = tmp_path / 'reference'
  shutil.copytree(workdir / 'checkpoints' / str(resumed), reference / 'checkpoints' / str(resumed))
  shutil.copy(workdir / 'plan.json', tmp_path / 'new_plan.json')
  r = subprocess.run(launch_args(2, '1', tmp_path / 'new_plan.json', reference, steps) + ckpt_args,
                     cwd=ROOT, env=env(), capture_output=True, text=True,
                     timeout=2 * LAUNCH_TIMEOUT_S)
  assert r.returncode == 0, r.stderr[-3000:]
  want = _metrics(reference)
  assert [x['step'] for x in want] == list(range(resumed + 1, steps + 1))
  assert [x['loss'] for x in after] == [x['loss'] for x in want]  # exact


def test_sigterm_to_the_launcher_stops_its_processes(tmp_path):
  """A launcher stopped by SIGTERM (as `kill` or a job scheduler does) takes its group with it."""
  launcher = subprocess.Popen([sys.executable, '-m', 'hetjax.launch', '-n', '2', '--',
                               sys.executable, '-c', 'import time; time.sleep(120)'],
                              cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  deadline = time.monotonic() + 30
  while len(_children(launcher.pid)) < 2 and time.monotonic() < deadline:
    time.sleep(0.2)
  children = _children(launcher.pid)
  assert len(children) == 2
  launcher.send_signal(signal.SIGTERM)
  assert launcher.wait(timeout=30) != 0
  time.sleep(0.5)
  assert not [p for p in children if os.path.exists(f'/proc/{p}')
              and open(f'/proc/{p}/stat').read().rsplit(')', 1)[1].split()[0] != 'Z'], children


@pytest.mark.parametrize('args, message', [
    (['--workdir=x', '--', sys.executable, '-c', '1'], 'unknown option --workdir=x'),
    (['--', '/nonexistent/program'], "cannot start '/nonexistent/program'"),
])
def test_the_launcher_refuses_a_bad_command_line_in_one_line(tmp_path, args, message):
  r = subprocess.run([sys.executable, '-m', 'hetjax.launch', '-n', '2', f'--logs={tmp_path}', *args],
                     cwd=ROOT, env=env(), capture_output=True, text=True, timeout=60)
  assert r.returncode == 2 and message in r.stderr, r.stderr
  assert 'Traceback' not in r.stderr and r.stderr.strip().splitlines()[-1].count('error:') == 1
