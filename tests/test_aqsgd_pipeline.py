"""AQ-SGD through the pipeline runtime: buffers in a BufferStore behind the exchange, warm-up by
epoch, exact wire bytes, checkpoints that carry the buffers."""

import dataclasses
import gzip
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hetjax import data as data_lib
from hetjax.checkpoint.manager import Checkpointer, is_checkpoint
from hetjax.compression.aqsgd import AQSGD
from hetjax.compression.buffers import BufferStore
from hetjax.errors import HetjaxError
from hetjax.models.config import get_model_config
from hetjax.models.model import build_model
from hetjax.parallel.pipeline import Pipeline
from hetjax.parallel.trainer import PipelineTrainState
from hetjax.plan import Plan, Replica, Stage
from tests.test_pipeline import train_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ = 32


def plan(dp=1, micro=2, mbs=2):
  """Two stages (layers 0-2, 2-4); dp replicas on devices 2r (stage 0) and 2r+1 (stage 1)."""
  return Plan([Replica([Stage(0, 2, [2 * r]), Stage(2, 4, [2 * r + 1])]) for r in range(dp)],
              num_layers=4, micro_batches=micro, micro_batch_size=mbs)


def data(batch, samples=16, seed=0):
  """A tiny training set of `samples` windows, so epochs come around quickly."""
  return data_lib.BatchIterator(data_lib.load_corpus()[:samples * SEQ + 1], batch, SEQ, seed=seed)


def tcfg():
  t = train_config()
  t.seq_len = SEQ
  return t


def pipeline(p, codec=None, placement='host', dtype='float16', warmup=0, folder=None, **kw):
  store = None if codec is None else BufferStore(16, placement, dtype, folder=folder,
                                                 say=lambda *a: None)
  return Pipeline(p, get_model_config('tiny_gpt'), tcfg(), codec=codec, buffers=store,
                  warmup_epochs=warmup, **kw)


def store_pairs(pipe):
  """{(layer, direction, replica): (send leaves, recv leaves, send filled, recv filled)}."""
  saved = pipe.buffers.state_dict()
  out = {}
  for name, entry in saved.items():
    layer, direction, r, side = name.split('.')
    out.setdefault((layer, direction, r), {})[side] = entry
  return out


@pytest.mark.parametrize('placement,dtype,dp', [('host', 'float16', 2), ('disk', 'bfloat16', 1),
                                                ('device', 'float32', 1)])
def test_sender_and_receiver_buffers_stay_bitwise_identical(tmp_path, placement, dtype, dp):
  p = plan(dp=dp)
  pipe = pipeline(p, AQSGD(4, buffer_dtype=dtype, rounding='stochastic' if dp == 1 else 'nearest'),
                  placement, dtype, folder=str(tmp_path))
  it = data(p.micro_batches * p.micro_batch_size * dp)
  for _ in range(12):  # 3 to 6 epochs of 16 samples: every sample revisited
    m = pipe.step(next(it))
    assert np.isfinite(m['loss'])
  pairs = store_pairs(pipe)
  assert len(pairs) == dp  # one forward boundary per replica (gradients use no state)
  for sides in pairs.values():
    send, recv = sides['send'], sides['recv']
    assert send['filled'].all() and np.array_equal(send['filled'], recv['filled'])
    for a, b in zip(send['leaves'], recv['leaves']):
      assert a.dtype == jnp.dtype(dtype)
      np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))


def test_warm_up_then_bytes_per_step_equal_the_codec_formula():
  p = plan()
  codec = AQSGD(4)
  pipe = pipeline(p, codec, warmup=1)
  it = data(4)  # 4 steps per epoch
  cfg = get_model_config('tiny_gpt')
  piece = (p.micro_batch_size, SEQ, cfg.hidden)
  fp32 = int(np.prod(piece)) * 4
  grads = p.micro_batches * fp32  # backward activation gradients: fp32 (Identity)
  if cfg.tie_embeddings:  # the tied table's gradient goes both ways between first and last stage
    grads += 2 * cfg.vocab_size * cfg.hidden * 4
  sent = [pipe.step(next(it))['bytes_sent'] for _ in range(8)]
  warm = p.micro_batches * codec.wire_bytes(piece, warm=True) + grads
  assert sent[:4] == [p.micro_batches * fp32 + grads] * 4  # epoch 0: full precision
  assert sent[4:] == [warm] * 4
  assert codec.wire_bytes(piece, warm=True) < fp32 / 6  # 4-bit codes + per-channel scales


@dataclasses.dataclass(frozen=True)
class StatefulFP32:
  """A stateful codec that sends x in fp32 and remembers it: the buffer path with no rounding."""
  stateful = True
  name = 'stateful_fp32'

  def state_spec(self, piece_shape, dtype):
    return jax.ShapeDtypeStruct(piece_shape[1:], jnp.float32)

  def encode(self, x, state):
    return x, x

  def decode(self, wire, state, dtype=jnp.float32):
    return wire.astype(dtype), wire


def test_an_fp32_codec_through_the_buffers_gives_exactly_the_fp32_losses():
  p = plan()
  plain, buffered = pipeline(p), pipeline(p, StatefulFP32(), dtype='float32')
  it_a, it_b = data(4), data(4)
  for _ in range(6):
    a, b = plain.step(next(it_a)), buffered.step(next(it_b))
    assert a['loss'] == b['loss'] and a['grad_norm'] == b['grad_norm']
  assert buffered.buffers.filled((2, 'fwd', 0, 'recv')).all()


def test_stateful_codec_without_ids_or_with_bad_buffers_is_one_error(tmp_path):
  p = plan()
  pipe = pipeline(p, AQSGD(4))
  batch = next(data(4))
  del batch['ids']
  with pytest.raises(HetjaxError, match='sample'):
    pipe.step(batch)
  with pytest.raises(HetjaxError, match='unknown buffer placement'):
    pipeline(p, AQSGD(4), placement='gpu')
  tiny = BufferStore(16, 'host', 'float16', budget_bytes=1000, say=lambda *a: None)
  with pytest.raises(HetjaxError, match='more than the budget'):
    Pipeline(p, get_model_config('tiny_gpt'), tcfg(), codec=AQSGD(4), buffers=tiny)


class CheckedStore(BufferStore):
  """A BufferStore that checks every gather served by a prefetch against a direct read."""

  def gather(self, key, ids):
    got = super().gather(key, ids)
    if self.prefetch_hits > getattr(self, 'checked', 0):
      self.checked = self.prefetch_hits
      direct = self._read(key, self._check_ids(ids))
      for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(direct)):
        np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))
    return got


@pytest.mark.parametrize('placement', ['host', 'disk'])
def test_next_micro_batch_rows_are_prefetched_and_equal_the_direct_read(tmp_path, placement):
  """Each send starts reading the next micro-batch's rows of its key in a background thread; the
  gathers they serve return exactly the stored rows, and training is unchanged by them."""
  p = plan(micro=4, mbs=1)
  runs = {}
  for name, store_cls in (('prefetch', CheckedStore), ('direct', BufferStore)):
    store = store_cls(16, placement, 'float16', folder=str(tmp_path / name), say=lambda *a: None)
    if name == 'direct':
      store.prefetch = lambda key, ids: None
    pipe = Pipeline(p, get_model_config('tiny_gpt'), tcfg(), codec=AQSGD(4), buffers=store,
                    warmup_epochs=1)
    it = data(4)  # 4 steps per epoch
    runs[name] = ([pipe.step(next(it))['loss'] for _ in range(7)], store)
  (losses, store), (direct_losses, direct_store) = runs['prefetch'], runs['direct']
  # After warm-up (3 steps of 4 micro-batches), micro-batches 1..3 of each step are prefetched on
  # both sides of the boundary (the first of a step follows another batch: not prefetched).
  assert store.prefetch_hits == 3 * 3 * 2 and store.checked == store.prefetch_hits
  assert direct_store.prefetch_hits == 0
  assert losses == direct_losses


def _state(pipe, it):
  return PipelineTrainState(pipe, build_model(get_model_config('tiny_gpt'), 0), it)


def test_checkpoint_carries_the_buffers_and_resumes_exactly(tmp_path, capsys):
  p = plan()
  straight = _state(pipeline(p, AQSGD(4), warmup=1), data(4))
  losses = [straight.train_step(next(straight.data))['loss'] for _ in range(10)]

  first = _state(pipeline(p, AQSGD(4), warmup=1), data(4))
  for _ in range(6):
    first.train_step(next(first.data))
    first.step += 1
  ckpt = Checkpointer(str(tmp_path / 'ck'), every=1, keep=2, async_save=False)
  first.save(ckpt)
  ckpt.close()

  second = _state(pipeline(p, AQSGD(4), warmup=1), data(4))
  ckpt = Checkpointer(str(tmp_path / 'ck'), every=1, keep=2, async_save=False)
  second.restore(ckpt)
  assert 'start empty' not in capsys.readouterr().out
  assert second.pipe.buffers.filled((2, 'fwd', 0, 'send')).all()
  resumed = [second.train_step(next(second.data))['loss'] for _ in range(4)]
  assert resumed == losses[6:]

  # Other stage boundaries: the model restores, the buffers start empty and say so in one line.
  moved = Plan([Replica([Stage(0, 1, [0]), Stage(1, 4, [1])])], num_layers=4, micro_batches=2,
               micro_batch_size=2)
  third = _state(pipeline(moved, AQSGD(4), warmup=1), data(4))
  third.restore(ckpt)
  ckpt.close()
  out = capsys.readouterr().out
  assert out.count('start empty') == 1 and '1.fwd.0.send' in out
  assert not third.pipe.buffers.filled((1, 'fwd', 0, 'send')).any()
  assert np.isfinite(third.train_step(next(third.data))['loss'])


def _run_cmd(workdir, plan_path, corpus, steps):
  return [sys.executable, 'run.py', '--config=configs/train.py', f'--config.workdir={workdir}',
          f'--config.pipeline.plan={plan_path}', '--config.pipeline.codec=aqsgd4',
          '--config.aqsgd.warmup_epochs=1', '--config.aqsgd.buffers=disk',
          f'--config.data.path={corpus}', '--config.model=tiny_gpt',
          f'--config.train.steps={steps}', '--config.train.batch_size=4',
          f'--config.train.seq_len={SEQ}', '--config.train.warmup_steps=5',
          '--config.train.log_every=1', '--config.train.eval_every=0',
          '--config.ckpt.every=10', '--config.ckpt.keep=2']


@pytest.mark.slow
def test_aqsgd_run_resumes_exactly_after_sigkill(tmp_path):
  """mode=train over a 2-stage plan with disk buffers: killed after a checkpoint past warm-up,
  the resumed run logs the straight run's losses and bytes."""
  from tests.test_checkpoint import _losses
  plan().save(str(tmp_path / 'plan.json'))
  corpus = tmp_path / 'corpus.txt'
  with gzip.open(data_lib.DEFAULT_CORPUS) as f:
    corpus.write_bytes(f.read()[:2000])  # 59 training windows: an epoch is 15 steps
  steps = 40
  cmd = lambda name: _run_cmd(tmp_path / name, tmp_path / 'plan.json', corpus, steps)
  straight = subprocess.run(cmd('straight'), cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert straight.returncode == 0, straight.stderr
  assert 'buffers 2.fwd.0.send: disk' in straight.stdout
  killed = tmp_path / 'killed'
  proc = subprocess.Popen(cmd('killed'), cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while time.time() < deadline and not (
      is_checkpoint(str(killed / 'checkpoints')) and '20' in os.listdir(killed / 'checkpoints')):
    time.sleep(0.01)  # past warm-up (15 steps) and a checkpoint with filled buffers
  proc.send_signal(signal.SIGKILL)
  assert proc.wait() == -signal.SIGKILL
  resumed = subprocess.run(cmd('killed'), cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr
  assert 'resumed from' in resumed.stdout and 'start empty' not in resumed.stdout
  a_steps, a = _losses(tmp_path / 'straight')
  b_steps, b = _losses(killed)
  assert a_steps == b_steps == list(range(1, steps + 1))
  np.testing.assert_array_equal(b, a)
  bytes_of = lambda d: [r['bytes_sent'] for r in map(json.loads,
                                                     open(d / 'metrics.jsonl')) if 'bytes_sent' in r]
  sent = bytes_of(tmp_path / 'straight')
  assert bytes_of(killed) == sent
  assert sent[:15] == [sent[0]] * 15 and sent[-1] < sent[0]  # warm-up in fp32, then 4-bit deltas


@pytest.mark.slow
def test_aqsgd4_trains_as_well_as_fp32_through_the_pipeline():
  """200 steps of a small model over 32 samples (25 epochs), one warm-up epoch: the mean loss of
  the last 20 steps with AQ-SGD at 4 bits is within 0.05 of fp32's (both fall by more than 1)."""
  cfg = dataclasses.replace(get_model_config('tiny_gpt'), hidden=64, num_heads=4)
  p = plan()
  t = tcfg()
  t.update(steps=200, warmup_steps=10, lr=3e-3)
  runs = {}
  for name, codec in (('fp32', None), ('aqsgd4', AQSGD(4))):
    store = None if codec is None else BufferStore(32, 'host', 'float16', say=lambda *a: None)
    pipe = Pipeline(p, cfg, t, codec=codec, buffers=store, warmup_epochs=1)
    it = data_lib.BatchIterator(data_lib.load_corpus()[:32 * SEQ + 1], 4, SEQ, seed=0)
    runs[name] = np.array([pipe.step(next(it))['loss'] for _ in range(200)])
  start, fp32, aq = runs['fp32'][:5].mean(), runs['fp32'][-20:].mean(), runs['aqsgd4'][-20:].mean()
  assert start - fp32 > 1.0
  print(f"loss: start {start:.4f}, last-20 fp32 {fp32:.4f}, aqsgd4 {aq:.4f}")
  assert abs(aq - fp32) < 0.05, (fp32, aq)
