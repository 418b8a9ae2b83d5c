"""Training on the shipped corpus lowers validation loss; data iteration is deterministic."""

import json
import os

import ml_collections
import numpy as np
import pytest

from hetjax import data as data_lib
from hetjax.errors import HetjaxError
from hetjax.models.config import get_model_config
from hetjax.train import train
from configs import base


def small_train_config(steps):
  t = base.train_fields()
  t.update(steps=steps, batch_size=8, seq_len=64, warmup_steps=20, log_every=50, eval_every=steps,
           eval_batches=4)
  return t


@pytest.mark.slow
def test_training_lowers_validation_loss(tmp_path):
  mcfg = get_model_config('tiny_gpt', num_layers=2, hidden=96, num_heads=4)
  lines = []
  train(mcfg, small_train_config(250), str(tmp_path), seed=0, print_fn=lines.append)
  records = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
  assert {'step', 'loss', 'step_time_s'} <= set(records[1])
  # Validation loss of an untrained byte model is about ln(256) = 5.55; after 250 steps it must
  # have fallen by more than 2 nats (measured: 5.55 -> about 2.5).
  evals = [r for r in records if 'val_loss' in r]
  initial, final = evals[0], evals[-1]
  assert initial['step'] == 0 and final['step'] == 250
  assert initial['val_loss'] > 5.0
  assert initial['val_loss'] - final['val_loss'] > 2.0, (initial, final)
  assert any('steps/s' in l for l in lines)


def test_batches_depend_only_on_seed_and_position():
  tokens = data_lib.load_corpus()
  assert 1_000_000 < len(tokens) < 5_000_000 and tokens.max() < 256
  train_tokens, val_tokens = data_lib.train_val_split(tokens)
  assert len(train_tokens) + len(val_tokens) == len(tokens)
  a = data_lib.BatchIterator(train_tokens, 4, 32, seed=1)
  first = [next(a) for _ in range(5)]
  b = data_lib.BatchIterator(train_tokens, 4, 32, seed=1)
  b.restore({'step': 3})
  np.testing.assert_array_equal(next(b)['inputs'], first[3]['inputs'])
  np.testing.assert_array_equal(first[0]['targets'][:, :-1], first[0]['inputs'][:, 1:])
  c = data_lib.BatchIterator(train_tokens, 4, 32, seed=2)
  assert not np.array_equal(next(c)['inputs'], first[0]['inputs'])


def test_tokenizer_round_trip():
  tok = data_lib.ByteTokenizer()
  text = 'hacker: n. [originally, someone who makes furniture with an axe] — ünïcode'
  assert tok.decode(tok.encode(text)) == text


def test_train_rejects_seq_len_past_max_len(tmp_path):
  mcfg = get_model_config('tiny_gpt', max_len=32)
  with pytest.raises(HetjaxError, match='seq_len'):
    train(mcfg, small_train_config(5), str(tmp_path))
