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
  """mode=train on a user's text file; a second run with init_from=<first workdir> starts from the
  first run's trained parameters (its step-0 validation loss is the first run's last)."""
  import json
  from configs import train as train_config
  from hetjax.modes import train as train_mode
  text = tmp_path / 'corpus.txt'
  text.write_text('the quick brown fox jumps over the lazy dog. ' * 400)
  def cfg(workdir, **top):
    c = train_config.get_config()
    c.model_overrides.update(num_layers=1, hidden=32, num_heads=2, num_kv_heads=2)
    c.train.update(steps=4, batch_size=2, seq_len=16, warmup_steps=1, eval_every=4, eval_batches=1,
                   log_every=4, lr=1e-2)
    c.data.path, c.workdir = str(text), str(workdir)
    c.update(top)
    return c
  first, second = tmp_path / 'a', tmp_path / 'b'
  train_mode.run(cfg(first), str(first))
  train_mode.run(cfg(second, init_from=str(first), seed=7), str(second))
  log = lambda w: [json.loads(l) for l in open(w / 'metrics.jsonl') if 'val_loss' in l]
  a, b = log(first), log(second)
  assert a[0]['val_loss'] - a[-1]['val_loss'] > 0.1  # the first run learned something
  assert b[0]['step'] == 0 and abs(b[0]['val_loss'] - a[-1]['val_loss']) < 1e-5
  with pytest.raises(HetjaxError):
    train_mode.run(cfg(tmp_path / 'c', init_from=str(tmp_path / 'nothing')), str(tmp_path / 'c'))
