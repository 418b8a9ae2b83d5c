"""Single-device training: optax AdamW (warmup + cosine), global-norm clipping, validation, metrics,
and orbax checkpoints that resume exactly."""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from hetjax import data as data_lib
from hetjax.checkpoint.manager import Checkpointer, StageSpec
from hetjax.distributed import is_leader
from hetjax.errors import HetjaxError
from hetjax.metrics import MetricsLog, check_writable
from hetjax.models.config import ModelConfig
from hetjax.models.model import Stage, build_model
from hetjax.optim import cross_entropy, make_optimizer


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(2, 3))
def train_step(graphdef, optimizer, params, opt_state, batch):
  def loss_of(p):
    logits, _ = nnx.merge(graphdef, p)(batch['inputs'])
    return cross_entropy(logits, batch['targets'])

  loss, grads = jax.value_and_grad(loss_of)(params)
  norm = optax.global_norm(grads)
  updates, new_opt_state = optimizer.update(grads, opt_state, params)
  new_params = optax.apply_updates(params, updates)
  # A non-finite step leaves the state as it was (the loop decides whether to go on).
  finite = jnp.isfinite(loss) & jnp.isfinite(norm)
  params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                   (new_params, new_opt_state), (params, opt_state))
  return params, opt_state, {'loss': loss, 'grad_norm': norm}


@functools.partial(jax.jit, static_argnums=(0,))
def eval_step(graphdef, params, batch):
  logits, _ = nnx.merge(graphdef, params)(batch['inputs'])
  return cross_entropy(logits, batch['targets'])


def evaluate(graphdef, params, batches) -> float:
  return float(np.mean([float(eval_step(graphdef, params, b)) for b in batches]))


class TrainState:
  """What a training run carries from step to step (and what a checkpoint holds).

  `rng` is the run's key for stochastic work (dropout, stochastic rounding); `extra` holds further
  per-stage state (e.g. AQ-SGD activation buffers) as pytrees under globally unique names.
  `skips_bad_updates`: a step with a non-finite loss or gradient norm leaves the state unchanged
  (what train.max_bad_steps > 0 needs)."""

  skips_bad_updates = True

  def __init__(self, model: Stage, optimizer: optax.GradientTransformation,
               data: data_lib.BatchIterator, seed: int = 0):
    self.spec = StageSpec.of(model)
    self.mcfg = model.cfg
    self.graphdef, self.params = nnx.split(model)
    self.optimizer = optimizer
    self.opt_state = optimizer.init(self.params)
    self.data = data
    self.rng = jax.random.key(seed)
    self.extra: dict = {}
    self.step = 0

  def model(self) -> Stage:
    return nnx.merge(self.graphdef, self.params)

  def train_step(self, batch) -> dict:
    self.params, self.opt_state, m = train_step(
        self.graphdef, self.optimizer, self.params, self.opt_state, batch)
    return {'loss': float(m['loss']), 'grad_norm': float(m['grad_norm'])}  # float() waits

  def evaluate(self, batches) -> float:
    return evaluate(self.graphdef, self.params, batches)

  def tensors(self) -> dict:
    return {'params': self.params, 'opt_state': self.opt_state, 'extra': self.extra}

  def save(self, ckpt: Checkpointer) -> None:
    meta = {'model': dataclasses.asdict(self.mcfg), 'data': self.data.state(),
            'rng': np.asarray(jax.random.key_data(self.rng)).tolist()}
    ckpt.save(self.step, [(self.spec, self.tensors())], meta)

  def restore(self, ckpt: Checkpointer, step: int | None = None) -> None:
    """Load a checkpoint (written under any stage plan) onto this state's devices and shardings."""
    (saved,), meta = ckpt.restore([self.tensors()], step)
    on_device = jax.tree.map(lambda want, x: jax.device_put(x, getattr(want, 'sharding', None)),
                             self.tensors(), saved)
    self.params, self.opt_state, self.extra = (
        on_device['params'], on_device['opt_state'], on_device['extra'])
    self.data.restore(meta['data'])
    self.rng = jax.random.wrap_key_data(np.asarray(meta['rng'], np.uint32))
    self.step = int(meta['step'])


def check_train_config(mcfg: ModelConfig, tcfg) -> None:
  if tcfg.seq_len > mcfg.max_len:
    raise HetjaxError(f'train.seq_len={tcfg.seq_len} exceeds the model\'s max_len={mcfg.max_len}')
  if tcfg.batch_size <= 0 or tcfg.seq_len <= 0:
    raise HetjaxError('train.batch_size and train.seq_len must be positive')


def checkpoint_bytes(mcfg: ModelConfig) -> int:
  """About what one checkpoint takes on disk: fp32 parameters and AdamW's two moments."""
  return 3 * 4 * mcfg.num_params()


def open_checkpoints(workdir: str, ckpt_cfg, resume: bool | None, mcfg: ModelConfig | None = None,
                     print_fn=print) -> Checkpointer:
  """<workdir>/checkpoints. resume=None resumes if a checkpoint exists; True requires one; False
  refuses a workdir that has one (its metrics and checkpoints would mix with the new run's).
  Checks now that the folder is writable and (given the model) has room for a checkpoint."""
  directory = os.path.join(workdir, 'checkpoints')
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError as e:
    raise HetjaxError(f'cannot create {directory}: {e.strerror or e}') from None
  check_writable(directory)
  if mcfg is not None:
    need, free = checkpoint_bytes(mcfg), shutil.disk_usage(directory).free
    if free < need:
      raise HetjaxError(f'{directory} has {free / 1e9:.3g} GB free but one checkpoint needs about '
                        f'{need / 1e9:.3g} GB')
  ckpt = Checkpointer(directory, every=ckpt_cfg.every, keep=ckpt_cfg.keep,
                      async_save=ckpt_cfg.async_save, warn=print_fn)
  step = ckpt.latest_step()
  if resume is True and step is None:
    raise HetjaxError(f'resume=true but {ckpt.directory} holds no checkpoint')
  if resume is False and step is not None:
    raise HetjaxError(f'{workdir} holds a checkpoint at step {step}; resume it (drop '
                      f'--config.resume=false) or choose a fresh --config.workdir')
  return ckpt


def nonfinite(record: dict) -> list[str]:
  """Names of the step metrics that are NaN or infinite."""
  return [k for k in ('loss', 'grad_norm') if k in record and not math.isfinite(record[k])]


def train(mcfg: ModelConfig, tcfg, workdir: str, seed: int = 0, corpus: str | None = None,
          print_fn=print, ckpt_cfg=None, resume: bool | None = None, make_state=None,
          init_model: Stage | None = None) -> TrainState:
  """Train on the corpus; logs to <workdir>/metrics.jsonl.

  `make_state(model, data, seed)` builds what runs the steps: by default a single-device
  TrainState; the pipeline runtime passes one that executes a Plan (hetjax/parallel/trainer.py).
  With `ckpt_cfg` (every, keep, async_save) it saves to <workdir>/checkpoints every N steps and at
  the end, and resumes from the newest readable checkpoint there (see `open_checkpoints`).
  `init_model` (e.g. a converted HF checkpoint) replaces the random initialisation; a resume
  overrides it.

  A step with a non-finite loss or gradient norm stops the run with an error naming the step,
  unless `tcfg.max_bad_steps` > 0: then up to that many such steps are skipped (the state is left
  as it was; needs a state with `skips_bad_updates`). No checkpoint is written after a bad step."""
  check_train_config(mcfg, tcfg)
  max_bad_steps = int(tcfg.get('max_bad_steps', 0) or 0)
  tokens = data_lib.load_corpus(corpus or data_lib.DEFAULT_CORPUS)
  if int(tokens.max()) >= mcfg.vocab_size:
    raise HetjaxError(f'corpus token id {int(tokens.max())} needs vocab_size > {mcfg.vocab_size}')
  train_tokens, val_tokens = data_lib.train_val_split(tokens)
  val = data_lib.eval_batches(val_tokens, tcfg.batch_size, tcfg.seq_len, tcfg.eval_batches)
  data = data_lib.BatchIterator(train_tokens, tcfg.batch_size, tcfg.seq_len, seed)
  model = init_model if init_model is not None else build_model(mcfg, seed)
  if make_state is None:
    state = TrainState(model, make_optimizer(tcfg), data, seed)
  else:
    state = make_state(model, data, seed)
  if max_bad_steps and not getattr(state, 'skips_bad_updates', False):
    raise HetjaxError('train.max_bad_steps > 0 needs a training state that can skip an update '
                      '(use 0: stop at the first bad step)')
  log = MetricsLog(workdir) if is_leader() else None
  if log is None:  # other processes of a multi-controller run stay quiet
    print_fn = lambda *args, **kwargs: None
  ckpt = (open_checkpoints(workdir, ckpt_cfg, resume, mcfg, print_fn) if ckpt_cfg is not None
          else None)
  if ckpt is not None and ckpt.latest_step() is not None:
    state.restore(ckpt)  # the newest checkpoint that reads back intact
    print_fn(f'resumed from {ckpt.directory} at step {state.step}')
  if log:
    log.keep_until(state.step if state.step else -1)  # records a killed run logged after it
  try:
    _loop(state, tcfg, val, log, ckpt, max_bad_steps, print_fn)
  finally:
    if ckpt is not None:
      ckpt.close()  # waits for an asynchronous save to commit
  return state


def _loop(state, tcfg, val, log, ckpt, max_bad_steps, print_fn) -> None:
  tokens_per_step = tcfg.batch_size * tcfg.seq_len
  if state.step < tcfg.steps:
    print_fn(f'compiling (the first step takes longest; a line every {tcfg.log_every} steps)')
  if tcfg.eval_every and state.step == 0:
    val_loss = state.evaluate(val)
    if log:
      log.log(0, val_loss=val_loss)
  window_start, window_steps = time.perf_counter(), 0
  bad_steps = 0
  while state.step < tcfg.steps:
    batch = next(state.data)
    t0 = time.perf_counter()
    record = state.train_step(batch)
    record['step_time_s'] = time.perf_counter() - t0
    loss = record['loss']
    state.step += 1
    window_steps += 1
    bad = nonfinite(record)
    if bad:
      bad_steps += 1
      what = ' and '.join(f'{k}={record[k]}' for k in bad)
      if bad_steps > max_bad_steps:
        if log:
          log.log(state.step, **record, bad_step=True)
        saved = ckpt.latest_step() if ckpt is not None else None
        raise HetjaxError(
            f'step {state.step}: non-finite {what}; training stopped'
            + (f' after {bad_steps - 1} skipped bad step(s)' if max_bad_steps else '')
            + (f'; the last checkpoint is step {saved}' if saved is not None else '')
            + ' (lower train.lr, check the data, or allow skips with train.max_bad_steps)')
      print_fn(f'warning: step {state.step}: non-finite {what}; update skipped '
               f'({bad_steps} of at most {max_bad_steps})')
      record['skipped'] = True
    last = state.step == tcfg.steps
    if tcfg.eval_every and (state.step % tcfg.eval_every == 0 or last):
      record['val_loss'] = state.evaluate(val)
    if state.step % tcfg.log_every == 0 or last or 'val_loss' in record or bad:
      if log:
        log.log(state.step, **record)
      rate = window_steps / (time.perf_counter() - window_start)
      extra = f'  val {record["val_loss"]:.3f}' if 'val_loss' in record else ''
      print_fn(f'step {state.step:5d}/{tcfg.steps}  loss {loss:.3f}{extra}  '
               f'{rate:.2f} steps/s  {rate * tokens_per_step:,.0f} tok/s')
      window_start, window_steps = time.perf_counter(), 0
    if ckpt is not None:
      ckpt.check()  # a failed background save stops the run now
      if ckpt.should_save(state.step) or last:
        state.save(ckpt)
