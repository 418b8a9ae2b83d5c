"""Orbax train checkpoints: exact resume after a real SIGKILL, crash-safe saves, keep-K, clear
errors for a checkpoint of another model; faults: non-finite steps, damaged checkpoints (fallback),
failed saves, unwritable workdirs."""

import glob
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import shutil
from flax import nnx

from configs import base
from hetjax.checkpoint.manager import Checkpointer, StageSpec, is_checkpoint, tensor_index
from hetjax.errors import HetjaxError
from hetjax.metrics import make_workdir
from hetjax.models.config import get_model_config
from hetjax.models.model import build_model
from hetjax.train import TrainState, make_optimizer, open_checkpoints, train, train_step

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


# ---- faults: non-finite steps, damaged checkpoints, failed saves, unwritable workdirs
TINY = get_model_config('tiny_gpt', num_layers=1, hidden=32)


def _tcfg(steps, **kw):
  t = base.train_fields()
  t.update({'steps': steps, 'batch_size': 2, 'seq_len': 16, 'warmup_steps': 1, 'log_every': 1,
            'eval_every': 0, **kw})
  return t


def _ckpt_cfg(every):
  c = base.checkpoint_fields()
  c.update(every=every, keep=0, async_save=False)
  return c


def _strict_records(path):
  def no_constants(name):
    raise AssertionError(f'bare {name} in {path}')
  return [json.loads(l, parse_constant=no_constants) for l in open(path)]


def test_non_finite_loss_stops_with_one_error_naming_the_step(tmp_path):
  with pytest.raises(HetjaxError, match=r'^step (\d+): non-finite loss=nan.*the last checkpoint is '
                                        r'step \d+') as e:
    train(TINY, _tcfg(12, lr=1e5, warmup_steps=0), str(tmp_path), print_fn=lambda *a: None,
          ckpt_cfg=_ckpt_cfg(1))
  bad = int(str(e.value).split()[1].rstrip(':'))
  records = _strict_records(tmp_path / 'metrics.jsonl')
  assert records[-1]['step'] == bad and records[-1]['loss'] is None and records[-1]['bad_step']
  ckpt = Checkpointer(str(tmp_path / 'checkpoints'), read_only=True)
  assert max(ckpt.manager.all_steps()) < bad  # nothing saved at or after the bad step
  for step in ckpt.manager.all_steps():  # and every saved step reads back finite and intact
    meta = ckpt.meta(step)
    assert ckpt.read(tensor_index(meta), meta=meta)


class _Flaky(TrainState):
  """Reports a non-finite loss on the given steps without updating (as the real step does)."""
  bad = ()

  def train_step(self, batch):
    if self.step + 1 in self.bad:
      return {'loss': float('nan'), 'grad_norm': float('inf')}
    return super().train_step(batch)


@pytest.mark.parametrize('allowed,bad,stops_at', [(2, (3, 5), None), (2, (2, 3, 4), 4), (0, (2,), 2)])
def test_max_bad_steps_skips_then_stops(tmp_path, allowed, bad, stops_at):
  tcfg = _tcfg(6, max_bad_steps=allowed)
  make = lambda model, data, seed: type('F', (_Flaky,), {'bad': bad})(
      model, make_optimizer(tcfg), data, seed)
  lines = []
  if stops_at is None:
    train(TINY, tcfg, str(tmp_path), make_state=make, print_fn=lines.append)
  else:
    with pytest.raises(HetjaxError, match=f'^step {stops_at}: non-finite loss=nan and grad_norm=inf'):
      train(TINY, tcfg, str(tmp_path), make_state=make, print_fn=lines.append)
  records = _strict_records(tmp_path / 'metrics.jsonl')
  skipped = [r['step'] for r in records if r.get('skipped')]
  assert skipped == [s for s in bad if stops_at is None or s < stops_at]
  assert sum('update skipped' in l for l in lines) == len(skipped)


def test_non_finite_step_leaves_the_state_unchanged():
  model = build_model(TINY)
  graphdef, params = nnx.split(model)
  optimizer = make_optimizer(_tcfg(5))
  leaves = [np.array(x) for x in jax.tree.leaves(params)]  # copies: train_step donates its inputs
  leaves[0][0] = np.nan
  poisoned = jax.tree.unflatten(jax.tree.structure(params), [jax.numpy.asarray(x) for x in leaves])
  opt_before = [np.array(x) for x in jax.tree.leaves(optimizer.init(poisoned))]
  batch = {'inputs': np.zeros((2, 8), np.int32), 'targets': np.zeros((2, 8), np.int32)}
  new_params, new_opt, m = train_step(graphdef, optimizer, poisoned, optimizer.init(poisoned), batch)
  assert not np.isfinite(float(m['loss']))
  for a, b in zip(jax.tree.leaves(new_params), leaves):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(new_opt), opt_before):
    np.testing.assert_array_equal(a, b)


def test_saving_a_non_finite_tensor_is_refused(tmp_path):
  ckpt = Checkpointer(str(tmp_path))
  with pytest.raises(HetjaxError, match='refusing to save step 4: tensor params/w is not finite'):
    ckpt.save(4, [(SPEC, {'params': {'w': np.array([1.0, np.inf], np.float32)}})], {})
  ckpt.close()
  assert ckpt.latest_step() is None


def _data_files(step_dir):
  return sorted(glob.glob(os.path.join(step_dir, '*', '**', 'd', '*'), recursive=True),
                key=os.path.getsize)


def _overwrite(path, data):
  with open(path, 'r+b') as f:
    f.seek(max(os.path.getsize(path) // 2 - len(data) // 2, 0))
    f.write(data)


DAMAGE = {
    'truncated data': lambda d: os.truncate(_data_files(d)[-1], os.path.getsize(_data_files(d)[-1]) // 2),
    'random bytes': lambda d: _overwrite(_data_files(d)[-1], np.random.default_rng(0).bytes(64)),
    'NaN bytes': lambda d: _overwrite(_data_files(d)[-1], b'\xff' * 64),
    'deleted metadata': lambda d: os.remove(os.path.join(d, 'meta', 'metadata')),
    'garbage metadata': lambda d: open(os.path.join(d, 'meta', 'metadata'), 'w').write('{garbage'),
    'deleted manifest': lambda d: os.remove(glob.glob(os.path.join(d, 'stage*', 'manifest.ocdbt'))[0]),
}


@pytest.mark.parametrize('damage', sorted(DAMAGE))
def test_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, damage):
  d = str(tmp_path / 'ckpt')
  rng = np.random.default_rng(1)
  trees = {s: {'params': {'w': rng.standard_normal((256, 64)).astype(np.float32)}} for s in (1, 2)}
  ckpt = Checkpointer(d)
  for step, tree in trees.items():
    ckpt.save(step, [(SPEC, tree)], {'tag': step})
  ckpt.close()
  DAMAGE[damage](os.path.join(d, '2'))
  lines = []
  ckpt = Checkpointer(d, warn=lines.append)
  (got,), meta = ckpt.restore([{'params': {'w': np.zeros((256, 64), np.float32)}}])
  assert meta['tag'] == 1 and len(lines) == 1, lines
  assert lines[0].startswith('warning: checkpoint step 2: ') and 'falling back to step 1' in lines[0]
  np.testing.assert_array_equal(got['params']['w'], trees[1]['params']['w'])
  assert ckpt.latest_step() == 1 and os.path.isdir(f'{d}.corrupt/2')  # kept aside, out of the way
  DAMAGE[damage](os.path.join(d, '1'))
  with pytest.raises(HetjaxError, match=r'^no intact checkpoint in .* \(tried steps 1\)$'):
    Checkpointer(d, warn=lines.append).restore([{'params': {'w': np.zeros((256, 64), np.float32)}}])


def test_failed_background_save_stops_the_run_at_once(tmp_path, monkeypatch):
  def check_for_errors(manager):  # the disk filled up while step 2 was written in the background
    if manager.latest_step() == 2:
      raise OSError(28, 'No space left on device')
  monkeypatch.setattr(ocp.CheckpointManager, 'check_for_errors', check_for_errors)
  with pytest.raises(HetjaxError, match=r'^saving a checkpoint in .* failed: OSError: .*No space left'):
    train(TINY, _tcfg(8), str(tmp_path), print_fn=lambda *a: None, ckpt_cfg=_ckpt_cfg(2))
  assert _strict_records(tmp_path / 'metrics.jsonl')[-1]['step'] == 3  # the next step, not step 4


def test_unwritable_or_full_workdir_is_one_error_before_training(tmp_path, monkeypatch):
  (tmp_path / 'file').write_text('')
  with pytest.raises(HetjaxError, match='cannot create workdir'):
    make_workdir(str(tmp_path / 'file' / 'run'))
  monkeypatch.setattr(shutil, 'disk_usage', lambda path: shutil._ntuple_diskusage(10, 10, 1000))
  with pytest.raises(HetjaxError, match=r'has 1e-06 GB free but one checkpoint needs about'):
    open_checkpoints(str(tmp_path / 'run'), _ckpt_cfg(1), None, TINY)


def test_rerun_before_the_first_checkpoint_starts_a_clean_log(tmp_path):
  (tmp_path / 'metrics.jsonl').write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 9.0}\n')
  train(TINY, _tcfg(3), str(tmp_path), print_fn=lambda *a: None, ckpt_cfg=_ckpt_cfg(0))
  assert [r['step'] for r in _strict_records(tmp_path / 'metrics.jsonl')] == [1, 2, 3]
  assert all(r['loss'] != 9.0 for r in _strict_records(tmp_path / 'metrics.jsonl'))


def _by_process(directory, **kw):
  """A Checkpointer that writes as a multi-controller run does (one process here)."""
  ckpt = Checkpointer(directory, **kw)
  ckpt.by_process = True
  return ckpt


def test_a_step_written_by_processes_reads_back_under_another_split(tmp_path):
  mcfg = get_model_config('tiny_llama', num_layers=2, hidden=32, ffn=64)
  want = _params(mcfg)
  flat = dict(nnx.to_flat_state(want['params']))
  names = sorted(flat, key=str)
  half = {'params': nnx.from_flat_state({k: flat[k] for k in names[:len(names) // 2]})}
  rest = {'params': nnx.from_flat_state({k: flat[k] for k in names[len(names) // 2:]})}
  ckpt = _by_process(str(tmp_path), keep=2)
  for step in (1, 2, 3):
    ckpt.save(step, [(StageSpec(0, 1, True, False), half), (StageSpec(1, 2, False, True), rest)],
              {'n': step})
  assert sorted(os.listdir(tmp_path)) == ['2', '3']  # keep=2, no temporary folder left
  assert is_checkpoint(str(tmp_path))
  ckpt = Checkpointer(str(tmp_path), read_only=True)  # an ordinary (orbax) reader
  assert ckpt.latest_step() == 3
  (got,), meta = ckpt.restore([_params(mcfg)])  # one stage now holds both halves
  assert meta['n'] == 3 and meta['step'] == 3
  for x, y in zip(nnx.to_flat_state(want['params']), nnx.to_flat_state(got['params'])):
    np.testing.assert_array_equal(np.asarray(x[1].get_value()), np.asarray(y[1].get_value()))


def test_a_damaged_step_written_by_processes_falls_back(tmp_path):
  ckpt = _by_process(str(tmp_path))
  for step, value in ((1, 1.0), (2, 2.0)):
    ckpt.save(step, [(SPEC, {'params': {'w': np.full((8, 8), value, np.float32)}})], {})
  (npz,) = glob.glob(str(tmp_path / '2' / '*.npz'))
  _overwrite(npz, b'garbage')
  warnings = []
  ckpt = Checkpointer(str(tmp_path), warn=warnings.append)
  (tree,), meta = ckpt.restore([{'params': {'w': np.zeros((8, 8), np.float32)}}])
  assert meta['step'] == 1 and len(warnings) == 1 and 'falling back to step 1' in warnings[0]
  np.testing.assert_array_equal(tree['params']['w'], 1.0)


def test_a_background_save_by_processes_commits_whole_or_reports_its_error(tmp_path):
  """async_save with per-process files: the step appears complete once written; a save that
  cannot be written (a file where its temporary folder goes) is one HetjaxError at check(), and
  the committed steps stay readable."""
  ckpt = _by_process(str(tmp_path), async_save=True)
  ckpt.save(1, [(SPEC, {'params': {'w': np.full((8, 8), 1.0, np.float32)}})], {})
  ckpt.save(2, [(SPEC, {'params': {'w': np.full((8, 8), 2.0, np.float32)}})], {})  # waits for 1
  ckpt.wait()
  assert sorted(os.listdir(tmp_path)) == ['1', '2']
  (tmp_path / '.tmp-3').write_text('')
  ckpt.save(3, [(SPEC, {'params': {'w': np.full((8, 8), 3.0, np.float32)}})], {})
  ckpt._writer_thread.join()
  with pytest.raises(HetjaxError, match=r'^saving checkpoint step 3 in .* failed: FileExistsError'):
    ckpt.check()
  ckpt.check()  # reported once
  (tree,), meta = Checkpointer(str(tmp_path), read_only=True).restore(
      [{'params': {'w': np.zeros((8, 8), np.float32)}}])
  assert meta['step'] == 2 and (tree['params']['w'] == 2.0).all()
