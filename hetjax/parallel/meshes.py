"""Stage groups: one (dp, tp) mesh per pipeline stage, and parameters placed on it.

Plan device ids are indices into `jax.devices()` (all processes' devices, process-major). Row r of a
stage mesh is replica r's TP group for that stage, so gradients are averaged over 'dp' by XLA inside
the stage's backward program, across processes when replicas live on different hosts.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from hetjax.errors import HetjaxError
from hetjax.models.config import ModelConfig
from hetjax.models.model import Stage
from hetjax.plan import Plan


@dataclasses.dataclass
class StageGroup:
  index: int
  start: int
  end: int
  has_embed: bool
  has_head: bool
  mesh: Mesh                    # axes ('dp', 'tp'); row r = replica r's devices
  abstract: Stage = None         # the stage module with shapes only (nnx.eval_shape)
  graphdef: nnx.GraphDef = None
  param_sharding: object = None  # pytree of NamedSharding, like the stage's nnx.State

  @property
  def dp(self) -> int:
    return self.mesh.shape['dp']

  @property
  def tp(self) -> int:
    return self.mesh.shape['tp']

  def leader(self, replica: int) -> jax.Device:
    """The device that sends and receives replica `replica`'s activations."""
    return self.mesh.devices[replica, 0]

  def replica_devices(self, replica: int) -> list:
    return list(self.mesh.devices[replica])

  @property
  def is_local(self) -> bool:
    """Whether this process owns any device of the stage (and so runs its programs)."""
    return any(d.process_index == jax.process_index() for d in self.mesh.devices.flat)

  def batch_sharding(self, ndim: int) -> NamedSharding:
    """Micro-batches are split over replicas on their leading axis, replicated over tp."""
    return NamedSharding(self.mesh, P('dp', *([None] * (ndim - 1))))

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())


def plan_devices(plan: Plan, colocate: bool = False) -> list:
  """Plan device id -> jax device. `colocate` wraps ids onto the devices that exist (several stages
  on one GPU, for checks on a single accelerator)."""
  devices = jax.devices()
  if colocate:
    return [devices[i % len(devices)] for i in range(max(plan.devices) + 1)]
  top = max(plan.devices)
  if top >= len(devices):
    head = f'the plan uses device {top} but '
    if jax.process_count() > 1:
      raise HetjaxError(head + f'the {jax.process_count()} processes have {len(devices)} devices in '
                        f'all; give hetjax.launch --devices counts that add up to {top + 1} (one per '
                        f'host of the plan\'s cluster, e.g. --devices=2,2,4 for local_hetero)')
    if devices[0].platform == 'cpu':
      raise HetjaxError(head + f'only {len(devices)} devices exist; run with '
                        f'XLA_FLAGS=--xla_force_host_platform_device_count={top + 1}')
    raise HetjaxError(head + f'only {len(devices)} devices exist; plan over this machine\'s devices, '
                      f'start one process per host, or set colocate')
  return devices


def build_stage_groups(plan: Plan, cfg: ModelConfig, colocate: bool = False) -> list[StageGroup]:
  """Training: one StageGroup per stage, its rows the data-parallel replicas, which must split
  layers and TP degrees identically."""
  plan.validate(model=cfg)
  if not plan.symmetric:  # hetjax.parallel.replicas runs those
    raise HetjaxError('a (dp, tp) mesh per stage needs replicas with the same layer split, TP '
                      'degrees and weights; heterogeneous replicas run through HeteroReplicas')
  devices = plan_devices(plan, colocate)
  groups = []
  for k in range(plan.num_stages):
    groups.append(_stage_group(k, [r.stages[k] for r in plan.replicas], devices, cfg))
  return groups


def build_replica_groups(plan: Plan, cfg: ModelConfig, replica: int,
                         colocate: bool = False) -> list[StageGroup]:
  """Serving: replica `replica`'s own chain of stages, each with its own layers and TP degree."""
  devices = plan_devices(plan, colocate)
  return [_stage_group(k, [s], devices, cfg) for k, s in enumerate(plan.replicas[replica].stages)]


def _stage_group(k: int, stages, devices, cfg: ModelConfig) -> StageGroup:
  """A (dp = len(stages), tp) mesh over the stages' devices, and the stage module's shapes on it."""
  first = stages[0]
  grid = np.array([[devices[d] for d in s.devices] for s in stages], dtype=object)
  if len(set(grid.flat)) != grid.size:
    raise HetjaxError(f'stage {k}: its devices map onto fewer physical devices than it needs')
  for row in grid:
    if len({d.process_index for d in row}) > 1:
      raise HetjaxError(f'stage {k}: a TP group must live in one process (host)')
  mesh = Mesh(grid, ('dp', 'tp'), axis_types=(AxisType.Auto, AxisType.Auto))
  group = StageGroup(k, first.start, first.end, bool(first.embed), bool(first.head), mesh)
  abstract = nnx.eval_shape(lambda: Stage(cfg, group.start, group.end, has_embed=group.has_embed,
                                          has_head=group.has_head, rngs=nnx.Rngs(0)))
  group.abstract = abstract
  group.graphdef, state = nnx.split(abstract)
  group.param_sharding = jax.tree.map(lambda spec: NamedSharding(mesh, spec),
                                      nnx.get_partition_spec(state))
  return group


def place(host_tree, shardings):
  """Host (numpy) arrays -> global arrays with the given shardings; each process supplies only its
  own devices' pieces, so this works unchanged in multi-controller runs."""
  def one(x, sharding):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
  return jax.tree.map(one, host_tree, shardings)
