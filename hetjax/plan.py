"""Plan: the one hand-off from "decide" (cost model + search) to "execute" (pipeline runtime).

A Plan has replicas. For training they are data-parallel pipelines that average gradients per layer
and take shares of the batch by `Replica.weight`; they may split layers and TP degrees differently
(heterogeneous replicas, hetjax/parallel/replicas.py). For inference they are independent serving
pipelines (traffic split by `Replica.weight`). A replica is a
list of stages. A stage owns layers [start, end) of a model with L blocks, runs on `devices` as one
tensor-parallel group of degree `tp`, and may hold the embedding (first stage) and head (last stage).

Plans are JSON files with a version number; people may write them by hand: a stage may be given as
{"layers": [0, 12], "devices": [0, 1]} and tp / embed / head are then inferred.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

from hetjax import checks
from hetjax.errors import HetjaxError

PLAN_VERSION = 1
MAX_DEVICES = 1024       # devices a plan may name (ids 0..MAX_DEVICES-1), as cluster.MAX_DEVICES
MAX_LAYERS = 100_000
MAX_MICRO = 1_000_000    # micro-batches, micro-batch size, sequence and generation lengths
SCHEDULES = ('gpipe', '1f1b')
KINDS = ('train', 'serve')


@dataclasses.dataclass
class Stage:
  start: int                   # first layer (block index), inclusive
  end: int                     # last layer, exclusive
  devices: list[int]           # TP group; devices[0] is the leader that sends/receives activations
  tp: int = 0                  # 0 -> len(devices)
  embed: Optional[bool] = None  # None -> inferred: first stage of its replica
  head: Optional[bool] = None   # None -> inferred: last stage of its replica

  @property
  def num_layers(self) -> int:
    return self.end - self.start


@dataclasses.dataclass
class Replica:
  stages: list[Stage]
  weight: float = 1.0          # share of the batch (train) or of the requests (serve)
  max_batch: int = 0           # serve: most requests decoded together (0 = not set)

  @property
  def devices(self) -> list[int]:
    return [d for s in self.stages for d in s.devices]


@dataclasses.dataclass
class Plan:
  replicas: list[Replica]
  num_layers: int
  kind: str = 'train'
  model: str = ''
  cluster: str = ''
  schedule: str = '1f1b'
  micro_batches: int = 1          # M per replica per step
  micro_batch_size: int = 1       # sequences per micro-batch
  seq_len: int = 0
  activation_bits: int = 16       # bits per value sent between stages (16 = no compression)
  gen_len: int = 0                # serve: tokens generated per request (seq_len = prompt length)
  offload: dict[str, Any] = dataclasses.field(default_factory=dict)  # serve: FlexGen policy (see costmodel/offload.py)
  prediction: dict[str, float] = dataclasses.field(default_factory=dict)  # seconds: total, compute, ...
  search: dict[str, Any] = dataclasses.field(default_factory=dict)        # method, seed, time, history
  version: int = PLAN_VERSION

  def __post_init__(self):
    self._check_types()
    for r in self.replicas:
      for k, s in enumerate(r.stages):
        if not s.tp:
          s.tp = len(s.devices)
        if s.embed is None:
          s.embed = k == 0
        if s.head is None:
          s.head = k == len(r.stages) - 1

  # ---- shape
  @property
  def dp(self) -> int:
    return len(self.replicas)

  @property
  def num_stages(self) -> int:
    return max(len(r.stages) for r in self.replicas)

  @property
  def devices(self) -> list[int]:
    return [d for r in self.replicas for d in r.devices]

  def layer_counts(self, replica: int = 0) -> list[int]:
    return [s.num_layers for s in self.replicas[replica].stages]

  @property
  def symmetric(self) -> bool:
    """Replicas split layers and TP degrees identically and take equal shares of the batch (what
    one (dp, tp) mesh per stage runs); otherwise a training plan has heterogeneous replicas."""
    shape = lambda r: [(s.start, s.end, s.tp) for s in r.stages]
    first = self.replicas[0]
    return all(shape(r) == shape(first) and r.weight == first.weight for r in self.replicas)

  def replica_micro_batches(self) -> list[int]:
    """Training: micro-batches (of micro_batch_size sequences) each replica runs per step. The
    step's batch, micro_batches x dp x micro_batch_size sequences, is split by `Replica.weight`."""
    if len({r.weight for r in self.replicas}) == 1:
      return [self.micro_batches] * self.dp
    batch = self.micro_batches * self.dp * self.micro_batch_size
    total = sum(r.weight for r in self.replicas)
    shares = [batch * r.weight / total for r in self.replicas]
    counts = [round(x / self.micro_batch_size) for x in shares]
    if any(abs(x - c * self.micro_batch_size) > 1e-6 for x, c in zip(shares, counts)):
      split = ' + '.join(f'{x:g}' for x in shares)
      raise HetjaxError(f'invalid plan: replica weights {":".join(f"{r.weight:g}" for r in self.replicas)} '
                        f'split the batch of {batch} sequences into {split}, not into whole '
                        f'micro-batches of {self.micro_batch_size} sequences')
    return counts

  def stage_groups(self) -> list[list[list[int]]]:
    """[stage][replica] -> devices: the groups that sync gradients (training plans whose replicas
    split layers identically; heterogeneous replicas sync per layer instead)."""
    ranges = {tuple((s.start, s.end) for s in r.stages) for r in self.replicas}
    if len(ranges) > 1:
      raise HetjaxError('invalid plan: stage groups need replicas that split layers identically '
                        '(these replicas sync gradients per layer: hetjax.search.hetero_replicas)')
    return [[r.stages[k].devices for r in self.replicas] for k in range(self.num_stages)]

  def locate(self, device: int) -> tuple[int, int]:
    """(replica, stage) that runs `device`."""
    for i, r in enumerate(self.replicas):
      for k, s in enumerate(r.stages):
        if device in s.devices:
          return i, k
    raise HetjaxError(f'device {device} is not in the plan')

  # ---- checks
  def _check_types(self) -> None:
    """Every field has its JSON type and a sane range (so later code can trust them)."""
    bad = lambda msg: HetjaxError(f'invalid plan: {msg}')
    try:
      checks.integer(self.version, 'version')
      checks.integer(self.num_layers, 'num_layers', 1, MAX_LAYERS)
      for name in ('kind', 'model', 'cluster', 'schedule'):
        checks.text(getattr(self, name), name)
      checks.integer(self.micro_batches, 'micro_batches', 1, MAX_MICRO)
      checks.integer(self.micro_batch_size, 'micro_batch_size', 1, MAX_MICRO)
      checks.integer(self.seq_len, 'seq_len', 0, MAX_MICRO)
      checks.integer(self.gen_len, 'gen_len', 0, MAX_MICRO)
      checks.integer(self.activation_bits, 'activation_bits', 1, 32)
      for name in ('offload', 'prediction', 'search'):
        checks.mapping(getattr(self, name), name)
      for what in ('weights', 'kv', 'act'):
        if self.offload.get(what) is not None:
          for x in checks.sequence(self.offload[what], f'offload.{what}', 3, 3):
            checks.real(x, f'offload.{what} entries', 0, 1)
      checks.sequence(self.replicas, 'replicas', 1, MAX_DEVICES)
      for i, r in enumerate(self.replicas):
        if not isinstance(r, Replica):
          raise bad(f'replica {i} is not a replica')
        checks.real(r.weight, f'replica {i} weight', 0, lo_open=True)
        checks.integer(r.max_batch, f'replica {i} max_batch', 0, MAX_MICRO)
        checks.sequence(r.stages, f'replica {i} stages', 1, MAX_LAYERS)
        for k, s in enumerate(r.stages):
          where = f'replica {i} stage {k}'
          if not isinstance(s, Stage):
            raise bad(f'{where} is not a stage')
          checks.integer(s.start, f'{where} start', 0, MAX_LAYERS)
          checks.integer(s.end, f'{where} end', 0, MAX_LAYERS)
          checks.sequence(s.devices, f'{where} devices', 1, MAX_DEVICES)
          s.devices = [checks.integer(d, f'{where} device id', 0, MAX_DEVICES - 1) for d in s.devices]
          checks.integer(s.tp, f'{where} tp', 0, MAX_DEVICES)
          for name in ('embed', 'head'):
            if getattr(s, name) is not None:
              checks.flag(getattr(s, name), f'{where} {name}')
    except HetjaxError as e:
      if str(e).startswith('invalid plan'):
        raise
      raise bad(str(e)) from None

  def check_model(self, name: str) -> 'Plan':
    """A plan records the model it was made for; refuse it for another one."""
    if self.model and self.model != name:
      raise HetjaxError(f'invalid plan: it was made for model {self.model!r}, not {name!r} '
                        f'(plan again, or set "model" in the plan file)')
    return self

  def validate(self, cluster=None, model=None) -> 'Plan':
    """Structural checks; with a cluster: device ids exist; with a ModelConfig: layer count, TP divides heads."""
    def bad(msg):
      raise HetjaxError(f'invalid plan: {msg}')
    if self.version != PLAN_VERSION:
      bad(f'version {self.version} is not supported (expected {PLAN_VERSION})')
    if self.kind not in KINDS:
      bad(f'kind must be one of {KINDS}, got {self.kind!r}')
    if self.schedule not in SCHEDULES:
      bad(f'schedule must be one of {SCHEDULES}, got {self.schedule!r}')
    if not self.replicas or any(not r.stages for r in self.replicas):
      bad('needs at least one replica, each with at least one stage')
    if self.micro_batches < 1 or self.micro_batch_size < 1:
      bad(f'micro_batches and micro_batch_size must be >= 1, got {self.micro_batches}, {self.micro_batch_size}')
    if not 1 <= self.activation_bits <= 32:
      bad(f'activation_bits must be in 1..32, got {self.activation_bits}')
    if model is not None and model.num_layers != self.num_layers:
      bad(f'plan has {self.num_layers} layers but the model has {model.num_layers}')
    seen: dict[int, str] = {}
    for i, r in enumerate(self.replicas):
      if r.weight <= 0:
        bad(f'replica {i} has non-positive weight {r.weight}')
      if r.max_batch < 0:
        bad(f'replica {i} has negative max_batch {r.max_batch}')
      pos = 0
      for k, s in enumerate(r.stages):
        where = f'replica {i} stage {k}'
        if s.start != pos or s.end <= s.start:
          bad(f'{where} covers layers [{s.start},{s.end}) but must start at {pos} and be non-empty')
        pos = s.end
        if not s.devices or s.tp != len(s.devices):
          bad(f'{where}: tp={s.tp} must equal its number of devices ({len(s.devices)})')
        if s.embed != (k == 0) or s.head != (k == len(r.stages) - 1):
          bad(f'{where}: embed must be on the first stage and head on the last')
        for d in s.devices:
          if d in seen:
            bad(f'device {d} is used twice ({seen[d]} and {where})')
          seen[d] = where
          if cluster is not None and not 0 <= d < cluster.n:
            bad(f'{where}: device {d} is not in cluster {cluster.name!r} ({cluster.n} devices)')
        if model is not None and (model.num_heads % s.tp or model.num_kv_heads % s.tp or model.ffn % s.tp):
          bad(f'{where}: tp={s.tp} does not divide the heads/kv heads/ffn of the model')
      if pos != self.num_layers:
        bad(f'replica {i} covers layers [0,{pos}) but the model has {self.num_layers}')
    for what in ('weights', 'kv', 'act'):
      frac = self.offload.get(what)
      if frac is not None and (len(frac) != 3 or min(frac) < -1e-9 or abs(sum(frac) - 1) > 1e-6):
        bad(f'offload.{what} must be three fractions (gpu, cpu, disk) summing to 1, got {frac}')
    if self.kind == 'train':
      self.replica_micro_batches()  # the weights split the batch into whole micro-batches
    return self

  # ---- (de)serialisation
  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> 'Plan':
    try:
      d = dict(checks.mapping(d, 'a plan'))
      reps = []
      for i, r in enumerate(checks.sequence(d.pop('replicas'), 'replicas', 1, MAX_DEVICES)):
        r = checks.mapping(r, f'replica {i}')
        unknown = set(r) - {'stages', 'weight', 'max_batch'}
        if unknown:
          raise HetjaxError(f'invalid plan: replica {i} has unknown field(s) {sorted(unknown)}')
        stages = []
        for k, s in enumerate(checks.sequence(r['stages'], f'replica {i} stages', 1, MAX_LAYERS)):
          s = dict(checks.mapping(s, f'replica {i} stage {k}'))
          if 'layers' in s:
            s['start'], s['end'] = checks.sequence(s.pop('layers'), f'replica {i} stage {k} layers', 2, 2)
          stages.append(Stage(**s))
        reps.append(Replica(stages=stages, weight=r.get('weight', 1.0), max_batch=r.get('max_batch', 0)))
      if 'num_layers' not in d:
        d['num_layers'] = reps[0].stages[-1].end
      known = {f.name for f in dataclasses.fields(cls)}
      unknown = set(d) - known
      if unknown:
        raise HetjaxError(f'invalid plan: unknown field(s) {sorted(unknown)}')
      return cls(replicas=reps, **d)
    except HetjaxError as e:
      raise HetjaxError(str(e) if str(e).startswith('invalid plan') else f'invalid plan: {e}') from None
    except (KeyError, TypeError, ValueError) as e:
      raise HetjaxError(f'invalid plan: malformed ({type(e).__name__}: {e})') from None

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=1)

  @classmethod
  def from_json(cls, text: str) -> 'Plan':
    try:
      return cls.from_dict(json.loads(text))
    except (json.JSONDecodeError, RecursionError) as e:
      raise HetjaxError(f'invalid plan JSON: {e}') from None

  def save(self, path: str) -> None:
    """Atomic: a crash leaves the old file or the new one."""
    tmp = f'{path}.tmp.{os.getpid()}'
    try:
      with open(tmp, 'w') as f:
        f.write(self.to_json())
      os.replace(tmp, path)
    except OSError as e:
      raise HetjaxError(f'cannot write plan {path}: {e.strerror or e}') from None

  @classmethod
  def load(cls, path: str) -> 'Plan':
    try:
      with open(path) as f:
        return cls.from_json(f.read())
    except (OSError, UnicodeDecodeError) as e:
      raise HetjaxError(f'cannot read plan {path}: {e}') from None

  # ---- display
  def table(self, cluster=None) -> str:
    """Readable table: one row per stage, replicas as columns of device lists (serve: one row per stage)."""
    if self.kind == 'serve' or not self.symmetric:
      return self._replica_table(cluster)
    lines = [f'plan v{self.version} ({self.kind}): model={self.model or "?"} cluster={self.cluster or "?"} '
             f'L={self.num_layers} stages={self.num_stages} dp={self.dp} schedule={self.schedule} '
             f'M={self.micro_batches}x{self.micro_batch_size} act_bits={self.activation_bits}']
    lines.append(f'{"stage":>5} {"layers":>9} {"n":>3} {"tp":>3}  devices per replica')
    ref = self.replicas[0].stages
    for k in range(self.num_stages):
      s = ref[k] if k < len(ref) else None
      rng = f'[{s.start},{s.end})' if s else ''
      cells = []
      for r in self.replicas:
        if k < len(r.stages):
          ds = r.stages[k].devices
          cell = ','.join(map(str, ds))
          if cluster is not None:
            cell += f'({cluster.devices[ds[0]].region[:6]}/{cluster.devices[ds[0]].gpu.split("-")[0]})'
          cells.append(cell)
      tag = ('E' if s and s.embed else '') + ('H' if s and s.head else '')
      lines.append(f'{k:>5} {rng:>9} {s.num_layers if s else "":>3} {s.tp if s else "":>3}  '
                   f'{" | ".join(cells)} {tag}')
    if self.prediction:
      keys = [k for k in ('total', 'compute', 'bubble', 'pp_comm', 'tp_comm', 'dp_comm',
                                  'tied_comm') if k in self.prediction]
      lines.append('predicted step (s): ' + '  '.join(f'{k}={self.prediction[k]:.3f}' for k in keys))
    return '\n'.join(lines)

  def _replica_table(self, cluster=None) -> str:
    """Serving plans and heterogeneous training replicas: one row per (replica, stage)."""
    shape = (f'prompt={self.seq_len} gen={self.gen_len}' if self.kind == 'serve' else
             f'schedule={self.schedule} M={"+".join(map(str, self.replica_micro_batches()))}'
             f'x{self.micro_batch_size} act_bits={self.activation_bits}')
    lines = [f'plan v{self.version} ({self.kind}): model={self.model or "?"} cluster={self.cluster or "?"} '
             f'L={self.num_layers} replicas={self.dp} {shape}']
    lines.append(f'{"rep":>3} {"w":>5} {"maxb":>4} {"stage":>5} {"layers":>9} {"n":>3} {"tp":>3}  devices')
    for i, r in enumerate(self.replicas):
      for k, s in enumerate(r.stages):
        where = ''
        if cluster is not None:
          d = cluster.devices[s.devices[0]]
          where = f'  {d.gpu} @ {d.host}'
        head = f'{i:>3} {r.weight:>5.3f} {r.max_batch:>4}' if k == 0 else ' ' * 14
        lines.append(f'{head} {k:>5} {f"[{s.start},{s.end})":>9} {s.num_layers:>3} {s.tp:>3}  '
                     f'{",".join(map(str, s.devices))}{where}')
    if self.offload:
      lines.append('offload: ' + ' '.join(f'{k}={v}' for k, v in self.offload.items()))
    if self.prediction:
      lines.append('predicted: ' + '  '.join(f'{k}={v:.4g}' for k, v in self.prediction.items()
                                            if isinstance(v, (int, float))))
    return '\n'.join(lines)
