"""AQ-SGD across two processes (hetjax.launch, gloo): the sender's buffers live in process 0, the
receiver's in process 1, and they must stay bitwise identical; a killed run resumes with them."""

import gzip
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from hetjax import data as data_lib
from hetjax.checkpoint.manager import Checkpointer, tensor_index
from hetjax.plan import Plan, Replica, Stage
from tests.test_multicontroller import LAUNCH_TIMEOUT_S, _children, env

pytestmark = pytest.mark.slow  # multi-process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ, SAMPLES, BATCH = 32, 20, 4   # an epoch is 5 steps: steps 1-5 warm up, then 4-bit deltas
CORPUS_BYTES = 700                # 665 training tokens (20 windows of 32 + 1), 35 for validation
STEPS, EVERY = 20, 5
SEND, RECV = '2.fwd.0.send', '2.fwd.0.recv'  # the boundary after layer 2, replica 0


def command(tmp, workdir):
  return [sys.executable, '-m', 'hetjax.launch', '-n', '2', '--devices=1', '--grace=30',
          f'--timeout={LAUNCH_TIMEOUT_S}', '--', sys.executable, 'run.py',
          '--config=configs/train.py', f'--config.workdir={workdir}',
          f'--config.pipeline.plan={tmp / "plan.json"}', f'--config.data.path={tmp / "corpus.txt"}',
          '--config.pipeline.codec=aqsgd4', '--config.pipeline.grad_codec=8',
          '--config.aqsgd.warmup_epochs=1', '--config.aqsgd.buffers=disk',
          '--config.aqsgd.rounding=stochastic', '--config.model=tiny_gpt',
          '--config.model_overrides.num_layers=4', f'--config.train.steps={STEPS}',
          f'--config.train.batch_size={BATCH}', f'--config.train.seq_len={SEQ}',
          '--config.train.warmup_steps=5', '--config.train.log_every=1',
          '--config.train.eval_every=0', f'--config.ckpt.every={EVERY}', '--config.ckpt.keep=0']


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
  """An uninterrupted 2-process run: stage 0 (layers 0-2) on process 0, stage 1 on process 1."""
  tmp = tmp_path_factory.mktemp('aqsgd_mc')
  Plan([Replica([Stage(0, 2, [0]), Stage(2, 4, [1])])], num_layers=4, micro_batches=2,
       micro_batch_size=2).save(str(tmp / 'plan.json'))
  with gzip.open(data_lib.DEFAULT_CORPUS) as f:
    (tmp / 'corpus.txt').write_bytes(f.read()[:CORPUS_BYTES])
  r = subprocess.run(command(tmp, tmp / 'straight'), cwd=ROOT, env=env(), capture_output=True,
                     text=True, timeout=2 * LAUNCH_TIMEOUT_S)
  assert r.returncode == 0, r.stderr[-3000:]
  assert f'buffers {SEND}: disk' in r.stdout
  return tmp


def metrics(workdir):
  return [json.loads(l) for l in open(workdir / 'metrics.jsonl') if '"loss"' in l]


def buffers_at(workdir, step):
  """{name: {leaf: array}} of both buffers in checkpoint `step`, and the file each came from."""
  ck = Checkpointer(str(workdir / 'checkpoints'), read_only=True)
  meta = ck.meta(step)
  index = tensor_index(meta)
  names = [n for n in index if n.startswith('extra/codec/')]
  got = ck.read(names, meta=meta)
  out, files = {}, {}
  for n in names:
    _, _, buf, leaf = n.split('/')
    out.setdefault(buf, {})[leaf] = got[n]
    files[buf] = index[n][0]
  return out, files


def test_sender_and_receiver_buffers_in_two_processes_stay_bitwise_identical(straight):
  """Checkpoints every 5 steps hold process 0's send buffer and process 1's receive buffer:
  equal to the bit at the end of warm-up and at every later checkpoint, while they change."""
  sent = [r['bytes_sent'] for r in metrics(straight / 'straight')]
  # Warm-up sends the activations in fp32, then 4-bit deltas: at least 0.8 of those bytes saved
  # (the rest of each step is the 8-bit backward and the tied table's fp32 gradient).
  fp32_activations = BATCH * SEQ * 128 * 4
  assert len(sent) == STEPS and len(set(sent[:5])) == 1 and len(set(sent[5:])) == 1
  assert sent[0] - sent[5] > 0.8 * fp32_activations
  previous = None
  for step in range(EVERY, STEPS + 1, EVERY):
    bufs, files = buffers_at(straight / 'straight', step)
    assert set(bufs) == {SEND, RECV}
    assert files[SEND].startswith('p0_') and files[RECV].startswith('p1_')  # two processes wrote them
    send, recv = bufs[SEND], bufs[RECV]
    assert send['filled'].all() and np.array_equal(send['filled'], recv['filled'])
    assert send['leaf0'].dtype == np.float16 and send['leaf0'].shape == (SAMPLES, SEQ, 128)
    np.testing.assert_array_equal(send['leaf0'].view(np.uint8), recv['leaf0'].view(np.uint8))
    if previous is not None:  # the deltas keep moving the buffers
      assert not np.array_equal(previous, send['leaf0'])
    previous = send['leaf0']


def test_a_killed_two_process_run_resumes_exactly_with_its_buffers(straight):
  """SIGKILL of the whole group after the checkpoint of step 10 (past warm-up); the restarted
  group restores both processes' buffers and logs the straight run's losses and bytes exactly."""
  killed = straight / 'killed'
  proc = subprocess.Popen(command(straight, killed), cwd=ROOT, env=env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  committed = killed / 'checkpoints' / str(2 * EVERY) / 'meta.json'
  deadline = time.monotonic() + 2 * LAUNCH_TIMEOUT_S
  while not committed.exists():
    assert proc.poll() is None and time.monotonic() < deadline, 'the run ended before its checkpoint'
    time.sleep(0.02)
  for pid in _children(proc.pid) + [proc.pid]:  # the whole group at once
    os.kill(pid, signal.SIGKILL)
  proc.wait()
  assert metrics(killed)[-1]['step'] < STEPS, 'the run finished before it could be killed'
  r = subprocess.run(command(straight, killed), cwd=ROOT, env=env(), capture_output=True,
                     text=True, timeout=2 * LAUNCH_TIMEOUT_S)
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'resumed from' in r.stdout and 'start empty' not in r.stdout, r.stdout[-2000:]
  want, got = metrics(straight / 'straight'), metrics(killed)
  assert [x['step'] for x in got] == [x['step'] for x in want] == list(range(1, STEPS + 1))
  assert [x['loss'] for x in got] == [x['loss'] for x in want]  # exact
  # Empty buffers after the restart would send full precision again: the bytes say they were not.
  assert [x['bytes_sent'] for x in got] == [x['bytes_sent'] for x in want]
  bufs, _ = buffers_at(killed, STEPS)
  want_bufs, _ = buffers_at(straight / 'straight', STEPS)
  for name in (SEND, RECV):
    np.testing.assert_array_equal(bufs[name]['leaf0'].view(np.uint8),
                                  want_bufs[name]['leaf0'].view(np.uint8))
