"""Text <-> token ids for a model: the Hugging Face tokenizer that came with a converted checkpoint
(`tokenizers` package, read from <checkpoint>/tokenizer/tokenizer.json), or the byte tokenizer that
corpus-trained models use."""

from __future__ import annotations

import os

import numpy as np

from hetjax.data import ByteTokenizer
from hetjax.errors import HetjaxError

# Files that travel with a model between Hugging Face folders and hetjax checkpoints.
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json',
                   'vocab.json', 'merges.txt', 'tokenizer.model', 'generation_config.json')
FOLDER = 'tokenizer'


class HFTokenizer:
  """A `tokenizers.Tokenizer` with the byte tokenizer's interface."""

  def __init__(self, path: str):
    from tokenizers import Tokenizer
    try:
      self.tokenizer = Tokenizer.from_file(path)
    except Exception as e:  # the tokenizers package raises plain Exceptions for bad files
      raise HetjaxError(f'cannot read tokenizer {path}: {e}') from None
    self.vocab_size = self.tokenizer.get_vocab_size()

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self.tokenizer.encode(text).ids, np.int32)

  def decode(self, ids) -> str:
    return self.tokenizer.decode([int(i) for i in ids])


def tokenizer_folder(checkpoint: str) -> str:
  """Where a checkpoint keeps its tokenizer files (a workdir or the checkpoint folder itself)."""
  inner = os.path.join(checkpoint, 'checkpoints')
  return os.path.join(inner if os.path.isdir(inner) else checkpoint, FOLDER)


def tokenizer_for(checkpoint: str = ''):
  """The checkpoint's Hugging Face tokenizer if it has one, else the byte tokenizer."""
  if checkpoint:
    path = os.path.join(tokenizer_folder(checkpoint), 'tokenizer.json')
    if os.path.isfile(path):
      return HFTokenizer(path)
  return ByteTokenizer()


def eos_ids(checkpoint: str = '') -> tuple[int, ...]:
  """The end-of-sequence ids of a converted checkpoint: `eos_token_id` (an id or a list) of the
  generation_config.json that came with it; none for other checkpoints."""
  import json
  path = os.path.join(tokenizer_folder(checkpoint), 'generation_config.json') if checkpoint else ''
  if not path or not os.path.isfile(path):
    return ()
  try:
    with open(path) as f:
      eos = json.load(f).get('eos_token_id')
  except (OSError, ValueError, AttributeError) as e:
    raise HetjaxError(f'cannot read {path}: {e}') from None
  eos = [] if eos is None else eos if isinstance(eos, list) else [eos]
  if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in eos):
    raise HetjaxError(f'{path}: eos_token_id must be a token id or a list of them, got {eos!r}')
  return tuple(eos)


def copy_tokenizer_files(src_folder: str, dst_folder: str) -> list[str]:
  """Copy the tokenizer files that exist in `src_folder` into `dst_folder`; returns their names."""
  import shutil
  names = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(src_folder, n))]
  if names:
    os.makedirs(dst_folder, exist_ok=True)
    for n in names:
      shutil.copyfile(os.path.join(src_folder, n), os.path.join(dst_folder, n))
  return names
