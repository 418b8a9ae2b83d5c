"""Training over a Plan of uneven, tensor-parallel stages: the training workload of the runtime.

Each stage group has its own mesh and its programs, jitted once: forward, backward (recomputes the
forward from the stashed input, so only stage inputs are kept between F and B), on the last stage a
fused loss + backward, and the optimizer update. `TrainHandler` runs one op of a training schedule
(schedules.train) for the runtime (runtime.py), which walks the one global order and moves
activations ('act') and activation gradients ('grad') through the exchanges. The epilogue, after the
last backward: tied-embedding gradients are summed between the first and last stage, the global
gradient norm is reduced over all stages, and each stage applies AdamW to its own parameters.
"""

from __future__ import annotations

import dataclasses
import functools
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from hetjax.compression import aqsgd, buffers as buffers_lib, grad as gradc
from hetjax.checkpoint.manager import host_copy
from hetjax.compression.codecs import Identity
from hetjax.errors import HetjaxError
from hetjax.models.config import ModelConfig
from hetjax.models.model import build_model, split_state
from hetjax.parallel import dp_grads
from hetjax.parallel.exchange import DevicePutTransport, Exchange, resolve
from hetjax.parallel.meshes import StageGroup, build_stage_groups, place
from hetjax.parallel.runtime import Message, Runtime, gather_events, sum_over_processes
from hetjax.parallel.schedules import forward, global_order, train
from hetjax.parallel.state import StateStore
from hetjax.plan import Plan
from hetjax.optim import cross_entropy, make_adamw

TIED = ('token_embed', 'embedding')


def _run(graphdef, params, x):
  return nnx.merge(graphdef, params)(x)[0]


def _tree_add(a, b):
  return jax.tree.map(jnp.add, a, b)


def _sq_norm(grads: nnx.State, skip_tied: bool = False):
  """Sum of squares of all gradients (without the tied table's second copy when asked)."""
  return sum(jnp.sum(jnp.square(v[...].astype(jnp.float32))) for path, v in nnx.to_flat_state(grads)
             if not (skip_tied and tuple(path[:2]) == TIED))


@functools.lru_cache(maxsize=64)
def _programs(group_key, optimizer_key, grad_bits: int = 0):
  """Jitted programs of one stage group, cached so that pipelines with the same stages (e.g. the
  same plan under another schedule) share compilations. grad_bits > 0 (and dp > 1): backward
  programs return per-replica gradients, reduced by `reduce` (dp_grads.py)."""
  group, graphdef = group_key.group, group_key.graphdef
  # The same state layout as train.make_optimizer (clip, adamw), so checkpoints move between
  # single-device and pipeline runs; the clip itself is global and applied before `update`.
  optimizer = optax.chain(optax.identity(), make_adamw(ml_collections.ConfigDict(dict(optimizer_key))))
  shard = group.param_sharding
  act = group.batch_sharding(3)

  def forward(params, x):
    return _run(graphdef, params, x)

  def backward(params, x, g_out):
    if group.has_embed:  # integer token input: no input gradient
      _, vjp = jax.vjp(lambda p: _run(graphdef, p, x), params)
      return vjp(g_out)[0], None
    _, vjp = jax.vjp(lambda p, h: _run(graphdef, p, h), params, x)
    return vjp(g_out)

  def loss_backward(params, x, targets, scale=None):
    """scale: a factor on the loss (per-replica gradients), None for none."""
    def loss_of(p, h):
      loss = cross_entropy(_run(graphdef, p, h), targets)
      return loss if scale is None else loss * scale
    if group.has_embed:
      loss, grads = jax.value_and_grad(lambda p: loss_of(p, x))(params)
      return loss, grads, None
    loss, (grads, g_in) = jax.value_and_grad(loss_of, argnums=(0, 1))(params, x)
    return loss, grads, g_in

  def loss(params, x, targets):
    return cross_entropy(_run(graphdef, params, x), targets)

  def update(params, opt_state, grads, scale):
    grads = jax.tree.map(lambda g: g * scale, grads)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  def init(params):
    # Moments are laid out like the parameters, step counters replicated on the stage mesh.
    like_params = lambda t: jax.tree.structure(t) == jax.tree.structure(params)
    constrain = jax.lax.with_sharding_constraint
    return jax.tree.map(
        lambda t: jax.tree.map(constrain, t, shard) if like_params(t) else constrain(t, group.replicated),
        optimizer.init(params), is_leaf=like_params)

  grad_out = shard
  extra = {}
  if grad_bits:
    grad_out = dp_grads.replica_shardings(group)
    backward = dp_grads.per_replica_backward(backward, group.dp)
    loss_backward = dp_grads.per_replica_loss_backward(loss_backward, group.dp)
    extra = dict(reduce=dp_grads.reduce_program(group, grad_bits),
                 zero_error=dp_grads.zero_error_program(group))
  return types.SimpleNamespace(
      forward=jax.jit(forward, out_shardings=act),
      backward=jax.jit(backward, out_shardings=(grad_out, act)),
      loss_backward=jax.jit(loss_backward, out_shardings=(group.replicated, grad_out, act)),
      loss=jax.jit(loss, out_shardings=group.replicated),
      accumulate=jax.jit(_tree_add, donate_argnums=0),
      init=jax.jit(init),
      update=jax.jit(update, donate_argnums=(0, 1)),
      sq_norm=jax.jit(_sq_norm, static_argnums=1), **extra)


@dataclasses.dataclass(frozen=True)
class _GroupKey:
  """Hashable identity of a stage group's programs: its graph and mesh."""
  graphdef: nnx.GraphDef
  mesh: object
  has_embed: bool
  group: StageGroup = dataclasses.field(compare=False, hash=False)


class StageRunner:
  """One stage group's parameters, optimizer state, DP error memory (compressed gradients only)
  and jitted programs."""

  def __init__(self, group: StageGroup, params, tcfg, grad_bits: int = 0):
    optimizer_key = tuple(sorted((k, v) for k, v in tcfg.items()))
    self.programs = _programs(_GroupKey(group.graphdef, group.mesh, group.has_embed, group),
                              optimizer_key, grad_bits)
    self.params = params
    self.opt_state = self.programs.init(params)
    self.dp_error = self.programs.zero_error(params) if grad_bits else None


def stage_times(events: list[dict]) -> dict:
  """Per-stage seconds of forward and backward compute and of sends, from a profiled step."""
  out = {}
  for e in events:
    prefix = f'stage{e["stage"]}_'
    kind = 'fwd_s' if e['kind'] in ('F', 'P', 'D') else 'bwd_s'
    out[prefix + kind] = out.get(prefix + kind, 0.0) + e['compute_end_s'] - e['start_s']
    out[prefix + 'send_s'] = out.get(prefix + 'send_s', 0.0) + e['end_s'] - e['compute_end_s']
  return out


def next_micro(order) -> dict:
  """(kind, stage, micro) -> the micro-batch of the next op of that kind on that stage in `order`
  (absent for the last): whose buffer rows a stage's next message in that direction needs."""
  out, last = {}, {}
  for op in order:
    if (op.kind, op.stage) in last:
      out[(op.kind, op.stage, last[(op.kind, op.stage)])] = op.micro
    last[(op.kind, op.stage)] = op.micro
  return out


class TrainHandler:
  """Runs the ops of one training step; what an op leaves for a later op of its own stage (stashed
  inputs, the last stage's input gradient) lives in the store for the op's lifetime, gradient sums
  and losses for the step's."""

  def __init__(self, pipe: 'Pipeline', inputs, targets, ids, mb: int, act_shape):
    self.pipe, self.inputs, self.targets, self.ids = pipe, inputs, targets, ids
    self.mb, self.act_shape = mb, act_shape
    self.store = pipe.store

  def _rows(self, m):
    return slice(m * self.mb, (m + 1) * self.mb)

  def compute(self, op, received):
    s, m = op.stage, op.micro
    g, run, store = self.pipe.groups[s], self.pipe.runners[s], self.store
    rows = self._rows(m)
    if op.kind == 'F':
      x = (place(self.inputs[rows], g.batch_sharding(2)) if g.has_embed
           else received[('F', s - 1, m, 0)])
      store.put('op', ('stash', s, m), x)
      if not g.has_head:
        return run.programs.forward(run.params, x)
      # The last stage runs its backward with its forward.
      loss, grads, g_in = run.programs.loss_backward(run.params, x,
                                                     place(self.targets[rows], g.batch_sharding(2)))
      store.put('step', ('loss', m), loss)
      store.put('op', ('grad_in', s, m), g_in)
      self._accumulate(s, grads)
      return None
    x = store.pop('op', ('stash', s, m))
    if g.has_head:
      return store.pop('op', ('grad_in', s, m))
    grads, g_in = run.programs.backward(run.params, x, received[('B', s + 1, m, 0)])
    self._accumulate(s, grads)
    return g_in

  def _accumulate(self, s, grads):
    prev = self.store.get('step', ('grads', s))
    self.store.put('step', ('grads', s),
                   grads if prev is None else self.pipe.runners[s].programs.accumulate(prev, grads))

  def message(self, op, consumer):
    ids = next_ids = None
    if self.ids is not None:  # and the samples of this stage's next message in that direction
      ids = self.ids[self._rows(op.micro)]
      following = self.pipe.next_micro.get((op.kind, op.stage, op.micro))
      next_ids = None if following is None else self.ids[self._rows(following)]
    if op.kind == 'F':
      return Message('act', self.act_shape, key=(op.stage, 'fwd'), ids=ids, next_ids=next_ids)
    return Message('grad', self.act_shape, key=(op.stage, 'bwd'), ids=ids, next_ids=next_ids)


class EvalHandler(TrainHandler):
  """Forward only: the last stage's loss per micro-batch."""

  def compute(self, op, received):
    s, m = op.stage, op.micro
    g, run = self.pipe.groups[s], self.pipe.runners[s]
    rows = self._rows(m)
    x = place(self.inputs[rows], g.batch_sharding(2)) if g.has_embed else received[('F', s - 1, m, 0)]
    if not g.has_head:
      return run.programs.forward(run.params, x)
    self.store.put('step', ('eval_loss', m),
                   run.programs.loss(run.params, x, place(self.targets[rows], g.batch_sharding(2))))
    return None

  def message(self, op, consumer):
    # Evaluation sees the training codec unless it keeps per-sample state: validation samples
    # must not touch training samples' memory.
    return Message('eval' if self.pipe.exchanges['act'].stateful else 'act', self.act_shape)


class Pipeline:
  """Runs training steps of `plan` for model `cfg`. Parameters start from `init_state` (a full
  model's state) or `build_model(cfg, seed)`, the same initial values as single-device training,
  split into the plan's stages."""

  def __init__(self, plan: Plan, cfg: ModelConfig, tcfg, *, seed: int = 0, codec=None,
               transport=None, grad_codec=None, profile: bool = False, colocate: bool = False,
               init_state: nnx.State | None = None, buffers: buffers_lib.BufferStore | None = None,
               warmup_epochs: int = 0, grad_bits: int = 0):
    """`buffers`: where a stateful codec (AQ-SGD) keeps its per-sample memory (one store per
    process; default: SampleState rows in device memory). While a batch's 'epoch' is below
    `warmup_epochs` everything travels in full precision and only fills the buffers.
    `grad_bits` 2, 4 or 8: replicas exchange compressed gradients with error feedback
    (dp_grads.py); 0: XLA's fp32 all-reduce. With one replica there is nothing to reduce."""
    if plan.kind != 'train':
      raise HetjaxError(f'the pipeline trainer runs training plans, got kind={plan.kind!r}')
    self.plan, self.cfg, self.tcfg = plan, cfg, tcfg
    self.groups = build_stage_groups(plan, cfg, colocate)
    self.micro = plan.micro_batches
    self.order = global_order(train(plan.schedule, len(self.groups), self.micro))
    self.eval_order = global_order(forward(len(self.groups), self.micro))
    self.next_micro = next_micro(self.order)
    transport = transport or DevicePutTransport()
    self.exchanges = {'act': Exchange(transport, codec or Identity()),
                      'grad': Exchange(transport, grad_codec or Identity()),
                      'eval': Exchange(transport, Identity()),
                      'tied': Exchange(transport, Identity())}
    self.runtime = Runtime(self.groups, self.exchanges)
    self.buffers, self.warmup_epochs = buffers, warmup_epochs
    self._buffer_keys = self._attach_buffers(buffers, tcfg.seq_len) if buffers is not None else {}
    self.store = StateStore()
    self.tied = cfg.tie_embeddings and len(self.groups) > 1
    self.profile = profile
    self.clip_norm = tcfg.clip_norm
    full = init_state if init_state is not None else nnx.state(build_model(cfg, seed))
    stage_params = split_state(full, [g.abstract for g in self.groups])
    if grad_bits:
      gradc.check(grad_bits, dp_grads.BUCKET)
    self.grad_bits = grad_bits if self.groups[0].dp > 1 else 0
    self.runners = [StageRunner(g, place(jax.tree.map(np.asarray, p), g.param_sharding), tcfg,
                                self.grad_bits)
                    if g.is_local else None for g, p in zip(self.groups, stage_params)]
    self.timeline: list[dict] = []
    self._profiled = 0  # profiled steps so far (names each gather of their events)

  # ---- one training step
  def step(self, batch: dict) -> dict:
    """batch: {'inputs', 'targets'} [M * dp * micro_batch_size, T] on the host (same on all
    processes), and optionally 'ids' (sample ids, for codecs with per-sample state). Returns
    metrics on every process: loss, grad_norm, bytes_sent, and with `profile` per-stage
    fwd/bwd/send seconds (each op is then waited for, which serialises them)."""
    groups, runners, M = self.groups, self.runners, self.micro
    inputs, targets, mb, act_shape = self._split(batch)
    ids = batch.get('ids')
    for ex in (self.exchanges['act'], self.exchanges['grad']):
      aqsgd.check_batch(ex.codec, batch)
    if self.buffers is not None:
      self.buffers.warming_up = buffers_lib.warming_up(float(batch.get('epoch', 0.0)),
                                                       self.warmup_epochs)
    sent_before = self._bytes()
    grads, losses, events = self.gradients(inputs, targets, ids, mb, act_shape)
    new_error = {}
    if self.grad_bits:  # per-replica gradients -> their compressed sum, on every replica
      for s, run in enumerate(runners):
        if run is not None:
          grads[s], new_error[s] = run.programs.reduce(grads[s], run.dp_error)
    if self.tied:
      grads = self._sum_tied(grads)
    mine = lambda g: g.leader(0).process_index == jax.process_index()  # counts each stage once
    sq = sum(float(run.programs.sq_norm(grads[s], self.tied and g.has_head))
             for s, (g, run) in enumerate(zip(groups, runners)) if run is not None and mine(g))
    loss_sum = float(sum(losses)) / M if runners[-1] is not None and mine(groups[-1]) else 0.0
    sent = self._bytes() - sent_before
    dp_sent = sum(dp_grads.bytes_per_step(run.params, g, self.grad_bits, M)
                  for g, run in zip(groups, runners) if run is not None and mine(g))
    sq, loss, sent, dp_sent = sum_over_processes(np.array([sq, loss_sum, sent, dp_sent]))
    norm = float(np.sqrt(sq)) / M  # of the mean gradient over micro-batches
    scale = (1.0 if norm < self.clip_norm else self.clip_norm / norm) / M
    # A non-finite step leaves parameters and optimizer state as they were (every process sees the
    # same summed loss and norm, so all skip together); the training loop decides what follows.
    finite = bool(np.isfinite(norm) and np.isfinite(loss))
    for s, run in enumerate(runners):
      if run is not None and finite:
        run.params, run.opt_state = run.programs.update(run.params, run.opt_state, grads[s],
                                                        jnp.float32(scale))
        run.dp_error = new_error.get(s, run.dp_error)
    jax.block_until_ready([r.params for r in runners if r is not None])
    metrics = {'loss': float(loss), 'grad_norm': norm, 'bytes_sent': int(sent),
               'dp_bytes_sent': int(dp_sent)}
    if self.profile:
      self._profiled += 1
      self.timeline = gather_events(events, f'timeline/{self._profiled}')
      metrics.update(stage_times(self.timeline))
    return metrics

  def gradients(self, inputs, targets, ids, mb: int, act_shape):
    """Run the schedule's forward and backward ops: (per-stage gradient sums, per-micro-batch
    losses, the runtime's events). The step's state is cleared afterwards."""
    handler = TrainHandler(self, inputs, targets, None if ids is None else np.asarray(ids), mb,
                           act_shape)
    events = self.runtime.run(self.order, handler, self.profile)
    grads = [self.store.get('step', ('grads', s)) for s in range(len(self.groups))]
    losses = [self.store.get('step', ('loss', m)) for m in range(self.micro)]
    self.store.clear('step')
    return grads, losses, events

  def _split(self, batch):
    """Host inputs/targets, rows per micro-batch, and the activation shape between stages."""
    inputs, targets = np.asarray(batch['inputs']), np.asarray(batch['targets'])
    if inputs.shape[0] % (self.micro * self.groups[0].dp):
      raise HetjaxError(f'batch of {inputs.shape[0]} sequences does not split into '
                        f'{self.micro} micro-batches x {self.groups[0].dp} replicas')
    mb = inputs.shape[0] // self.micro
    return inputs, targets, mb, (mb, inputs.shape[1], self.cfg.hidden)

  def evaluate(self, batch: dict) -> float:
    """Mean loss of a batch, forward only, micro-batch by micro-batch through the stages."""
    inputs, targets, mb, act_shape = self._split(batch)
    self.runtime.run(self.eval_order, EvalHandler(self, inputs, targets, None, mb, act_shape))
    losses = [self.store.get('step', ('eval_loss', m)) for m in range(self.micro)]
    self.store.clear('step')
    last = self.groups[-1]
    total = (float(sum(losses)) if self.runners[-1] is not None
             and last.leader(0).process_index == jax.process_index() else 0.0)
    return float(sum_over_processes(np.array([total]))[0]) / self.micro

  def _bytes(self) -> int:
    return self.runtime.bytes_sent()

  def _sum_tied(self, grads):
    """First and last stage each hold the token table; both get the sum of both gradients."""
    first, last = self.groups[0], self.groups[-1]
    def table(s):
      return None if grads[s] is None else dict(nnx.to_flat_state(grads[s]))[TIED]
    shape = (self.cfg.vocab_size, self.cfg.hidden)
    # Both ways at once: each side sends before it waits for the other's table.
    to_first = self.exchanges['tied'].send(table(-1), last, first, shape, batch_sharded=False, lazy=True)
    to_last = self.exchanges['tied'].send(table(0), first, last, shape, batch_sharded=False, lazy=True)
    for s, other in ((0, resolve(to_first)), (len(grads) - 1, resolve(to_last))):
      if grads[s] is not None:
        flat = dict(nnx.to_flat_state(grads[s]))
        flat[TIED] = flat[TIED].replace(flat[TIED][...] + other)
        grads[s] = nnx.from_flat_state(list(flat.items()))
    return grads

  # ---- per-sample codec state (AQ-SGD buffers)
  def _boundaries(self):
    """(exchange, message key, sender stage, receiver stage, layer) of every stage boundary; the
    layer where the boundary lies names its buffers, so they survive a plan with the same cut."""
    n = len(self.groups)
    for s in range(n - 1):
      yield self.exchanges['act'], (s, 'fwd'), s, s + 1, self.groups[s].end
    for s in range(1, n):
      yield self.exchanges['grad'], (s, 'bwd'), s, s - 1, self.groups[s].start

  def _attach_buffers(self, store, seq_len: int) -> dict:
    """Back each stateful exchange's (key, replica, side) memory that this process holds by a key
    of `store`, reserved now (so buffers that do not fit fail before training). Returns
    {store key: (owning stage, one sample's state spec)}."""
    keys = {}
    mine = lambda d: d.process_index == jax.process_index()
    for ex, key, src, dst, layer in self._boundaries():
      if not ex.stateful:
        continue
      spec = ex.codec.state_spec((1, seq_len, self.cfg.hidden), jnp.float32)
      for r in range(self.groups[dst].dp):
        for side, stage in (('send', src), ('recv', dst)):
          group = self.groups[stage]
          if not mine(group.leader(r)):
            continue
          store_key = (layer, key[1], r, side)
          store.reserve(store_key, spec)
          ex.states[(key, r, side)] = buffers_lib.StoreRows(store, store_key)
          keys[store_key] = (stage, spec)
    return keys

  def codec_state(self, stage: int) -> dict:
    """Checkpoint form of the buffers stage `stage` holds on this process: {name: {'filled',
    'leaf<i>'}} (copies: the store keeps changing while an asynchronous save writes)."""
    if self.buffers is None:
      return {}
    saved = self.buffers.state_dict()
    out = {}
    for key, (owner, _) in self._buffer_keys.items():
      if owner == stage:
        entry = saved[buffers_lib.key_name(key)]
        out[buffers_lib.key_name(key)] = {'filled': entry['filled'].astype(np.uint8),
                                          **{f'leaf{i}': np.array(a) for i, a in enumerate(entry['leaves'])}}
    return out

  def load_codec_state(self, saved: dict) -> list[str]:
    """Load buffers saved by `codec_state` ({name: entry}, any stages); returns the names of this
    run's buffers that start empty (not in the checkpoint, or saved with other shapes)."""
    if self.buffers is None:
      return []
    entries = {name: {'filled': np.asarray(e['filled']).astype(bool),
                      'leaves': [e[f'leaf{i}'] for i in range(len(e) - 1)]}
               for name, e in saved.items()}
    return self.buffers.load_state_dict(entries, {k: spec for k, (_, spec) in self._buffer_keys.items()})

  # ---- state access
  def stage_params(self) -> list:
    """Per-stage parameters on the host (None for stages this process does not own). With data
    parallelism across processes, each process assembles them from its own replica's shards."""
    return [None if r is None else jax.tree.map(host_copy, r.params) for r in self.runners]

