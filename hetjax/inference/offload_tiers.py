"""FlexGen's three memories for the offload engine: device, host and disk tiers, with byte counting.

Every tier stores named arrays and hands them to the device on `read` (a slice along one axis may be
read, e.g. the filled prefix of a KV cache) and takes device values back on `write` (rows along that
axis, e.g. one new token's keys and values).
  device  jax arrays on the accelerator (on a CPU-only machine: JAX's CPU device, whose size is a budget)
  host    numpy arrays; on GPU, weights go to JAX's `pinned_host` memory kind so device_put is a DMA
  disk    one np.memmap file per array in a cache folder
A `Ledger` counts resident bytes per tier (current and peak) and bytes moved per direction and kind,
so budgets are enforced from the counts and the metrics report what actually moved.
"""

from __future__ import annotations

import collections
import os
import threading

import jax
import numpy as np

TIERS = ('device', 'host', 'disk')


def nbytes(a) -> int:
  return int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize


class Ledger:
  """Thread-safe counters: resident bytes per tier (now and peak), bytes moved per (source, kind)."""

  def __init__(self):
    self._lock = threading.Lock()
    self.resident = dict.fromkeys(TIERS, 0)
    self.peak = dict.fromkeys(TIERS, 0)
    self.moved = collections.Counter()       # ('from_disk', 'weights') -> bytes

  def hold(self, tier: str, n: int) -> None:
    with self._lock:
      self.resident[tier] += n
      self.peak[tier] = max(self.peak[tier], self.resident[tier])

  def release(self, tier: str, n: int) -> None:
    with self._lock:
      self.resident[tier] -= n

  def move(self, direction: str, kind: str, n: int) -> None:
    with self._lock:
      self.moved[direction, kind] += n

  def moved_by_direction(self) -> dict[str, int]:
    out = collections.Counter()
    for (direction, _), n in self.moved.items():
      out[f'bytes_{direction}'] += n
    return dict(out)


def _index(axis: int, lo: int, hi: int) -> tuple:
  return (slice(None),) * axis + (slice(lo, hi),)


class Tier:
  """Named arrays in one memory. Subclasses implement _store/_load/_update."""
  name = ''

  def __init__(self, ledger: Ledger, device: jax.Device):
    self.ledger, self.device, self.arrays = ledger, device, {}

  def put(self, key, value) -> None:
    """Store a (host or device) array under `key`; counts its bytes as resident here."""
    self.ledger.hold(self.name, nbytes(value))
    self.arrays[key] = self._store(key, value)

  def zeros(self, key, shape, dtype) -> None:
    self.put(key, np.zeros(shape, dtype))

  def read(self, key, kind: str, axis: int = 0, length: int | None = None) -> jax.Array:
    """The array (or its first `length` entries along `axis`) on the device."""
    a = self.arrays[key]
    part = a if length is None or length == a.shape[axis] else a[_index(axis, 0, length)]
    out = self._load(part)
    if self.name != 'device':
      self.ledger.move(f'from_{self.name}', kind, nbytes(part))
    return out

  def write(self, key, rows, kind: str, axis: int, start: int) -> None:
    """Overwrite entries [start, start + rows.shape[axis]) along `axis` with a device value."""
    self._update(key, rows, _index(axis, start, start + rows.shape[axis]))
    if self.name != 'device':
      self.ledger.move(f'to_{self.name}', kind, nbytes(rows))

  def raw(self, key):
    """The stored object itself (numpy/memmap for host and disk: CPU attention works on it in place)."""
    return self.arrays[key]

  def drop_all(self) -> None:
    for a in self.arrays.values():
      self.ledger.release(self.name, nbytes(a))
    self.arrays.clear()


class DeviceTier(Tier):
  name = 'device'

  def _store(self, key, value):
    return jax.device_put(value, self.device)

  def _load(self, a):
    return a

  def _update(self, key, rows, index):
    self.arrays[key] = _set_rows(self.arrays[key], rows, index[-1].start, len(index) - 1)


def _set_rows(a, rows, start, axis):
  return jax.lax.dynamic_update_slice_in_dim(a, rows.astype(a.dtype), start, axis)


_set_rows = jax.jit(_set_rows, static_argnums=(3,), donate_argnums=(0,))


class HostTier(Tier):
  """numpy arrays; with `pinned` (GPU), arrays stored whole (weights) live in pinned host memory."""
  name = 'host'

  def __init__(self, ledger, device, pinned: bool = False):
    super().__init__(ledger, device)
    self.pinned = pinned and device.platform != 'cpu'

  def _store(self, key, value):
    if self.pinned and key[0] == 'w':
      from jax.sharding import SingleDeviceSharding
      return jax.device_put(np.asarray(value), SingleDeviceSharding(self.device, memory_kind='pinned_host'))
    return np.array(value)

  def _load(self, a):
    if isinstance(a, jax.Array):   # pinned host -> device memory: one DMA
      from jax.sharding import SingleDeviceSharding
      return jax.device_put(a, SingleDeviceSharding(self.device, memory_kind='device'))
    return jax.device_put(a, self.device)

  def _update(self, key, rows, index):
    self.arrays[key][index] = np.asarray(rows)


class DiskTier(Tier):
  """One memmap file per array under `folder` (created on first use, removed by `close`).
  cold=True drops a file's pages from the OS page cache after every write and read, so each read
  comes from the disk itself (otherwise a re-read of a small model is a memory copy)."""
  name = 'disk'

  def __init__(self, ledger, device, folder: str, cold: bool = True):
    super().__init__(ledger, device)
    self.folder, self.cold = folder, cold and hasattr(os, 'posix_fadvise')

  def _path(self, key) -> str:
    return os.path.join(self.folder, '_'.join(map(str, key)).replace('/', '.') + '.npy')

  def _store(self, key, value):
    os.makedirs(self.folder, exist_ok=True)
    value = np.asarray(value)
    mm = np.lib.format.open_memmap(self._path(key), mode='w+', dtype=value.dtype, shape=value.shape)
    mm[...] = value
    self._evict(mm)
    return mm

  def read(self, key, kind, axis=0, length=None):
    out = super().read(key, kind, axis, length)
    self._evict(self.arrays[key], flush=False)
    return out

  def _load(self, a):
    return jax.device_put(np.array(a), self.device)   # np.array: the read happens here, not later

  def _update(self, key, rows, index):
    mm = self.arrays[key]
    mm[index] = np.asarray(rows)
    self._evict(mm)

  def _evict(self, mm, flush: bool = True) -> None:
    if not self.cold:
      return
    if flush:
      mm.flush()   # dirty pages must reach the disk before they can be dropped
    fd = os.open(mm.filename, os.O_RDONLY)
    try:
      os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
      os.close(fd)

  def close(self) -> None:
    self.drop_all()
    if os.path.isdir(self.folder):
      for f in os.listdir(self.folder):
        os.remove(os.path.join(self.folder, f))
      os.rmdir(self.folder)


def choose_tiers(sizes, fractions) -> list[str]:
  """FlexGen's rule for splitting by percentage: item i goes to the tier whose cumulative fraction
  range holds the midpoint of its cumulative size. fractions: (device, host, disk), summing to 1."""
  total = float(sum(sizes)) or 1.0
  bounds = np.cumsum(fractions)
  out, seen = [], 0.0
  for s in sizes:
    mid = (seen + s / 2) / total
    seen += s
    out.append(TIERS[min(int(np.searchsorted(bounds, mid, side='right')), 2)])
  return out
