"""Heterogeneous data-parallel replicas: pipelines of different shapes train one model together.

The replicas of such a training Plan may split layers differently, use other TP degrees and other
numbers of devices, and take unequal shares of the batch. Each replica is its own `Pipeline`
(dp = 1). One step:
1. splits the batch by `Replica.weight` (`Plan.replica_micro_batches`): replica r runs M_r
   micro-batches of micro_batch_size sequences;
2. runs every replica's schedule through the runtime: forward, backward, the replica's gradient
   sums (its tied token table summed between its first and last stage);
3. reduces each layer's gradients over all replicas, whatever their stage boundaries: the tensors
   are gathered onto one device (the layer's holder in replica 0), summed with weight mb_r / B
   (rows per micro-batch over rows per step), which gives the mean gradient of the whole batch, and
   put back onto every stage that holds them;
4. decides the global-norm clip and the non-finite skip once, from the reduced gradients (each tensor
   counted once), and every stage of every replica applies the same AdamW update, so all copies of
   a parameter stay identical.

One process only: replicas in different processes (multi-controller) are refused.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hetjax.compression.codecs import tree_nbytes
from hetjax.errors import HetjaxError
from hetjax.models.config import ModelConfig
from hetjax.models.model import build_model
from hetjax.parallel.pipeline import Pipeline, stage_times
from hetjax.parallel.trainer import PipelineTrainState
from hetjax.plan import Plan


def make_pipeline(plan: Plan, cfg: ModelConfig, tcfg, **kwargs):
  """The runtime for a training plan: `Pipeline` (one (dp, tp) mesh per stage) when the replicas
  are identical, else `HeteroReplicas`."""
  return (Pipeline if plan.symmetric else HeteroReplicas)(plan, cfg, tcfg, **kwargs)


def train_state(pipe, model, data, seed: int = 0, profile_every: int = 0) -> PipelineTrainState:
  cls = HeteroTrainState if isinstance(pipe, HeteroReplicas) else PipelineTrainState
  return cls(pipe, model, data, seed, profile_every=profile_every)


def _unit(path: tuple) -> tuple:
  """The layer a parameter belongs to: ('blocks', i) or a top-level module (token_embed, ...)."""
  return tuple(path[:2]) if path[0] == 'blocks' else tuple(path[:1])


@jax.jit
def _weighted_sum(trees, weights):
  return jax.tree.map(lambda *xs: sum(w * x for w, x in zip(weights, xs)), *trees)


@jax.jit
def _sq_norm(tree):
  return sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree))


class HeteroReplicas:
  """Training steps of a plan whose replicas differ; the interface of `Pipeline` that the trainer
  uses (step, evaluate, stage_params, groups/runners of replica 0 for checkpoints)."""

  buffers = None  # no per-sample codec state (refused below)

  def __init__(self, plan: Plan, cfg: ModelConfig, tcfg, *, seed: int = 0, codec=None,
               transport=None, grad_codec=None, profile: bool = False, colocate: bool = False,
               init_state: nnx.State | None = None, buffers=None, warmup_epochs: int = 0,
               grad_bits: int = 0):
    if plan.kind != 'train':
      raise HetjaxError(f'the pipeline trainer runs training plans, got kind={plan.kind!r}')
    if jax.process_count() > 1:
      raise HetjaxError('heterogeneous replicas (other layer splits, TP degrees or weights) run in '
                        'one process only; a multi-controller run needs identical replicas')
    if buffers is not None or any(getattr(c, 'stateful', False) for c in (codec, grad_codec)):
      raise HetjaxError('AQ-SGD (per-sample codec state) is not supported with heterogeneous '
                        'replicas; use a stateless codec or identical replicas')
    if grad_bits:
      raise HetjaxError('dp.grad_bits (compressed gradients) is not supported with heterogeneous '
                        'replicas; their per-layer reduction is fp32')
    plan.validate(model=cfg)
    self.plan, self.cfg, self.profile = plan, cfg, profile
    self.clip_norm = tcfg.clip_norm
    self.micro = plan.replica_micro_batches()
    full = init_state if init_state is not None else nnx.state(build_model(cfg, seed))
    self.replicas = [
        Pipeline(dataclasses.replace(plan, replicas=[rep], micro_batches=m, prediction={}, search={}),
                 cfg, tcfg, codec=codec, transport=transport, grad_codec=grad_codec,
                 colocate=colocate, init_state=full, profile=profile)
        for rep, m in zip(plan.replicas, self.micro)]
    # [replica][stage] -> {parameter path: its sharding}, where reduced gradients go
    self._shardings = [[{p: v[...].sharding for p, v in nnx.to_flat_state(run.params)}
                        for run in pipe.runners] for pipe in self.replicas]
    self.dp_bytes = 0  # gradient bytes moved between replicas, all steps
    self.timeline: list[dict] = []

  # ---- what the trainer and checkpoints see: replica 0 (all replicas hold the same values)
  @property
  def groups(self):
    return self.replicas[0].groups

  @property
  def runners(self):
    return self.replicas[0].runners

  def stage_params(self) -> list:
    return self.replicas[0].stage_params()

  def codec_state(self, stage: int) -> dict:
    return {}

  # ---- one training step
  def _shares(self, rows: int) -> list[slice]:
    """Each replica's rows of a batch: M_r micro-batches of micro_batch_size sequences."""
    want = sum(self.micro) * self.plan.micro_batch_size
    if rows != want:
      raise HetjaxError(f'batch of {rows} sequences does not match the plan: replicas take '
                        f'{" + ".join(map(str, self.micro))} micro-batches of '
                        f'{self.plan.micro_batch_size} = {want} sequences')
    ends = np.cumsum([0] + [m * self.plan.micro_batch_size for m in self.micro])
    return [slice(a, b) for a, b in zip(ends[:-1], ends[1:])]

  def _backward(self, pipe: Pipeline, inputs, targets, offset: int):
    """Run replica `pipe`'s schedule: (per-stage gradient sums, per-micro-batch losses, events)."""
    inputs, targets, mb, act_shape = pipe._split({'inputs': inputs, 'targets': targets})
    grads, losses, events = pipe.gradients(inputs, targets, None, mb, act_shape)
    if pipe.tied:
      grads = pipe._sum_tied(grads)
    for e in events:  # one timeline: replica r's stages after replica r-1's
      e['stage'] += offset
    return grads, losses, events

  def step(self, batch: dict) -> dict:
    """batch: {'inputs', 'targets'} [sum(M_r) * micro_batch_size, T] on the host. Returns loss,
    grad_norm, bytes_sent (pipeline exchanges plus dp_bytes), dp_bytes (gradients between
    replicas), and with `profile` per-replica, per-stage times."""
    inputs, targets = np.asarray(batch['inputs']), np.asarray(batch['targets'])
    rows = inputs.shape[0]
    shares = self._shares(rows)
    sent_before = sum(p.runtime.bytes_sent() for p in self.replicas)
    grads, loss, events, offset = [], 0.0, [], 0
    for pipe, share in zip(self.replicas, shares):
      g, losses, ev = self._backward(pipe, inputs[share], targets[share], offset)
      mb = (share.stop - share.start) // pipe.micro
      grads.append(g)
      loss += sum(float(x) for x in losses) * mb / rows  # the mean over the whole batch
      events += ev
      offset += len(pipe.groups)
    weights = jnp.asarray([(s.stop - s.start) / p.micro / rows for p, s in zip(self.replicas, shares)],
                          jnp.float32)
    reduced, sq, moved = self._reduce(grads, weights)
    norm = float(np.sqrt(sq))
    scale = jnp.float32(1.0 if norm < self.clip_norm else self.clip_norm / norm)
    # A non-finite step leaves every replica as it was (as single-device training does).
    if np.isfinite(norm) and np.isfinite(loss):
      for pipe, stage_grads in zip(self.replicas, reduced):
        for run, g in zip(pipe.runners, stage_grads):
          run.params, run.opt_state = run.programs.update(run.params, run.opt_state, g, scale)
    jax.block_until_ready([r.params for p in self.replicas for r in p.runners])
    self.dp_bytes += moved
    sent = sum(p.runtime.bytes_sent() for p in self.replicas) - sent_before + moved
    metrics = {'loss': float(loss), 'grad_norm': norm, 'bytes_sent': int(sent), 'dp_bytes': int(moved)}
    if self.profile:
      self.timeline = events
      metrics.update(stage_times(events))
    return metrics

  def _reduce(self, grads, weights):
    """Per layer: the weighted sum of the replicas' gradients, on every stage that holds the layer.
    grads[r][s] is replica r's stage-s gradient State. Returns (the same layout reduced, the squared
    global norm, bytes moved between replicas)."""
    flat = [[dict(nnx.to_flat_state(g)) for g in rep] for rep in grads]
    holders: dict = {}  # unit -> {path: [(replica, stage), ...]}
    for r, rep in enumerate(flat):
      for s, stage in enumerate(rep):
        for path in stage:
          holders.setdefault(_unit(path), {}).setdefault(path, []).append((r, s))
    out = [[{} for _ in rep] for rep in flat]
    sq, moved = [], 0
    for unit, paths in holders.items():
      names = sorted(paths, key=lambda p: tuple(map(str, p)))
      where = paths[names[0]]
      first = {r: s for r, s in reversed(where)}  # replica -> its first stage holding the unit
      if sorted(first) != list(range(len(flat))):
        raise RuntimeError(f'layer {unit} is missing from some replica')  # validate() prevents it
      target = self.replicas[0].groups[first[0]].leader(0)
      parts = [jax.device_put([flat[r][first[r]][p][...] for p in names], target)
               for r in range(len(flat))]
      total = _weighted_sum(parts, weights)
      sq.append(_sq_norm(total))
      moved += 2 * (len(flat) - 1) * tree_nbytes(total)  # reduce to replica 0, broadcast back
      for r, s in where:
        for p, x in zip(names, total):
          out[r][s][p] = flat[r][s][p].replace(jax.device_put(x, self._shardings[r][s][p]))
    reduced = [[nnx.from_flat_state([(p, got[p]) for p in had]) for had, got in zip(rep, rep_out)]
               for rep, rep_out in zip(flat, out)]
    return reduced, sum(float(x) for x in sq), moved

  def evaluate(self, batch: dict) -> float:
    """Mean loss of a batch, each replica evaluating its share."""
    inputs, targets = np.asarray(batch['inputs']), np.asarray(batch['targets'])
    shares = self._shares(inputs.shape[0])
    return sum(pipe.evaluate({'inputs': inputs[s], 'targets': targets[s]}) * (s.stop - s.start)
               for pipe, s in zip(self.replicas, shares)) / inputs.shape[0]


class HeteroTrainState(PipelineTrainState):
  """PipelineTrainState over HeteroReplicas: checkpoints hold replica 0's stages (all replicas
  hold the same values); a restore loads them into every replica's own stages."""

  def restore(self, ckpt, step: int | None = None) -> None:
    hetero = self.pipe
    try:
      for pipe in hetero.replicas:  # the parent restores `self.pipe`'s stages
        self.pipe = pipe
        super().restore(ckpt, step)
        step = self.step
    finally:
      self.pipe = hetero
