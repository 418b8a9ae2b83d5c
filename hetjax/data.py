"""The shipped corpus, a byte-level tokenizer, a deterministic split and a resumable batch iterator."""

from __future__ import annotations

import gzip
import os

import numpy as np

from hetjax.errors import HetjaxError

DEFAULT_CORPUS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              'data', 'jargon.txt.gz')


class ByteTokenizer:
  """UTF-8 bytes are the tokens: vocabulary 256, works offline, round-trips any text."""
  vocab_size = 256

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode('utf-8'), dtype=np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    return bytes(int(i) % 256 for i in ids).decode('utf-8', errors='replace')


def load_corpus(path: str = DEFAULT_CORPUS) -> np.ndarray:
  """Token ids of a text file (.txt or .txt.gz)."""
  if not os.path.exists(path):
    raise HetjaxError(f'corpus file not found: {path}')
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'rb') as f:
    data = f.read()
  return np.frombuffer(data, dtype=np.uint8).astype(np.int32)


def train_val_split(tokens: np.ndarray, val_fraction: float = 0.05):
  """The last `val_fraction` of the corpus is validation: deterministic, no overlap."""
  cut = int(len(tokens) * (1 - val_fraction))
  return tokens[:cut], tokens[cut:]


class BatchIterator:
  """Random windows of `seq_len + 1` tokens. Batch n depends only on (seed, n), so the position
  (`state()`) is a single integer that can be saved and restored exactly."""

  def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int = 0, step: int = 0):
    if len(tokens) <= seq_len + 1:
      raise HetjaxError(f'corpus of {len(tokens)} tokens is too short for seq_len {seq_len}')
    self.tokens, self.batch_size, self.seq_len, self.seed = tokens, batch_size, seq_len, seed
    self.step = step

  def batch(self, step: int) -> dict:
    rng = np.random.default_rng([self.seed, step])
    starts = rng.integers(0, len(self.tokens) - self.seq_len - 1, size=self.batch_size)
    windows = np.stack([self.tokens[s:s + self.seq_len + 1] for s in starts])
    return {'inputs': windows[:, :-1], 'targets': windows[:, 1:]}

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    out = self.batch(self.step)
    self.step += 1
    return out

  def state(self) -> dict:
    return {'step': self.step}

  def restore(self, state: dict) -> None:
    self.step = int(state['step'])


def eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int, num_batches: int) -> list[dict]:
  """Fixed validation batches (the same every call)."""
  it = BatchIterator(tokens, batch_size, seq_len, seed=12345)
  return [it.batch(i) for i in range(num_batches)]
