"""Data with identities: fixed windows, epoch permutations, exact resume, user corpora."""

import gzip

import numpy as np
import pytest

from hetjax import data as data_lib
from hetjax.errors import HetjaxError


def _tokens(n=1000):
  return np.arange(n, dtype=np.int32) % 251


def test_batches_carry_ids_of_their_windows():
  tokens = _tokens()
  it = data_lib.BatchIterator(tokens, 4, 10, seed=0)
  b = next(it)
  assert b['ids'].dtype == np.int32 and b['ids'].shape == (4,)
  for row, i in enumerate(b['ids']):
    np.testing.assert_array_equal(b['inputs'][row], tokens[i * 10:i * 10 + 10])
    np.testing.assert_array_equal(b['targets'][row], tokens[i * 10 + 1:i * 10 + 11])


def test_each_epoch_visits_every_window_once_in_a_new_order():
  it = data_lib.BatchIterator(_tokens(), 3, 10, seed=5)  # 99 windows, 33 batches per epoch
  n = it.num_samples
  assert n == 99
  ids = np.concatenate([next(it)['ids'] for _ in range(2 * n // 3)])
  first, second = ids[:n], ids[n:]
  assert sorted(first) == list(range(n)) and sorted(second) == list(range(n))
  assert not np.array_equal(first, second)
  assert it.state() == {'step': 66, 'epoch': 2, 'position': 0}


def test_resume_from_step_or_epoch_position_is_exact():
  a = data_lib.BatchIterator(_tokens(), 4, 10, seed=3)  # 99 windows: batch 24 straddles epochs
  seen = [next(a) for _ in range(40)]
  b = data_lib.BatchIterator(_tokens(), 4, 10, seed=3)
  b.restore({"step": 23})
  for k in range(23, 40):
    got = next(b)
    np.testing.assert_array_equal(got['ids'], seen[k]['ids'])
    np.testing.assert_array_equal(got['inputs'], seen[k]['inputs'])
  c = data_lib.BatchIterator(_tokens(), 4, 10, seed=3)
  c.restore({'epoch': 1, 'position': 1})  # = step 25
  np.testing.assert_array_equal(next(c)['ids'], seen[25]['ids'])
  with pytest.raises(HetjaxError, match='multiple of batch_size'):
    c.restore({'epoch': 0, 'position': 3})
  d = data_lib.BatchIterator(_tokens(), 4, 10, seed=4)
  assert not np.array_equal(next(d)['ids'], seen[0]['ids'])


def test_user_corpora_text_folder_npy(tmp_path):
  (tmp_path / 'one.txt').write_text('hello ')
  with gzip.open(tmp_path / 'two.txt.gz', 'wb') as f:
    f.write('world'.encode())
  (tmp_path / 'skip.bin').write_bytes(b'\x00')
  folder = data_lib.load_corpus(str(tmp_path))
  assert data_lib.ByteTokenizer().decode(folder) == 'hello \nworld'
  np.testing.assert_array_equal(data_lib.load_corpus(str(tmp_path / 'one.txt')), folder[:6])
  np.save(tmp_path / 'tok.npy', np.array([5, 70000, 3], np.int64))
  np.testing.assert_array_equal(data_lib.load_corpus(str(tmp_path / 'tok.npy')), [5, 70000, 3])
  np.save(tmp_path / 'bad.npy', np.zeros((2, 2), np.float32))
  with pytest.raises(HetjaxError, match='1-D integer'):
    data_lib.load_corpus(str(tmp_path / 'bad.npy'))
  with pytest.raises(HetjaxError, match='not found'):
    data_lib.load_corpus(str(tmp_path / 'missing.txt'))
  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(HetjaxError, match='no text files'):
    data_lib.load_corpus(str(empty))
  with pytest.raises(HetjaxError, match='too short'):
    data_lib.BatchIterator(np.arange(5), 2, 10)


def test_train_mode_reads_data_path_and_starts_from_init_from(tmp_path):
  """mode=train on a user's text file, fine-tuning a saved checkpoint (--config.init_from): its
  step-0 validation loss is the checkpoint's, not a fresh model's."""
  import json
  from configs import train as train_config
  from hetjax import train as train_lib
  from hetjax.checkpoint.manager import Checkpointer
  from hetjax.models.config import model_config_from
  from hetjax.models.model import build_model
  from hetjax.modes import train as train_mode
  text = tmp_path / 'corpus.txt'
  text.write_text('the quick brown fox jumps over the lazy dog. ' * 400)
  c = train_config.get_config()
  c.model_overrides.update(num_layers=1, hidden=32, num_heads=2, num_kv_heads=2)
  c.train.update(steps=1, batch_size=2, seq_len=16, warmup_steps=0, eval_every=1, eval_batches=1)
  c.data.path, c.init_from, c.workdir = str(text), str(tmp_path / 'ckpt'), str(tmp_path / 'run')
  mcfg = model_config_from(c)
  saved = train_lib.TrainState(build_model(mcfg, seed=5), train_lib.make_optimizer(c.train),
                               data_lib.BatchIterator(np.arange(100), 2, 16))
  ckpt = Checkpointer(str(tmp_path / 'ckpt' / 'checkpoints'))
  saved.save(ckpt)
  ckpt.close()
  train_mode.run(c, c.workdir)
  val = data_lib.eval_batches(data_lib.train_val_split(data_lib.load_corpus(str(text)))[1], 2, 16, 1)
  first = [json.loads(l) for l in open(tmp_path / 'run' / 'metrics.jsonl')][0]
  assert first['step'] == 0
  assert abs(first['val_loss'] - saved.evaluate(val)) < 1e-6
  fresh = train_lib.TrainState(build_model(mcfg, seed=c.seed), saved.optimizer, saved.data)
  assert abs(first['val_loss'] - fresh.evaluate(val)) > 1e-3
  c.init_from, c.workdir = str(tmp_path / 'nothing'), str(tmp_path / 'run2')
  with pytest.raises(HetjaxError, match='no hetjax checkpoint'):
    train_mode.run(c, c.workdir)
