"""Checkpoints with orbax's CheckpointManager: one item per pipeline stage, tensors under global names.

On disk (<dir> is <workdir>/checkpoints for a training run, or a converted checkpoint's folder):

  <dir>/<step>/meta/                 JSON: format, step, model config, data position, RNG, and the
                                     stage index [{item, start, end, has_embed, has_head,
                                                   tensors: {name: [shape, dtype]}}]
  <dir>/<step>/stage<i>_<a>_<b>/     orbax PyTree of stage i (layers a..b): {'params', 'opt_state',
                                     'extra'} nested by global name (see repartition.py)

Each stage is its own item, so a stage's tensors are written as one unit. Names are global, so a
reader with any stage plan takes the tensors it needs from whichever items hold them and reads only
those (orbax partial restore). Orbax writes a step into a
temporary folder and renames it once every item is complete: a crash mid-save leaves the previous
step intact, and the next open deletes the half-written folder.

Multi-controller runs (jax.process_count() > 1) write a step without orbax (whose collective save
refuses arrays that live on one process's devices): each process writes its own stages to
<dir>/.tmp-<step>/<item>.npz (raw bytes per tensor) and its part of the stage index, all wait at a
barrier, then process 0 writes <dir>/.tmp-<step>/meta.json (the same meta, each stage with its
'file') and renames the folder to <dir>/<step>: the step exists complete or not at all. With
async_save the tensors are copied to the host at once and a background thread writes and commits
them (the next save, check(), wait() and close() report its error). Readers
take either kind of step, so any plan (or process count) reads any plan's checkpoint.

Integrity: the stage index also records, per tensor, a fingerprint [sum, sum of |x|] (float32,
computed on device). Saving refuses a non-finite tensor; restoring re-computes the fingerprints of
what it read and compares. Restoring "the latest" step walks back from the newest step: a step that
cannot be read, or reads back different (truncated or overwritten files, missing or garbage
metadata, non-finite values), is reported in one line, moved aside to <dir>.corrupt/<step>, and the
next older step is tried. If none is intact, one error says so. In a multi-controller run each
process reads its own stages, the processes agree on each step (one that any process cannot read is
skipped by all) and process 0 moves it aside.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import io
import json
import os
import shutil
import sys
import threading
import time
from collections import defaultdict
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from hetjax.checkpoint.repartition import check, fill, flatten, nest
from hetjax.errors import HetjaxError
from hetjax.models.config import ModelConfig

FORMAT = 'hetjax-checkpoint/1'
FINGERPRINT_RTOL = 1e-4  # float32 sums of the same values in another order or sharding agree to this


class CorruptCheckpoint(HetjaxError):
  """A checkpoint step that cannot be read back intact (as opposed to one for another model)."""


def _stderr(msg: str) -> None:
  print(msg, file=sys.stderr)


@dataclasses.dataclass(frozen=True)
class StageSpec:
  """Which part of the model a stage holds."""
  start: int
  end: int
  has_embed: bool
  has_head: bool

  @classmethod
  def of(cls, stage) -> 'StageSpec':
    return cls(stage.start, stage.end, stage.has_embed, stage.has_head)


class Checkpointer:
  """Save and restore stage states. `every`: save every N steps (0: only when forced);
  `keep`: keep the last K steps (0: all); `async_save`: write in a background thread."""

  def __init__(self, directory: str, *, every: int = 0, keep: int = 0, async_save: bool = False,
               read_only: bool = False, warn=_stderr):
    """`warn(line)` reports a corrupt step that restore skips."""
    self.directory = os.path.abspath(directory)
    self.every = every
    if read_only and not is_checkpoint(self.directory):
      raise HetjaxError(f'no hetjax checkpoint in {directory}')
    self.async_save = async_save
    self.read_only = read_only
    self.warn = warn
    # read_only only stops this object from creating or cleaning up; it never saves anyway.
    self.keep = keep
    self.by_process = jax.process_count() > 1  # see the module doc
    self._manager = None
    self._writer_thread, self._writer_error = None, None  # a per-process save in the background
    self._reads = 0  # steps tried by restores (names the processes' agreement on each)
    if self.by_process:
      if not read_only:
        os.makedirs(self.directory, exist_ok=True)
    else:
      self._manager = self._open_manager()

  @property
  def manager(self) -> ocp.CheckpointManager:
    """Orbax's manager (in a multi-controller run opened only to read a step orbax wrote)."""
    if self._manager is None:
      self._manager = self._open_manager()
    return self._manager

  def _open_manager(self) -> ocp.CheckpointManager:
    read_only, keep, async_save = self.read_only or self.by_process, self.keep, self.async_save
    # A multi-controller run only reads orbax steps, each process its own stages: it must not
    # wait for the others in orbax's device-collective barriers (they need as many devices per
    # process); newest_intact makes the processes agree instead.
    me = jax.process_index()
    alone = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me},
                                               barrier_sync_key_prefix=f'process{me}')
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep or None, enable_async_checkpointing=async_save, create=not read_only,
        cleanup_tmp_directories=not read_only,
        **({'multiprocessing_options': alone} if self.by_process else {}))
    # Any item name: stages are PyTrees, meta is JSON. zstd on float weights gains little and made
    # saves about 10x slower here, so it is off.
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    trees = ocp.PyTreeCheckpointHandler(use_compression=False)
    for args in (ocp.args.PyTreeSave, ocp.args.PyTreeRestore):
      registry.add(None, args, trees)
    for args in (ocp.args.JsonSave, ocp.args.JsonRestore):
      registry.add(None, args, ocp.JsonCheckpointHandler)
    try:
      return ocp.CheckpointManager(self.directory, options=options, handler_registry=registry)
    except (OSError, ValueError) as e:
      raise HetjaxError(f'cannot open checkpoints in {self.directory}: {_reason(e)}') from None

  def all_steps(self) -> list[int]:
    """Committed steps, either kind (orbax's, or written by processes)."""
    steps = set(self._manager.all_steps()) if self._manager is not None else set()
    if os.path.isdir(self.directory):
      steps |= {int(n) for n in os.listdir(self.directory) if n.isdigit() and (
          self._by_processes(int(n)) or os.path.isdir(os.path.join(self.directory, n, 'meta')))}
    return sorted(steps)

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def _by_processes(self, step: int) -> bool:
    return os.path.exists(os.path.join(self.directory, str(step), 'meta.json'))

  def check(self) -> None:
    """Raise now if a background save has failed (instead of at the next save)."""
    self._raise_writer_error()
    if self._manager is None:
      return
    try:
      self.manager.check_for_errors()
    except Exception as e:  # whatever the writer thread hit: disk full, permissions, ...
      raise HetjaxError(f'saving a checkpoint in {self.directory} failed: {_reason(e)}') from None

  def should_save(self, step: int) -> bool:
    return self.every > 0 and step % self.every == 0

  def save(self, step: int, stages: Sequence[tuple[StageSpec, Any]], meta: Mapping) -> None:
    """Save each (spec, state tree) as one item, plus `meta` (JSON) and the stage index.

    Leaves should be jax arrays: orbax writes those without a host copy (numpy leaves cost one).
    An asynchronous save first copies them on their device, so training may donate its buffers
    at once."""
    if self.by_process:
      return self._save_by_process(step, stages, meta)
    items, index = {}, []
    for i, (spec, tree) in enumerate(stages):
      flat = flatten(tree)
      if self.async_save:
        flat = {name: jnp.array(x, copy=True) for name, x in flat.items()}
      item = f'stage{i}_{spec.start}_{spec.end}'
      tensors = {name: [list(x.shape), str(x.dtype)] for name, x in flat.items()}
      sums = fingerprints(flat)
      for name, (total, _) in sums.items():
        if not np.isfinite(total):
          raise HetjaxError(f'refusing to save step {step}: tensor {name} is not finite')
      index.append({'item': item, **dataclasses.asdict(spec), 'tensors': tensors, 'sums': sums})
      items[item] = ocp.args.PyTreeSave(nest(flat))
    items['meta'] = ocp.args.JsonSave({**meta, 'format': FORMAT, 'step': step, 'stages': index})
    self.check()
    try:
      self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    except Exception as e:  # a synchronous write error (disk full, permissions)
      raise HetjaxError(f'saving checkpoint step {step} in {self.directory} failed: '
                        f'{_reason(e)}') from None

  def _save_by_process(self, step: int, stages, meta: Mapping) -> None:
    """A multi-controller save (see the module doc); every process calls it. This process's
    tensors are copied to the host now; with async_save the files are written, and the step
    committed, by a background thread (one save at a time: a new save first waits for the last)."""
    self._wait_for_writer()
    me, parts = jax.process_index(), []
    for i, (spec, tree) in enumerate(stages):
      flat = flatten(tree)
      if any(_writer(x) != me for x in flat.values()):
        continue  # a data-parallel copy: the replica on the lowest process writes it
      flat = {name: host_copy(x) for name, x in flat.items()}
      sums = fingerprints(flat)
      for name, (total, _) in sums.items():
        if not np.isfinite(total):
          raise HetjaxError(f'refusing to save step {step}: tensor {name} is not finite')
      parts.append((f'p{me}_stage{i}_{spec.start}_{spec.end}', spec, flat, sums))
    if not self.async_save:
      return self._write_by_process(step, parts, meta)

    def write():
      try:
        self._write_by_process(step, parts, meta)
      except Exception as e:  # reported by check() / wait(), i.e. at the next training step
        self._writer_error = e
    self._writer_thread = threading.Thread(target=write, name=f'checkpoint-{step}', daemon=True)
    self._writer_thread.start()

  def _wait_for_writer(self) -> None:
    """Wait for a background per-process save; raise its error, if any."""
    if self._writer_thread is not None:
      self._writer_thread.join()
      self._writer_thread = None
    self._raise_writer_error()

  def _raise_writer_error(self) -> None:
    e, self._writer_error = self._writer_error, None
    if isinstance(e, HetjaxError):
      raise e
    if e is not None:
      raise HetjaxError(f'saving a checkpoint in {self.directory} failed: {_reason(e)}') from None

  def _write_by_process(self, step: int, parts, meta: Mapping) -> None:
    """Write this process's stage files and index part into <dir>/.tmp-<step>, then (process 0,
    once every process has written) meta.json, and commit the step by renaming the folder."""
    from hetjax.distributed import barrier
    me, tmp = jax.process_index(), os.path.join(self.directory, f'.tmp-{step}')
    failed = lambda e: HetjaxError(f'saving checkpoint step {step} in {self.directory} failed: '
                                   f'{_reason(e)}')
    if me == 0:
      shutil.rmtree(tmp, ignore_errors=True)  # a save a killed run left half-done
      try:
        os.makedirs(tmp)
      except OSError as e:
        raise failed(e) from None
    barrier(f'hetjax-ckpt-{step}-open')
    index = []
    try:
      for item, spec, flat, sums in parts:
        keys = {name: f't{k}' for k, name in enumerate(flat)}
        _write_atomic(os.path.join(tmp, f'{item}.npz'), lambda f: np.savez(
            f, **{keys[n]: np.ascontiguousarray(x).reshape(-1).view(np.uint8) for n, x in flat.items()}))
        index.append({'item': item, 'file': f'{item}.npz', **dataclasses.asdict(spec), 'keys': keys,
                      'tensors': {n: [list(x.shape), str(x.dtype)] for n, x in flat.items()},
                      'sums': sums})
      _write_atomic(os.path.join(tmp, f'index-p{me}.json'), lambda f: f.write(json.dumps(index).encode()))
    except OSError as e:
      raise failed(e) from None
    barrier(f'hetjax-ckpt-{step}-written')
    if me == 0:
      parts = []
      for path in sorted(glob.glob(os.path.join(tmp, 'index-p*.json'))):
        with open(path) as f:
          parts += json.load(f)
      parts.sort(key=lambda p: (p['start'], p['end']))
      full = {**meta, 'format': FORMAT, 'step': step, 'stages': parts}
      _write_atomic(os.path.join(tmp, 'meta.json'), lambda f: f.write(json.dumps(full).encode()))
      # An empty step record: orbax (in a one-process reader listing steps) warns without one.
      _write_atomic(os.path.join(tmp, '_CHECKPOINT_METADATA'), lambda f: f.write(b'{}'))
      final = os.path.join(self.directory, str(step))
      shutil.rmtree(final, ignore_errors=True)  # the same step from a run that was rolled back
      os.rename(tmp, final)  # the commit
      _fsync_dir(self.directory)
      if self.keep:
        for old in self.all_steps()[:-self.keep]:
          shutil.rmtree(os.path.join(self.directory, str(old)), ignore_errors=True)
    barrier(f'hetjax-ckpt-{step}-committed')

  def meta(self, step: int | None = None) -> dict:
    step = self._step(step)
    try:
      if self._by_processes(step):
        meta = self._read_meta_file(step)
      else:
        meta = self.manager.restore(
            step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
    except Exception as e:  # missing or unparsable files
      raise CorruptCheckpoint(f'step {step}: cannot read its metadata ({_reason(e)})') from None
    if not isinstance(meta, dict) or meta.get('format') != FORMAT:
      raise CorruptCheckpoint(f'step {step}: not a {FORMAT} checkpoint')
    try:
      tensor_index(meta)
      if int(meta['step']) != step:
        raise ValueError(f'it says step {meta["step"]}')
    except (KeyError, TypeError, ValueError) as e:
      raise CorruptCheckpoint(f'step {step}: malformed metadata ({_reason(e)})') from None
    return meta

  def read(self, names: Iterable[str], step: int | None = None, meta: dict | None = None,
           shardings: Mapping[str, jax.sharding.Sharding] | None = None) -> dict:
    """{name: array} for the named tensors, reading only those: jax arrays placed on
    `shardings[name]` (orbax reads just the shards each device needs), else numpy arrays."""
    meta = meta or self.meta(step)
    where = tensor_index(meta)
    shardings = shardings or {}
    wanted: dict[str, dict] = defaultdict(dict)
    for name in names:
      if name not in where:
        raise HetjaxError(f'checkpoint has no tensor {name}')
      item, shape, dtype = where[name]
      wanted[item][name] = jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype),
                                                sharding=shardings.get(name))
    files = {s['item']: s for s in meta['stages'] if 'file' in s}
    out = {}
    for item in [i for i in wanted if i in files]:
      out.update(self._read_file(meta['step'], files[item], wanted.pop(item)))
    args = {item: ocp.args.PyTreeRestore(
        item=nest(structs), partial_restore=True,
        restore_args=nest({n: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape)
                           if x.sharding is not None else ocp.RestoreArgs(restore_type=np.ndarray)
                           for n, x in structs.items()}))
        for item, structs in wanted.items()}
    if not args:
      return out
    step = meta['step']
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**args))
      from_orbax = {name: x for item in args for name, x in flatten(restored[item]).items()}
    except Exception as e:  # truncated or missing data files, bad manifests
      raise CorruptCheckpoint(f'step {step}: cannot read its tensors ({_reason(e)})') from None
    verify(from_orbax, meta)
    return {**out, **from_orbax}

  def _read_meta_file(self, step: int) -> dict:
    with open(os.path.join(self.directory, str(step), 'meta.json')) as f:
      return json.load(f)

  def _read_file(self, step: int, stage: Mapping, structs: Mapping[str, Any]) -> dict:
    """The named tensors of one stage file written by a process (see _save_by_process), verified,
    then placed on their shardings (if any)."""
    try:
      with np.load(os.path.join(self.directory, str(step), stage['file'])) as z:
        host = {}
        for name, x in structs.items():
          host[name] = z[stage['keys'][name]].view(np.dtype(x.dtype)).reshape(x.shape)
    except Exception as e:  # a missing, truncated or garbled file
      raise CorruptCheckpoint(f'step {step}: cannot read {stage["file"]} ({_reason(e)})') from None
    verify(host, {'step': step, 'stages': [stage]})
    return {name: host[name] if x.sharding is None else
            jax.make_array_from_callback(x.shape, x.sharding, lambda idx, a=host[name]: a[idx])
            for name, x in structs.items()}

  def restore(self, templates: Sequence[Any], step: int | None = None,
              whole_model: bool = True) -> tuple[list, dict]:
    """Fill each template (a stage's state tree; arrays or shape structs) from the checkpoint.
    Returns (filled trees, meta): a leaf with a sharding comes back as a jax array on it, others
    as numpy arrays. step=None: the newest step that reads back intact (see the module doc).

    With `whole_model` the templates together must use every saved tensor of the kinds they ask
    for (params, opt_state, ...), so restoring a 6-layer checkpoint into a 4-layer model fails
    instead of silently dropping layers. A process restoring only its own stage passes False."""
    return self.newest_intact(lambda s: self._restore_step(templates, s, whole_model), step)

  def newest_intact(self, read, step: int | None = None):
    """read(step) for `step`, or (None) for the newest step where it succeeds: corrupt steps are
    reported with `warn`, moved aside (unless read-only) and skipped."""
    if step is not None:
      return read(step)
    steps = sorted(self.all_steps(), reverse=True)
    if not steps:
      raise HetjaxError(f'no checkpoint in {self.directory}')
    for k, step in enumerate(steps):
      try:
        result, error = _quietly(read, step), ''
      except CorruptCheckpoint as e:
        result, error = None, str(e)
      errors = self._errors_of_all_processes(error)
      if not any(errors):
        return result
      failed = next(p for p, e in enumerate(errors) if e)
      who = f' (read by process {failed})' if len(errors) > 1 else ''
      older = f'falling back to step {steps[k + 1]}' if k + 1 < len(steps) else 'none older'
      moved = '' if self.read_only else f'; moved to {self._quarantine(step)}'
      self.warn(f'warning: checkpoint {errors[failed]}{who}; {older}{moved}')
    raise HetjaxError(f'no intact checkpoint in {self.directory} (tried steps '
                      f'{", ".join(map(str, steps))})')

  def _errors_of_all_processes(self, error: str) -> list[str]:
    """Every process's error reading the step it tries ('' if none). In a multi-controller run
    each process reads only its own stages, so all must read theirs before any resumes a step,
    and all must skip the same steps."""
    if not self.by_process:
      return [error]
    from hetjax.distributed import gather_text
    self._reads += 1  # every process tries the same steps in the same order
    return gather_text(f'checkpoint-read-{self._reads}', error)

  def _quarantine(self, step: int) -> str:
    """Move a corrupt step out of the way (keeping it for inspection) so it is saved afresh; in a
    multi-controller run process 0 moves it."""
    dest = os.path.join(f'{self.directory}.corrupt', str(step))
    if self.by_process and jax.process_index() != 0:
      return dest
    if os.path.exists(dest):
      shutil.rmtree(dest)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    shutil.move(os.path.join(self.directory, str(step)), dest)
    if self._manager is not None:
      self.manager.reload()
    return dest

  def _restore_step(self, templates, step: int, whole_model: bool) -> tuple[list, dict]:
    meta = self.meta(step)
    where = tensor_index(meta)
    shapes = {name: shape for name, (_, shape, _) in where.items()}
    wanted = {}
    for template in templates:
      check(template, shapes)  # fails on the first mismatch, before reading any data
      wanted.update(flatten(template))
    kinds = {name.split('/')[0] for name in wanted}
    unused = [n for n in where if n.split('/')[0] in kinds and n not in wanted]
    if whole_model and unused:
      raise HetjaxError(f'checkpoint tensor {unused[0]} (shape {tuple(shapes[unused[0]])}) has no '
                        f'place in the model; was it written for a different model config?')
    # One read per template: a tensor several stages hold (a tied table) lands on each stage's
    # own devices.
    filled = []
    for template in templates:
      names = flatten(template)
      shardings = {n: x.sharding for n, x in names.items()
                   if isinstance(getattr(x, 'sharding', None), jax.sharding.Sharding)}
      filled.append(fill(template, self.read(names, meta=meta, shardings=shardings)))
    return filled, meta

  def wait(self) -> None:
    self._wait_for_writer()
    if self._manager is not None:
      self.manager.wait_until_finished()

  def close(self) -> None:
    self._wait_for_writer()
    if self._manager is not None:
      self.manager.wait_until_finished()
      self.manager.close()

  def _step(self, step: int | None) -> int:
    if step is None:
      step = self.latest_step()
      if step is None:
        raise HetjaxError(f'no checkpoint in {self.directory}')
    return step


def _quietly(read, step):
  """read(step), dropping what orbax/tensorstore threads print to stderr after a failed read
  (tracebacks of callbacks into an event loop that the failure already closed)."""
  buffer = io.StringIO()
  with contextlib.redirect_stderr(buffer):
    try:
      return read(step)
    except CorruptCheckpoint:
      time.sleep(0.5)  # let those callbacks finish while stderr is still redirected
      raise


def _writer(x) -> int:
  """The process that writes a tensor: the lowest one holding a copy."""
  devices = getattr(getattr(x, 'sharding', None), 'device_set', None)
  return min(d.process_index for d in devices) if devices else jax.process_index()


def host_copy(x) -> np.ndarray:
  """This process's copy of a tensor: all of it, or (replicated across processes, e.g. over data-
  parallel replicas) what its own shards cover, when they cover all of it (a whole TP row)."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return np.asarray(x)
  out = np.empty(x.shape, x.dtype)
  covered = np.zeros(x.shape, bool)
  for shard in x.addressable_shards:
    out[shard.index] = np.asarray(shard.data)
    covered[shard.index] = True
  if not covered.all():
    raise HetjaxError(f'cannot checkpoint a tensor of shape {x.shape} split across processes')
  return out


def _write_atomic(path: str, write) -> None:
  """write(binary file) into path.tmp, fsync, rename to path."""
  with open(path + '.tmp', 'wb') as f:
    write(f)
    f.flush()
    os.fsync(f.fileno())
  os.replace(path + '.tmp', path)


def _fsync_dir(path: str) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _reason(e: BaseException) -> str:
  """An exception as one short line."""
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  text = lines[0] if lines else ''
  return f'{type(e).__name__}: {text[:120]}' if text else type(e).__name__


def fingerprints(flat: Mapping[str, Any]) -> dict[str, list[float]]:
  """{name: [sum, sum of |x|]} in float32 for the numeric tensors (one device round trip)."""
  sums = {name: (jnp.sum(jnp.asarray(x, jnp.float32)), jnp.sum(jnp.abs(jnp.asarray(x, jnp.float32))))
          for name, x in flat.items() if jnp.issubdtype(x.dtype, jnp.number)}
  return {name: [float(a), float(b)] for name, (a, b) in jax.device_get(sums).items()}


def verify(flat: Mapping[str, Any], meta: Mapping) -> None:
  """Raise CorruptCheckpoint if a tensor read back is non-finite or its fingerprint differs from
  the one saved (checkpoints without fingerprints are only checked for finiteness)."""
  saved = {}
  for stage in meta['stages']:
    saved.update(stage.get('sums', {}))
  for name, (total, size) in fingerprints(flat).items():
    if not (np.isfinite(total) and np.isfinite(size)):
      raise CorruptCheckpoint(f'step {meta["step"]}: tensor {name} holds non-finite values')
    if name in saved:
      want_total, want_size = saved[name]
      tol = FINGERPRINT_RTOL * want_size + 1e-6
      if abs(total - want_total) > tol or abs(size - want_size) > tol:
        raise CorruptCheckpoint(f'step {meta["step"]}: tensor {name} reads back different from '
                                f'what was saved (sum {total:.6g}, saved {want_total:.6g})')


def tensor_index(meta: Mapping) -> dict[str, tuple[str, list, str]]:
  """{name: (item, shape, dtype)}; a tensor held by several stages is read from the first."""
  where = {}
  for stage in meta['stages']:
    for name, (shape, dtype) in stage['tensors'].items():
      where.setdefault(name, (stage['item'], shape, dtype))
  return where


def is_checkpoint(directory: str) -> bool:
  """True if `directory` holds at least one committed step with a meta item."""
  if not os.path.isdir(directory):
    return False
  return any(name.isdigit() and (os.path.isdir(os.path.join(directory, name, 'meta')) or
                                 os.path.exists(os.path.join(directory, name, 'meta.json')))
             for name in os.listdir(directory))


def resolve(path: str) -> str:
  """A run's workdir (holding checkpoints/) or a checkpoint folder itself -> the checkpoint folder."""
  inner = os.path.join(path, 'checkpoints')
  return inner if os.path.isdir(inner) else path


def model_config_of(meta: Mapping) -> ModelConfig:
  try:
    return ModelConfig(**meta['model']).validate()
  except (KeyError, TypeError) as e:
    raise CorruptCheckpoint(f'step {meta.get("step")}: bad model config ({_reason(e)})') from None


def load_model(path: str, step: int | None = None):
  """(full model, meta) from a checkpoint written by training or by conversion."""
  from flax import nnx
  from hetjax.models.model import build_model
  ckpt = Checkpointer(resolve(path), read_only=True)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

  def read(step):
    mcfg = model_config_of(ckpt.meta(step))
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build_model(mcfg)))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                            abstract)
    (params,), meta = ckpt._restore_step([{'params': abstract}], step, whole_model=True)
    return nnx.merge(graphdef, params['params']), meta

  model, meta = ckpt.newest_intact(read, step)
  ckpt.close()
  return model, meta
