"""Training state for a Plan: the pipeline runtime behind the same interface as train.TrainState,
so the one training loop in hetjax/train.py (logging, validation, checkpoints) drives both."""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
from flax import nnx

from hetjax.checkpoint.manager import Checkpointer, StageSpec, tensor_index
from hetjax.checkpoint.repartition import flatten
from hetjax.models.model import Stage, merge_states
from hetjax.parallel import dp_grads
from hetjax.parallel.pipeline import Pipeline
from hetjax.parallel.timeline import draw_gantt, write_chrome_trace


class PipelineTrainState:
  skips_bad_updates = True  # Pipeline.step applies no update when the loss or norm is not finite

  def __init__(self, pipeline: Pipeline, model: Stage, data, seed: int = 0, profile_every: int = 0):
    """profile_every > 0: every N-th step waits for each op and logs per-stage times."""
    self.pipe, self.mcfg, self.data = pipeline, model.cfg, data
    self.profile_every = profile_every
    self.graphdef = nnx.graphdef(model)
    self.rng = jax.random.key(seed)
    self.step = 0

  def train_step(self, batch) -> dict:
    self.pipe.profile = bool(self.profile_every) and (self.step + 1) % self.profile_every == 0
    return self.pipe.step(batch)

  def write_timeline(self, workdir: str) -> None:
    """timeline.json (Chrome trace) and timeline.png of the last profiled step, if any."""
    if self.pipe.timeline and jax.process_index() == 0:
      write_chrome_trace(self.pipe.timeline, os.path.join(workdir, 'timeline.json'))
      draw_gantt(self.pipe.timeline, os.path.join(workdir, 'timeline.png'))

  def evaluate(self, batches) -> float:
    return float(np.mean([self.pipe.evaluate(b) for b in batches]))

  def model(self) -> Stage:
    """The whole model on one device (for sampling); needs every stage on this process."""
    stages = self.pipe.stage_params()
    if any(s is None for s in stages):
      raise RuntimeError('model() needs all stages on this process')
    return nnx.merge(self.graphdef, merge_states(stages))

  def _local(self):
    """(spec, tensors) of the stages this process runs."""
    return [(StageSpec(g.start, g.end, g.has_embed, g.has_head),
             {'params': r.params, 'opt_state': r.opt_state, 'extra': {}})
            for g, r in zip(self.pipe.groups, self.pipe.runners) if r is not None]

  def _with_codec_state(self):
    """_local() with each stage's codec buffers (AQ-SGD) under extra/codec, plus one entry per
    stage with DP error memory (dp.grad_bits): the rows of the replicas this process holds."""
    out = []
    for s, (spec, tensors) in zip(self._local_stages(), self._local()):
      state = self.pipe.codec_state(s)
      out.append((spec, {**tensors, 'extra': {'codec': state} if state else {}}))
      rows = self._dp_error_rows(s)
      if rows:  # its own entry: a stage's other tensors are written by one process only
        out.append((spec, {'extra': {'dp_error': rows}}))
    return out

  def _dp_error_rows(self, s: int) -> dict:
    """{'<start>_<end>': {'r<replica>': rows}} of stage s's DP error memory on this process (named
    by its layers: the first and last stage both hold the tied table), or {}."""
    run, g = self.pipe.runners[s], self.pipe.groups[s]
    if run is None or run.dp_error is None:
      return {}
    rows = dp_grads.error_rows(run.dp_error, g)
    return {f'{g.start}_{g.end}': {f'r{r}': tree for r, tree in rows.items()}}

  def _restore_dp_error(self, ckpt: Checkpointer, step: int) -> None:
    """Load each stage's DP error memory saved for the same layers, replicas and shapes; the
    others start at zero, said in one line."""
    index = tensor_index(ckpt.meta(step))
    found, missing = [], []
    for s in self._local_stages():
      rows = self._dp_error_rows(s)
      if not rows:
        continue
      template = {'extra': {'dp_error': rows}}
      ok = all(list(index.get(name, (None, None))[1] or []) == list(np.shape(x))
               for name, x in flatten(template).items())
      (found if ok else missing).append((s, template))
    if found:
      saved, _ = ckpt.restore([t for _, t in found], step, whole_model=False)
      for (s, _), got in zip(found, saved):
        rows = next(iter(got['extra']['dp_error'].values()))
        run = self.pipe.runners[s]
        run.dp_error = dp_grads.error_from_rows({int(r[1:]): t for r, t in rows.items()}, run.dp_error)
    if missing and jax.process_index() == 0:
      names = ', '.join(next(iter(t['extra']['dp_error'])) for _, t in missing)
      print(f'note: the checkpoint has no DP error memory for layers {names} (other stages or '
            f'replicas); it starts at zero')

  def _local_stages(self):
    return [s for s, r in enumerate(self.pipe.runners) if r is not None]

  def _restore_codec_state(self, ckpt: Checkpointer, step: int) -> None:
    """Load the buffers the checkpoint holds for this run's boundaries (same name and shape);
    the others start empty, said in one line."""
    if self.pipe.buffers is None:
      return
    index = tensor_index(ckpt.meta(step))
    want = {}
    for s in self._local_stages():
      for name, entry in self.pipe.codec_state(s).items():
        if all(list(index.get(f'extra/codec/{name}/{k}', (None, None))[1] or []) == list(np.shape(a))
               for k, a in entry.items()):
          want[name] = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), entry)
    got = {}
    if want:
      (read,), _ = ckpt.restore([{'extra': {'codec': want}}], step, whole_model=False)
      got = read['extra']['codec']
    fresh = self.pipe.load_codec_state(got)
    if fresh and jax.process_index() == 0:
      print(f'note: the checkpoint has no codec buffers for {", ".join(fresh)} (other stage '
            f'boundaries or shapes); they start empty and warm up again')

  def save(self, ckpt: Checkpointer) -> None:
    meta = {'model': dataclasses.asdict(self.mcfg), 'data': self.data.state(),
            'rng': np.asarray(jax.random.key_data(self.rng)).tolist()}
    ckpt.save(self.step, self._with_codec_state(), meta)

  def restore(self, ckpt: Checkpointer, step: int | None = None) -> None:
    """Load a checkpoint written under any plan (or by single-device training) onto the stages."""
    local = self._local()
    # Restored leaves land on the shardings of the templates' arrays.
    saved, meta = ckpt.restore([t for _, t in local], step, whole_model=jax.process_count() == 1)
    runners = [r for r in self.pipe.runners if r is not None]
    for runner, got in zip(runners, saved):
      runner.params, runner.opt_state = got['params'], got['opt_state']
    self.data.restore(meta['data'])
    self.rng = jax.random.wrap_key_data(np.asarray(meta['rng'], np.uint32))
    self.step = int(meta['step'])
    self._restore_codec_state(ckpt, self.step)
    self._restore_dp_error(ckpt, self.step)
