"""Orbax train checkpoints: exact resume after a real SIGKILL, crash-safe saves, keep-K, clear
errors for a checkpoint of another model."""

import glob
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from flax import nnx

from configs import base
from hetjax.checkpoint.manager import Checkpointer, StageSpec, is_checkpoint
from hetjax.errors import HetjaxError
from hetjax.models.config import get_model_config
from hetjax.models.model import build_model
from hetjax.train import open_checkpoints

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = StageSpec(0, 1, True, True)


def _train_cmd(workdir, steps):
  return [sys.executable, 'run.py', '--config=configs/train.py', f'--config.workdir={workdir}',
          '--config.model_overrides.num_layers=2', '--config.model_overrides.hidden=32',
          f'--config.train.steps={steps}', '--config.train.batch_size=4',
          '--config.train.seq_len=32', '--config.train.warmup_steps=20',
          '--config.train.log_every=1', '--config.train.eval_every=0',
          '--config.ckpt.every=20', '--config.ckpt.keep=2']


def _losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  return [r['step'] for r in records], np.array([r['loss'] for r in records])


@pytest.mark.slow
def test_resume_after_sigkill_is_exact(tmp_path):
  steps = 300
  straight = subprocess.Popen(_train_cmd(tmp_path / 'straight', steps), cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  killed = tmp_path / 'killed'
  proc = subprocess.Popen(_train_cmd(killed, steps), cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 240
  while not is_checkpoint(str(killed / 'checkpoints')) and time.time() < deadline:
    time.sleep(0.005)  # until the first step is committed
  proc.send_signal(signal.SIGKILL)
  assert proc.wait() == -signal.SIGKILL
  logged, _ = _losses(killed)
  assert logged[-1] < steps, 'the run finished before it could be killed'
  assert straight.wait(timeout=300) == 0, straight.stderr.read()

  resumed = subprocess.run(_train_cmd(killed, steps), cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
  assert resumed.returncode == 0, resumed.stderr
  at = int(resumed.stdout.split(' at step ')[1].split()[0])
  assert 'resumed from' in resumed.stdout and 20 <= at < steps and at % 20 == 0
  a_steps, a = _losses(tmp_path / 'straight')
  b_steps, b = _losses(killed)
  assert a_steps == b_steps == list(range(1, steps + 1))
  np.testing.assert_allclose(b, a, rtol=1e-6, atol=0)
  assert sorted(int(s) for s in os.listdir(killed / 'checkpoints')) == [steps - 20, steps]  # keep=2


CRASH = textwrap.dedent('''
    import os, signal, sys
    import numpy as np
    from hetjax.checkpoint.manager import Checkpointer, StageSpec
    ckpt = Checkpointer(sys.argv[1], async_save=True)
    spec = StageSpec(0, 1, True, True)
    ckpt.save(1, [(spec, {'params': {'w': np.ones((64, 64), np.float32)}})], {'tag': 'good'})
    ckpt.wait()
    big = np.random.default_rng(0).standard_normal((8, 1024, 1024)).astype(np.float32)
    ckpt.save(2, [(spec, {'params': {'w': big}})], {'tag': 'bad'})
    os.kill(os.getpid(), signal.SIGKILL)  # while the background thread writes step 2
''')


def test_crash_during_save_keeps_latest_good_checkpoint(tmp_path):
  d = str(tmp_path / 'ckpt')
  r = subprocess.run([sys.executable, '-c', CRASH, d], cwd=ROOT, capture_output=True, text=True,
                     timeout=120, env={**os.environ, 'PYTHONPATH': ROOT})
  assert r.returncode == -signal.SIGKILL, r.stderr
  assert glob.glob(os.path.join(d, '2.orbax-checkpoint-tmp*')), 'the kill came after the save'
  ckpt = Checkpointer(d)
  assert ckpt.latest_step() == 1
  (tree,), meta = ckpt.restore([{'params': {'w': np.zeros((64, 64), np.float32)}}])
  assert meta['tag'] == 'good'
  np.testing.assert_array_equal(tree['params']['w'], 1.0)
  ckpt.save(2, [(SPEC, tree)], {'tag': 'again'})  # saving again first removes the half-written step
  ckpt.close()
  assert sorted(os.listdir(d)) == ['1', '2']


def _params(mcfg):
  return {'params': nnx.state(build_model(mcfg), nnx.Param)}


def test_keep_last_k_and_roundtrip(tmp_path):
  mcfg = get_model_config('tiny_llama', num_layers=2, hidden=32, ffn=64)
  ckpt = Checkpointer(str(tmp_path), keep=2, async_save=True)
  for step in (1, 2, 3):
    ckpt.save(step, [(SPEC, _params(mcfg))], {'n': step})
  ckpt.close()
  ckpt = Checkpointer(str(tmp_path), read_only=True)
  assert list(ckpt.manager.all_steps()) == [2, 3]
  want = _params(mcfg)
  (got,), meta = ckpt.restore([want], step=2)
  assert meta['n'] == 2 and meta['step'] == 2
  for x, y in zip(nnx.to_flat_state(want['params']), nnx.to_flat_state(got['params'])):
    np.testing.assert_array_equal(np.asarray(x[1].get_value()), y[1].get_value())


def test_restoring_into_another_config_names_the_tensor_and_shapes(tmp_path):
  mcfg = get_model_config('tiny_gpt', num_layers=2, hidden=32)
  ckpt = Checkpointer(str(tmp_path))
  ckpt.save(5, [(SPEC, _params(mcfg))], {})
  ckpt.close()
  ckpt = Checkpointer(str(tmp_path), read_only=True)
  wider = get_model_config('tiny_gpt', num_layers=2, hidden=64)
  with pytest.raises(HetjaxError) as e:
    ckpt.restore([_params(wider)])
  assert str(e.value).startswith('checkpoint tensor params/blocks/0/attn/k/bias has shape (32,) '
                                 'but the model expects (64,)')
  with pytest.raises(HetjaxError, match=r'params/blocks/1/\S+ \(shape .*\) has no place'):
    ckpt.restore([_params(get_model_config('tiny_gpt', num_layers=1, hidden=32))])
  with pytest.raises(HetjaxError, match='checkpoint has no tensor params/blocks/2/'):
    ckpt.restore([_params(get_model_config('tiny_gpt', num_layers=3, hidden=32))])


def test_resume_flag(tmp_path):
  ckpt_cfg = base.checkpoint_fields()
  with pytest.raises(HetjaxError, match='resume=true but .* holds no checkpoint'):
    open_checkpoints(str(tmp_path), ckpt_cfg, resume=True)
  ckpt = open_checkpoints(str(tmp_path), ckpt_cfg, resume=None)
  ckpt.save(3, [(SPEC, {'params': {'w': np.ones(2, np.float32)}})], {})
  ckpt.close()
  with pytest.raises(HetjaxError, match='holds a checkpoint at step 3'):
    open_checkpoints(str(tmp_path), ckpt_cfg, resume=False)
  assert open_checkpoints(str(tmp_path), ckpt_cfg, resume=True).latest_step() == 3
