"""The loss and the optimizer, shared by single-device training and the pipeline runtime."""

from __future__ import annotations

import jax.numpy as jnp
import optax

from hetjax.errors import HetjaxError


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
