"""Single-model generation: one jitted prefill, one jitted decode step, sampling with a seed."""

from __future__ import annotations

import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hetjax.errors import HetjaxError
from hetjax.models.model import Stage
from hetjax.sampling import sample_logits


@functools.partial(jax.jit, static_argnums=(0, 4))
def _prefill(graphdef, state, tokens, cache, sampling, key):
  model = nnx.merge(graphdef, state)
  logits, cache = model(tokens, 0, cache, last_only=True)
  return sample_logits(logits[:, -1], key, *sampling), cache


@functools.partial(jax.jit, static_argnums=(0, 5), donate_argnums=(3,))
def _decode_step(graphdef, state, token, cache, pos, sampling, key):
  model = nnx.merge(graphdef, state)
  logits, cache = model(token[:, None], pos, cache)
  return sample_logits(logits[:, -1], key, *sampling), cache


def check_prompt(model: Stage, prompt_len: int, max_new_tokens: int) -> None:
  limit = model.cfg.max_len
  if prompt_len == 0:
    raise HetjaxError('the prompt is empty')
  if prompt_len > limit:
    raise HetjaxError(f'prompt of {prompt_len} tokens is longer than the model\'s max length {limit}')
  if prompt_len + max_new_tokens > limit:
    raise HetjaxError(f'prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) exceeds the '
                      f'model\'s max length {limit}')


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
  """temperature >= 0 (0: greedy), top_k >= 0 (0: off), 0 < top_p <= 1, all finite."""
  if not (math.isfinite(temperature) and temperature >= 0):
    raise HetjaxError(f'temperature must be a finite number >= 0 (0: greedy), got {temperature}')
  if top_k < 0:
    raise HetjaxError(f'top_k must be >= 0 (0: off), got {top_k}')
  if not 0 < top_p <= 1:  # also false for NaN
    raise HetjaxError(f'top_p must be in (0, 1], got {top_p}')


def generate(model: Stage, prompt_ids, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, return_timing: bool = False):
  """Generate `max_new_tokens` after `prompt_ids` ([B, T] or [T]). Returns new ids [B, N].

  The cache holds batch x (T + N) positions; the decode step compiles once for all tokens."""
  check_sampling(temperature, top_k, top_p)
  prompt = jnp.atleast_2d(jnp.asarray(prompt_ids, jnp.int32))
  batch, prompt_len = prompt.shape
  check_prompt(model, prompt_len, max_new_tokens)
  if int(prompt.max()) >= model.cfg.vocab_size or int(prompt.min()) < 0:
    raise HetjaxError(f'prompt token ids must lie in [0, {model.cfg.vocab_size})')
  graphdef, state = nnx.split(model)
  cache = model.init_cache(batch, prompt_len + max_new_tokens)
  sampling = (float(temperature), int(top_k), float(top_p))
  keys = jax.random.split(jax.random.key(seed), max_new_tokens)
  t0 = time.perf_counter()
  token, cache = _prefill(graphdef, state, prompt, cache, sampling, keys[0])
  token.block_until_ready()
  t1 = time.perf_counter()
  out = [token]
  for i in range(1, max_new_tokens):
    token, cache = _decode_step(graphdef, state, token, cache, jnp.int32(prompt_len + i - 1),
                                sampling, keys[i])
    out.append(token)
  ids = np.asarray(jnp.stack(out, axis=1))
  t2 = time.perf_counter()
  if return_timing:
    return ids, {'prefill_s': t1 - t0, 'decode_s': t2 - t1}
  return ids
