"""Per-sample codec state (AQ-SGD activation buffers), sized for the whole training set.

One BufferStore per process; each end of a link keeps its own. Per key (boundary, direction,
replica) it holds `num_samples` rows of one sample's state (a pytree, e.g. an activation of shape
(seq, hidden)) and a `filled` bitmap. Placements:
  device: jax arrays on one device (fast, costs accelerator memory);
  host:   numpy arrays in RAM;
  disk:   np.memmap files in `folder` (the AQ-SGD paper's choice: an fp16 memmap per boundary).
Floating state is kept in `dtype` (float16 / bfloat16 / float32). `prefetch(key, ids)` reads the
next micro-batch's rows in a background thread; `gather` then takes them without waiting on I/O.
"""

from __future__ import annotations

import concurrent.futures
import functools
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np

from hetjax.errors import HetjaxError

PLACEMENTS = ('device', 'host', 'disk')
DTYPES = ('float16', 'bfloat16', 'float32')


def key_name(key) -> str:
  """('b0', 'fwd', 0) -> 'b0.fwd.0': a file and checkpoint name."""
  return '.'.join(str(k) for k in (key if isinstance(key, tuple) else (key,)))


def gib(n: int) -> str:
  return f'{n / 2**30:.3f} GiB'


def available_bytes(placement: str, folder: str | None) -> int | None:
  """Free memory / disk for a placement, or None where it cannot be read."""
  if placement == 'host':
    return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_AVPHYS_PAGES')
  if placement == 'disk':
    return shutil.disk_usage(folder).free
  stats = jax.devices()[0].memory_stats() or {}
  if 'bytes_limit' in stats:
    return stats['bytes_limit'] - stats.get('bytes_in_use', 0)
  return None


@functools.partial(jax.jit, donate_argnums=0)
def _set_rows(buf, ids, rows):
  """buf[ids] = rows in place (the old buffer is donated, not copied)."""
  return buf.at[ids].set(rows.astype(buf.dtype))


class BufferStore:

  def __init__(self, num_samples: int, placement: str = 'host', dtype: str = 'float16',
               folder: str | None = None, budget_bytes: int | None = None, say=print):
    if placement not in PLACEMENTS:
      raise HetjaxError(f'unknown buffer placement {placement!r}; use one of {", ".join(PLACEMENTS)}')
    if dtype not in DTYPES:
      raise HetjaxError(f'buffer dtype must be one of {", ".join(DTYPES)}, got {dtype!r}')
    if placement == 'disk' and not folder:
      raise HetjaxError('disk buffers need a folder (the workdir)')
    if num_samples <= 0:
      raise HetjaxError(f'a buffer store needs a positive number of samples, got {num_samples}')
    self.num_samples, self.placement, self.folder = num_samples, placement, folder
    self.dtype = jnp.dtype(dtype)
    self.budget_bytes, self.say = budget_bytes, say
    self.warming_up = False  # while True, gather returns None: everything goes full precision
    self._bufs: dict = {}     # key -> (treedef, [leaf arrays])
    self._filled: dict = {}   # key -> bool (num_samples,)
    self._pending: dict = {}  # key -> (ids tuple, future)
    self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='buffer-prefetch')
    self.prefetch_hits = 0    # gathers served by a prefetch

  # ---- sizing -------------------------------------------------------------------------------

  def _leaf_dtype(self, dtype):
    return self.dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.dtype(dtype)

  def bytes_for(self, sample_spec) -> int:
    return sum(self.num_samples * math.prod(l.shape) * self._leaf_dtype(l.dtype).itemsize
               for l in jax.tree.leaves(sample_spec))

  @property
  def nbytes(self) -> int:
    return sum(a.nbytes for _, leaves in self._bufs.values() for a in leaves)

  def reserve(self, key, sample_spec) -> None:
    """Allocate `key` for state shaped like `sample_spec` (one sample's ShapeDtypeStruct pytree);
    refuses with numbers when the store would not fit its budget or the placement's free space."""
    if key in self._bufs:
      return
    need = self.bytes_for(sample_spec)
    total = self.nbytes + need
    limits = [('budget', self.budget_bytes)]
    if self.placement == 'disk':
      os.makedirs(self.folder, exist_ok=True)
    limits.append((f'free {self.placement}', available_bytes(self.placement, self.folder)))
    for what, limit in limits:
      if limit is not None and total > limit:
        raise HetjaxError(
            f'{self.placement} buffers for {key_name(key)} need {gib(need)} '
            f'({self.num_samples} samples x {self._row_desc(sample_spec)}; {gib(total)} in all), '
            f'more than the {what} of {gib(limit)}; use fewer samples, a smaller buffer dtype or '
            f'another placement')
    leaves, treedef = jax.tree.flatten(sample_spec)
    self._bufs[key] = (treedef, [self._alloc(key, i, l) for i, l in enumerate(leaves)])
    self._filled[key] = np.zeros(self.num_samples, bool)
    self.say(f'buffers {key_name(key)}: {self.placement}, {gib(need)} '
             f'({self.num_samples} x {self._row_desc(sample_spec)}); store {gib(total)}')

  def _row_desc(self, spec) -> str:
    return ' + '.join(f'{self._leaf_dtype(l.dtype).name}{list(l.shape)}' for l in jax.tree.leaves(spec))

  def _alloc(self, key, i, leaf):
    shape, dtype = (self.num_samples,) + tuple(leaf.shape), self._leaf_dtype(leaf.dtype)
    if self.placement == 'device':
      return jnp.zeros(shape, dtype)
    if self.placement == 'host':
      return np.zeros(shape, dtype)
    path = os.path.join(self.folder, f'{key_name(key)}.{i}.buf')
    return np.memmap(path, dtype=dtype, mode='w+', shape=shape)

  # ---- rows ---------------------------------------------------------------------------------

  def filled(self, key) -> np.ndarray:
    return self._filled[key] if key in self._filled else np.zeros(self.num_samples, bool)

  def _check_ids(self, ids) -> np.ndarray:
    ids = np.asarray(ids, np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= self.num_samples):
      raise HetjaxError(f'sample ids must be in [0, {self.num_samples}), got {ids.min()}..{ids.max()}')
    return ids

  def _read(self, key, ids):
    treedef, leaves = self._bufs[key]
    if self.placement == 'device':
      rows = [jnp.take(a, jnp.asarray(ids), axis=0) for a in leaves]
    else:
      rows = [np.asarray(a[ids]) for a in leaves]  # fancy indexing copies (reads the memmap)
    return jax.tree.unflatten(treedef, rows)

  def prefetch(self, key, ids) -> None:
    """Start reading these rows in the background (host/disk); gather(key, same ids) uses them."""
    ids = self._check_ids(ids)
    if self.placement == 'device' or key not in self._bufs or self.warming_up:
      return
    if not self._filled[key][ids].all():
      return
    self._drop_pending(key)
    self._pending[key] = (tuple(ids), self._pool.submit(self._read, key, ids))

  def _drop_pending(self, key):
    pending = self._pending.pop(key, None)
    if pending is not None:
      pending[1].result()  # let the read finish before rows change under it

  def gather(self, key, ids):
    """State rows for `ids` (batch axis first), or None when any has no buffer yet (or warm-up)."""
    ids = self._check_ids(ids)
    if self.warming_up or key not in self._bufs or not self._filled[key][ids].all():
      return None
    pending = self._pending.pop(key, None)
    if pending is not None and pending[0] == tuple(ids):
      self.prefetch_hits += 1
      return pending[1].result()
    if pending is not None:
      pending[1].result()
    return self._read(key, ids)

  def scatter(self, key, ids, state) -> None:
    """Store the new state rows of `ids` (allocating `key` on first use). With repeated ids the
    last row wins, the same on every placement."""
    ids = self._check_ids(ids)
    if key not in self._bufs:
      spec = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), state)
      self.reserve(key, spec)
    self._drop_pending(key)
    last = len(ids) - 1 - np.unique(ids[::-1], return_index=True)[1]  # last occurrence of each id
    ids_u = ids[last]
    treedef, leaves = self._bufs[key]
    rows = treedef.flatten_up_to(state)
    for i, (a, r) in enumerate(zip(leaves, rows)):
      if r.shape[0] != len(ids):
        raise HetjaxError(f'state for {key_name(key)} has {r.shape[0]} rows for {len(ids)} ids')
      if self.placement == 'device':
        leaves[i] = _set_rows(a, jnp.asarray(ids_u), jnp.asarray(r)[jnp.asarray(last)])
      else:
        a[ids_u] = np.asarray(r)[last].astype(a.dtype)
    self._filled[key][ids_u] = True

  def reset(self, key) -> None:
    """Forget a key's buffers (its stage boundary moved): its samples warm up again."""
    self._drop_pending(key)
    if key in self._filled:
      self._filled[key][:] = False

  def keys(self):
    return list(self._bufs)

  # ---- checkpoints --------------------------------------------------------------------------

  def state_dict(self) -> dict:
    """{key name: {'filled': bool array, 'leaves': [arrays]}}, numpy, for a checkpoint."""
    for key in list(self._pending):
      self._drop_pending(key)
    out = {}
    for key, (_, leaves) in self._bufs.items():
      if isinstance(leaves[0], np.memmap):
        for a in leaves:
          a.flush()
      out[key_name(key)] = {'filled': self._filled[key].copy(),
                            'leaves': [np.asarray(a) for a in leaves]}
    return out

  def load_state_dict(self, saved: dict, specs: dict) -> list:
    """Restore the keys in `specs` ({key: one sample's spec}, this run's boundaries) from `saved`.
    Keys missing from the checkpoint or saved with other shapes start empty; returns their names
    so the caller can say that those boundaries warm up again."""
    fresh = []
    for key, spec in specs.items():
      self.reserve(key, spec)
      self.reset(key)
      entry = saved.get(key_name(key))
      treedef, leaves = self._bufs[key]
      if entry is None or len(entry['leaves']) != len(leaves) or any(
          tuple(np.shape(s)) != tuple(a.shape) for s, a in zip(entry['leaves'], leaves)):
        fresh.append(key_name(key))
        continue
      for i, s in enumerate(entry['leaves']):
        if self.placement == 'device':
          leaves[i] = jnp.asarray(np.asarray(s).astype(leaves[i].dtype))
        else:
          leaves[i][...] = np.asarray(s).astype(leaves[i].dtype)
      self._filled[key][:] = np.asarray(entry['filled'], bool)
    return fresh

  def close(self) -> None:
    self._pool.shutdown(wait=True)


class StoreRows:
  """One key of a BufferStore behind the exchange's per-(key, replica, side) state interface
  (gather/scatter by sample id), so AQ-SGD's buffers live where cfg.aqsgd places them."""

  def __init__(self, store: BufferStore, key):
    self.store, self.key = store, key

  def gather(self, ids):
    return self.store.gather(self.key, ids)

  def scatter(self, ids, state) -> None:
    self.store.scatter(self.key, ids, state)

  def prefetch(self, ids) -> None:
    self.store.prefetch(self.key, ids)

  def reset(self) -> None:
    self.store.reset(self.key)


def from_config(acfg, num_samples: int, workdir: str, say=print) -> BufferStore:
  """The store that --config.aqsgd describes (buffers, buffer_dtype, buffer_budget_gb); disk
  buffers go to <workdir>/aqsgd_buffers."""
  if acfg.warmup_epochs < 0:
    raise HetjaxError(f'aqsgd.warmup_epochs must be >= 0, got {acfg.warmup_epochs}')
  budget = int(acfg.buffer_budget_gb * 2**30) if acfg.buffer_budget_gb > 0 else None
  return BufferStore(num_samples, acfg.buffers, acfg.buffer_dtype,
                     folder=os.path.join(workdir, 'aqsgd_buffers'), budget_bytes=budget, say=say)


def warming_up(epochs_done: float, warmup_epochs: int) -> bool:
  """True while the run is in its first `warmup_epochs` epochs (full precision, buffers fill)."""
  return epochs_done < warmup_epochs
