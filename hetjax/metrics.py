"""Run outputs: the workdir, metrics.jsonl (one JSON object per logged step) and JSON files.

Both are strict JSON: a non-finite number (NaN, inf) is written as null, never as a bare `NaN`."""

from __future__ import annotations

import json
import math
import os
import time

import numpy as np

from hetjax.errors import HetjaxError


def make_workdir(workdir: str | None, name: str = 'run') -> str:
  """Create the workdir and check, before any work, that files can be written there."""
  if not workdir:
    workdir = os.path.join('runs', f'{name}-{time.strftime("%Y%m%d-%H%M%S")}-{os.getpid()}')
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise HetjaxError(f'cannot create workdir {workdir}: {e.strerror or e}') from None
  check_writable(workdir)
  return workdir


def check_writable(directory: str) -> None:
  """Write and delete a probe file: catches read-only folders and full disks (also for root)."""
  probe = os.path.join(directory, f'.write-probe.{os.getpid()}')
  try:
    with open(probe, 'wb') as f:
      f.write(b'\0' * 4096)
      f.flush()
      os.fsync(f.fileno())
  except OSError as e:
    raise HetjaxError(f'cannot write to {directory}: {e.strerror or e}') from None
  finally:
    if os.path.exists(probe):
      os.remove(probe)


def _plain(x):
  """numpy / jax scalars -> Python numbers; non-finite floats -> None."""
  if isinstance(x, np.generic) or (hasattr(x, 'item') and getattr(x, 'shape', None) == ()):
    x = x.item()
  if isinstance(x, float) and not math.isfinite(x):
    return None
  return x


def strict(obj):
  """`obj` with every non-finite float replaced by None (so json.dumps(allow_nan=False) works)."""
  if isinstance(obj, dict):
    return {k: strict(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [strict(v) for v in obj]
  return _plain(obj)


def write_json(path: str, obj) -> None:
  """Atomic write: a crash leaves the old file or the new one, never half of one."""
  tmp = f'{path}.tmp.{os.getpid()}'
  try:
    with open(tmp, 'w') as f:
      json.dump(strict(obj), f, indent=2, default=_plain, allow_nan=False)
      f.write('\n')
    os.replace(tmp, path)
  except OSError as e:
    raise HetjaxError(f'cannot write {path}: {e.strerror or e}') from None


class MetricsLog:
  """Appends one JSON line per logged step to <workdir>/metrics.jsonl."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, 'metrics.jsonl')

  def log(self, step: int, **metrics) -> None:
    record = strict({'step': int(step), **metrics})
    try:
      with open(self.path, 'a') as f:
        f.write(json.dumps(record, allow_nan=False) + '\n')
        f.flush()
    except OSError as e:
      raise HetjaxError(f'cannot write {self.path}: {e.strerror or e}') from None

  def read(self) -> list[dict]:
    if not os.path.exists(self.path):
      return []
    with open(self.path) as f:
      return [json.loads(line) for line in f if line.strip()]

  def keep_until(self, step: int) -> None:
    """Drop records after `step` (a resumed run logs them again); step < 0 drops all. Atomic."""
    kept = [r for r in self.read() if r['step'] <= step] if step >= 0 else []
    tmp = f'{self.path}.tmp.{os.getpid()}'
    with open(tmp, 'w') as f:
      f.writelines(json.dumps(r, allow_nan=False) + '\n' for r in kept)
    os.replace(tmp, self.path)
