"""Single-device training: optax AdamW (warmup + cosine), global-norm clipping, validation, metrics,
and orbax checkpoints that resume exactly."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
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
from hetjax.metrics import MetricsLog
from hetjax.models.config import ModelConfig
from hetjax.models.model import Stage, build_model


def make_adamw(tcfg) -> optax.GradientTransformation:
  """AdamW with linear warmup and cosine decay (no clipping: the pipeline clips across stages)."""
  if tcfg.steps <= 0:
    raise HetjaxError(f'train.steps must be positive, got {tcfg.steps}')
  warmup = min(tcfg.warmup_steps, max(tcfg.steps - 1, 0))
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=tcfg.lr, warmup_steps=warmup,
      decay_steps=max(tcfg.steps, warmup + 1), end_value=tcfg.lr * tcfg.min_lr_ratio)
  return optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=tcfg.weight_decay)


def make_optimizer(tcfg) -> optax.GradientTransformation:
  """AdamW after clipping the global gradient norm."""
  return optax.chain(optax.clip_by_global_norm(tcfg.clip_norm), make_adamw(tcfg))


def cross_entropy(logits, targets):
  """Mean next-token cross entropy in fp32."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets).mean()


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(2, 3))
def train_step(graphdef, optimizer, params, opt_state, batch):
  def loss_of(p):
    logits, _ = nnx.merge(graphdef, p)(batch['inputs'])
    return cross_entropy(logits, batch['targets'])

  loss, grads = jax.value_and_grad(loss_of)(params)
  updates, opt_state = optimizer.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  return params, opt_state, {'loss': loss, 'grad_norm': optax.global_norm(grads)}


@functools.partial(jax.jit, static_argnums=(0,))
def eval_step(graphdef, params, batch):
  logits, _ = nnx.merge(graphdef, params)(batch['inputs'])
  return cross_entropy(logits, batch['targets'])


def evaluate(graphdef, params, batches) -> float:
  return float(np.mean([float(eval_step(graphdef, params, b)) for b in batches]))


class TrainState:
  """What a training run carries from step to step (and what a checkpoint holds).

  `rng` is the run's key for stochastic work (dropout, stochastic rounding); `extra` holds further
  per-stage state (e.g. AQ-SGD activation buffers) as pytrees under globally unique names."""

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


def open_checkpoints(workdir: str, ckpt_cfg, resume: bool | None) -> Checkpointer:
  """<workdir>/checkpoints. resume=None resumes if a checkpoint exists; True requires one; False
  refuses a workdir that has one (its metrics and checkpoints would mix with the new run's)."""
  ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'), every=ckpt_cfg.every,
                      keep=ckpt_cfg.keep, async_save=ckpt_cfg.async_save)
  step = ckpt.latest_step()
  if resume is True and step is None:
    raise HetjaxError(f'resume=true but {ckpt.directory} holds no checkpoint')
  if resume is False and step is not None:
    raise HetjaxError(f'{workdir} holds a checkpoint at step {step}; resume it (drop '
                      f'--config.resume=false) or choose a fresh --config.workdir')
  return ckpt


def drop_metrics_after(log: MetricsLog, step: int) -> None:
  """Forget records a killed run logged after its last checkpoint (they will be logged again)."""
  kept = [r for r in log.read() if r['step'] <= step]
  tmp = f'{log.path}.tmp.{os.getpid()}'
  with open(tmp, 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in kept)
  os.replace(tmp, log.path)


def train(mcfg: ModelConfig, tcfg, workdir: str, seed: int = 0, corpus: str | None = None,
          print_fn=print, ckpt_cfg=None, resume: bool | None = None, make_state=None) -> TrainState:
  """Train on the corpus; logs to <workdir>/metrics.jsonl.

  `make_state(model, data, seed)` builds what runs the steps: by default a single-device
  TrainState; the pipeline runtime passes one that executes a Plan (hetjax/parallel/trainer.py).
  With `ckpt_cfg` (every, keep, async_save) it saves to <workdir>/checkpoints every N steps and at
  the end, and resumes from the latest checkpoint there (see `open_checkpoints`)."""
  check_train_config(mcfg, tcfg)
  tokens = data_lib.load_corpus(corpus or data_lib.DEFAULT_CORPUS)
  if int(tokens.max()) >= mcfg.vocab_size:
    raise HetjaxError(f'corpus token id {int(tokens.max())} needs vocab_size > {mcfg.vocab_size}')
  train_tokens, val_tokens = data_lib.train_val_split(tokens)
  val = data_lib.eval_batches(val_tokens, tcfg.batch_size, tcfg.seq_len, tcfg.eval_batches)
  data = data_lib.BatchIterator(train_tokens, tcfg.batch_size, tcfg.seq_len, seed)
  if make_state is None:
    state = TrainState(build_model(mcfg, seed), make_optimizer(tcfg), data, seed)
  else:
    state = make_state(build_model(mcfg, seed), data, seed)
  log = MetricsLog(workdir) if is_leader() else None
  if log is None:  # other processes of a multi-controller run stay quiet
    print_fn = lambda *args, **kwargs: None
  ckpt = open_checkpoints(workdir, ckpt_cfg, resume) if ckpt_cfg is not None else None
  if ckpt is not None and ckpt.latest_step() is not None:
    state.restore(ckpt)
    if log:
      drop_metrics_after(log, state.step)
    print_fn(f'resumed from {ckpt.directory} at step {state.step}')
  tokens_per_step = tcfg.batch_size * tcfg.seq_len
  if state.step < tcfg.steps:
    print_fn(f'compiling (the first step takes longest; a line every {tcfg.log_every} steps)')
  if tcfg.eval_every and state.step == 0:
    val_loss = state.evaluate(val)
    if log:
      log.log(0, val_loss=val_loss)
  window_start, window_steps = time.perf_counter(), 0
  while state.step < tcfg.steps:
    batch = next(state.data)
    t0 = time.perf_counter()
    record = state.train_step(batch)
    record['step_time_s'] = time.perf_counter() - t0
    loss = record['loss']
    state.step += 1
    window_steps += 1
    last = state.step == tcfg.steps
    if tcfg.eval_every and (state.step % tcfg.eval_every == 0 or last):
      record['val_loss'] = state.evaluate(val)
    if state.step % tcfg.log_every == 0 or last or 'val_loss' in record:
      if log:
        log.log(state.step, **record)
      rate = window_steps / (time.perf_counter() - window_start)
      extra = f'  val {record["val_loss"]:.3f}' if 'val_loss' in record else ''
      print_fn(f'step {state.step:5d}/{tcfg.steps}  loss {loss:.3f}{extra}  '
               f'{rate:.2f} steps/s  {rate * tokens_per_step:,.0f} tok/s')
      window_start, window_steps = time.perf_counter(), 0
    if ckpt is not None and (ckpt.should_save(state.step) or last):
      state.save(ckpt)
  if ckpt is not None:
    ckpt.close()  # waits for an asynchronous save to commit
  return state
