"""Checkpoints with orbax's CheckpointManager: one item per pipeline stage, tensors under global names.

On disk (<dir> is <workdir>/checkpoints for a training run, or a converted checkpoint's folder):

  <dir>/<step>/meta/                 JSON: format, step, model config, data position, RNG, and the
                                     stage index [{item, start, end, has_embed, has_head,
                                                   tensors: {name: [shape, dtype]}}]
  <dir>/<step>/stage<i>_<a>_<b>/     orbax PyTree of stage i (layers a..b): {'params', 'opt_state',
                                     'extra'} nested by global name (see repartition.py)

Each stage is its own item, so a stage's tensors are written as one unit and, later, by the process
that owns them. Names are global, so a reader with any stage plan takes the tensors it needs from
whichever items hold them and reads only those (orbax partial restore). Orbax writes a step into a
temporary folder and renames it once every item is complete: a crash mid-save leaves the previous
step intact, and the next open deletes the half-written folder.
"""

from __future__ import annotations

import dataclasses
import os
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
               read_only: bool = False):
    self.directory = os.path.abspath(directory)
    self.every = every
    if read_only and not is_checkpoint(self.directory):
      raise HetjaxError(f'no hetjax checkpoint in {directory}')
    self.async_save = async_save
    # read_only only stops this object from creating or cleaning up; it never saves anyway.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep or None, enable_async_checkpointing=async_save, create=not read_only,
        cleanup_tmp_directories=not read_only)
    # Any item name: stages are PyTrees, meta is JSON. zstd on float weights gains little and made
    # saves about 10x slower here, so it is off.
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    trees = ocp.PyTreeCheckpointHandler(use_compression=False)
    for args in (ocp.args.PyTreeSave, ocp.args.PyTreeRestore):
      registry.add(None, args, trees)
    for args in (ocp.args.JsonSave, ocp.args.JsonRestore):
      registry.add(None, args, ocp.JsonCheckpointHandler)
    self.manager = ocp.CheckpointManager(self.directory, options=options, handler_registry=registry)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def should_save(self, step: int) -> bool:
    return self.every > 0 and step % self.every == 0

  def save(self, step: int, stages: Sequence[tuple[StageSpec, Any]], meta: Mapping) -> None:
    """Save each (spec, state tree) as one item, plus `meta` (JSON) and the stage index.

    Leaves should be jax arrays: orbax writes those without a host copy (numpy leaves cost one).
    An asynchronous save first copies them on their device, so training may donate its buffers
    at once."""
    items, index = {}, []
    for i, (spec, tree) in enumerate(stages):
      flat = flatten(tree)
      if self.async_save:
        flat = {name: jnp.array(x, copy=True) for name, x in flat.items()}
      item = f'stage{i}_{spec.start}_{spec.end}'
      tensors = {name: [list(x.shape), str(x.dtype)] for name, x in flat.items()}
      index.append({'item': item, **dataclasses.asdict(spec), 'tensors': tensors})
      items[item] = ocp.args.PyTreeSave(nest(flat))
    items['meta'] = ocp.args.JsonSave({**meta, 'format': FORMAT, 'step': step, 'stages': index})
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def meta(self, step: int | None = None) -> dict:
    step = self._step(step)
    meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
    if meta.get('format') != FORMAT:
      raise HetjaxError(f'{self.directory}/{step} is not a {FORMAT} checkpoint')
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
    args = {item: ocp.args.PyTreeRestore(
        item=nest(structs), partial_restore=True,
        restore_args=nest({n: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape)
                           if x.sharding is not None else ocp.RestoreArgs(restore_type=np.ndarray)
                           for n, x in structs.items()}))
        for item, structs in wanted.items()}
    if not args:
      return {}
    restored = self.manager.restore(meta['step'], args=ocp.args.Composite(**args))
    return {name: x for item in args for name, x in flatten(restored[item]).items()}

  def restore(self, templates: Sequence[Any], step: int | None = None,
              whole_model: bool = True) -> tuple[list, dict]:
    """Fill each template (a stage's state tree; arrays or shape structs) from the checkpoint.
    Returns (filled trees, meta): a leaf with a sharding comes back as a jax array on it, others
    as numpy arrays.

    With `whole_model` the templates together must use every saved tensor of the kinds they ask
    for (params, opt_state, ...), so restoring a 6-layer checkpoint into a 4-layer model fails
    instead of silently dropping layers. A process restoring only its own stage passes False."""
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
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()

  def _step(self, step: int | None) -> int:
    if step is None:
      step = self.latest_step()
      if step is None:
        raise HetjaxError(f'no checkpoint in {self.directory}')
    return step


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
  return any(name.isdigit() and os.path.isdir(os.path.join(directory, name, 'meta'))
             for name in os.listdir(directory))


def resolve(path: str) -> str:
  """A run's workdir (holding checkpoints/) or a checkpoint folder itself -> the checkpoint folder."""
  inner = os.path.join(path, 'checkpoints')
  return inner if os.path.isdir(inner) else path


def model_config_of(meta: Mapping) -> ModelConfig:
  return ModelConfig(**meta['model']).validate()


def load_model(path: str, step: int | None = None):
  """(full model, meta) from a checkpoint written by training or by conversion."""
  from flax import nnx
  from hetjax.models.model import build_model
  ckpt = Checkpointer(resolve(path), read_only=True)
  mcfg = model_config_of(ckpt.meta(step))
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build_model(mcfg)))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
  (params,), meta = ckpt.restore([{'params': abstract}], step)
  ckpt.close()
  return nnx.merge(graphdef, params['params']), meta
