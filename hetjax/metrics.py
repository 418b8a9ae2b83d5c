"""Run outputs: the workdir, metrics.jsonl (one JSON object per logged step) and JSON files."""

from __future__ import annotations

import json
import os
import time

import numpy as np


def make_workdir(workdir: str | None, name: str = 'run') -> str:
  if not workdir:
    workdir = os.path.join('runs', f'{name}-{time.strftime("%Y%m%d-%H%M%S")}-{os.getpid()}')
  os.makedirs(workdir, exist_ok=True)
  return workdir


def _plain(x):
  if isinstance(x, (np.generic,)):
    return x.item()
  if hasattr(x, 'item') and getattr(x, 'shape', None) == ():
    return x.item()
  return x


def write_json(path: str, obj) -> None:
  """Atomic write: a crash leaves the old file or the new one, never half of one."""
  tmp = f'{path}.tmp.{os.getpid()}'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, default=_plain)
    f.write('\n')
  os.replace(tmp, path)


class MetricsLog:
  """Appends one JSON line per logged step to <workdir>/metrics.jsonl."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, 'metrics.jsonl')

  def log(self, step: int, **metrics) -> None:
    record = {'step': int(step), **{k: _plain(v) for k, v in metrics.items()}}
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')
      f.flush()

  def read(self) -> list[dict]:
    if not os.path.exists(self.path):
      return []
    with open(self.path) as f:
      return [json.loads(line) for line in f if line.strip()]
