"""Corpora (the shipped one or the user's), a byte-level tokenizer, a deterministic split, and a
resumable iterator over fixed windows that tells every batch which samples it holds."""

from __future__ import annotations

import gzip
import os

import numpy as np

from hetjax.errors import HetjaxError

DEFAULT_CORPUS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              'data', 'jargon.txt.gz')
TEXT_SUFFIXES = ('.txt', '.txt.gz', '.md', '.text')


class ByteTokenizer:
  """UTF-8 bytes are the tokens: vocabulary 256, works offline, round-trips any text."""
  vocab_size = 256

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode('utf-8'), dtype=np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    return bytes(int(i) % 256 for i in ids).decode('utf-8', errors='replace')


def _read_text(path: str) -> bytes:
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'rb') as f:
    return f.read()


def _load_npy(path: str) -> np.ndarray:
  try:
    tokens = np.load(path, mmap_mode='r')
  except (OSError, ValueError) as e:
    raise HetjaxError(f'cannot read token file {path}: {e}') from None
  if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
    raise HetjaxError(f'{path} must hold a 1-D integer array of token ids, '
                      f'got {tokens.dtype} of shape {tokens.shape}')
  if len(tokens) and int(tokens.min()) < 0:
    raise HetjaxError(f'{path} holds negative token ids')
  return np.asarray(tokens, dtype=np.int32)


def load_corpus(path: str = DEFAULT_CORPUS) -> np.ndarray:
  """Token ids of a text file (.txt or .gz; bytes), a folder of text files (sorted by name,
  joined by a newline) or a pre-tokenized 1-D integer .npy."""
  path = path or DEFAULT_CORPUS
  if not os.path.exists(path):
    raise HetjaxError(f'corpus not found: {path}')
  if path.endswith('.npy'):
    return _load_npy(path)
  if os.path.isdir(path):
    names = sorted(n for n in os.listdir(path) if n.endswith(TEXT_SUFFIXES))
    if not names:
      raise HetjaxError(f'folder {path} holds no text files ({", ".join(TEXT_SUFFIXES)})')
    data = b'\n'.join(_read_text(os.path.join(path, n)) for n in names)
  else:
    data = _read_text(path)
  return np.frombuffer(data, dtype=np.uint8).astype(np.int32)


def train_val_split(tokens: np.ndarray, val_fraction: float = 0.05):
  """The last `val_fraction` of the corpus is validation: deterministic, no overlap."""
  if not 0 <= val_fraction < 1:
    raise HetjaxError(f'val_fraction must be in [0, 1), got {val_fraction}')
  cut = int(len(tokens) * (1 - val_fraction))
  return tokens[:cut], tokens[cut:]


def num_windows(num_tokens: int, seq_len: int) -> int:
  """Fixed windows of seq_len + 1 tokens, window i starting at token i * seq_len."""
  return max(0, (num_tokens - 1) // seq_len)


class BatchIterator:
  """The training set as fixed windows (sample i = tokens[i*seq_len : (i+1)*seq_len + 1]), visited
  in a fresh permutation each epoch. Batch n holds the samples at positions n*batch_size ... of the
  endless sequence perm(epoch 0) + perm(epoch 1) + ..., so it depends only on (seed, n) and the
  position (`state()`) restores exactly. Every batch carries `ids`, the sample indices (int32),
  which AQ-SGD uses to key its per-sample buffers. A batch may straddle two epochs."""

  def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int = 0, step: int = 0):
    self.num_samples = num_windows(len(tokens), seq_len)
    if self.num_samples < 1:
      raise HetjaxError(f'corpus of {len(tokens)} tokens is too short for seq_len {seq_len}')
    if batch_size <= 0:
      raise HetjaxError(f'batch_size must be positive, got {batch_size}')
    self.tokens, self.batch_size, self.seq_len, self.seed = tokens, batch_size, seq_len, seed
    self.step = step
    self._perm = (None, None)  # (epoch, permutation) cache

  def permutation(self, epoch: int) -> np.ndarray:
    if self._perm[0] != epoch:
      self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.num_samples))
    return self._perm[1]

  def sample_ids(self, step: int) -> np.ndarray:
    pos = step * self.batch_size + np.arange(self.batch_size)
    epochs, within = np.divmod(pos, self.num_samples)
    return np.array([self.permutation(int(e))[i] for e, i in zip(epochs, within)], np.int32)

  def windows(self, ids) -> np.ndarray:
    starts = np.asarray(ids, np.int64) * self.seq_len
    return np.stack([np.asarray(self.tokens[s:s + self.seq_len + 1]) for s in starts])

  def batch(self, step: int) -> dict:
    ids = self.sample_ids(step)
    w = self.windows(ids)
    # 'epoch': epochs completed before this batch (AQ-SGD sends in full precision while warming up).
    return {'inputs': w[:, :-1], 'targets': w[:, 1:], 'ids': ids,
            'epoch': np.float32(step * self.batch_size / self.num_samples)}

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    out = self.batch(self.step)
    self.step += 1
    return out

  @property
  def epoch(self) -> float:
    """Epochs completed before the next batch (fractional)."""
    return self.step * self.batch_size / self.num_samples

  def state(self) -> dict:
    epoch, position = divmod(self.step * self.batch_size, self.num_samples)
    return {'step': self.step, 'epoch': epoch, 'position': position}

  def restore(self, state: dict) -> None:
    if 'step' in state:
      self.step = int(state['step'])
      return
    pos = int(state['epoch']) * self.num_samples + int(state['position'])
    if pos % self.batch_size:
      raise HetjaxError(f'data position {pos} is not a multiple of batch_size {self.batch_size}')
    self.step = pos // self.batch_size


def eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int, num_batches: int) -> list[dict]:
  """Fixed validation batches (the same every call)."""
  it = BatchIterator(tokens, batch_size, seq_len, seed=12345)
  return [it.batch(i) for i in range(num_batches)]
