"""Data-parallel gradient compression with error feedback.

Each worker adds its error memory e to its gradient g, quantizes v = g + e in buckets of `bucket`
values (one scale, and a zero point if asymmetric, per bucket; kernels.quantize), keeps
e' = v - deQ(Q(v)) for the next step, and sends Q(v). `compressed_mean` is the real collective:
inside shard_map over a mesh axis it all-gathers the compressed payloads (uint8 codes + bf16
scales), so the wire carries bits/32 of the fp32 bytes (plus scales), and every worker decodes and
averages them. `error_feedback` wraps the same step as an optax GradientTransformation.

Unlike the AQ-SGD paper's code (which exchanges Adam's first moment with two-level error feedback
through a parameter server) this compresses the gradient itself with one error memory per worker.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from hetjax.errors import HetjaxError
from kernels import api as qapi
from kernels.layout import QTensor

GRAD_BITS = (2, 4, 8)


def check(bits: int, bucket: int) -> None:
  if bits not in GRAD_BITS:
    raise HetjaxError(f'dp.grad_bits must be 0 (off) or one of {GRAD_BITS}, got {bits!r}')
  if bucket < 8 or bucket & (bucket - 1):
    raise HetjaxError(f'gradient bucket must be a power of two >= 8, got {bucket}')


def scheme(bits: int, symmetric: bool | None) -> bool:
  """None picks the default from kernels/README.md's study: buckets of flattened gradients mix
  tensors and channels of different magnitude; at 2 bits a zero level then matters more than the
  fourth code (symmetric), at 4 and 8 bits the zero point's full range wins (asymmetric)."""
  return bits == 2 if symmetric is None else symmetric


def _buckets(flat, bucket):
  """1-D fp32 -> (num_buckets, bucket), zero padded."""
  pad = -flat.shape[0] % bucket
  return jnp.pad(flat, (0, pad)).reshape(-1, bucket)


def compress(flat, bits: int, bucket: int, symmetric: bool | None = None) -> QTensor:
  """Q(flat) in buckets: the payload a worker sends."""
  return qapi.quantize(_buckets(flat.astype(jnp.float32), bucket), bits, bucket,
                       symmetric=scheme(bits, symmetric))


def decompress(q: QTensor, size: int):
  return qapi.dequantize(q).reshape(-1)[:size]


def payload_bytes(num_values: int, bits: int, bucket: int, symmetric: bool | None = None) -> int:
  """Exact bytes one worker sends: codes + bf16 scales (+ zero points)."""
  nb = math.ceil(num_values / bucket)
  return nb * bucket * bits // 8 + nb * 2 * (1 if scheme(bits, symmetric) else 2)


def compress_with_feedback(grads, error, bits: int, bucket: int, symmetric: bool | None = None):
  """(payload QTensor, new error tree, the decoded local gradient) for one worker; pure."""
  check(bits, bucket)
  v, unravel = ravel_pytree(jax.tree.map(lambda g, e: g.astype(jnp.float32) + e, grads, error))
  q = compress(v, bits, bucket, symmetric)
  local = decompress(q, v.shape[0])
  return q, unravel(v - local), unravel(local)


def _all_gather_bits(a, axis_name):
  """all_gather along axis 0 of the raw bits: XLA:CPU would widen bf16 scales to f32 on the wire."""
  if jnp.issubdtype(a.dtype, jnp.floating):
    raw = jax.lax.bitcast_convert_type(a, jnp.dtype(f'uint{a.dtype.itemsize * 8}'))
    return jax.lax.bitcast_convert_type(jax.lax.all_gather(raw, axis_name, tiled=True), a.dtype)
  return jax.lax.all_gather(a, axis_name, tiled=True)


def compressed_mean(grads, error, axis_name: str, bits: int, bucket: int, symmetric: bool | None = None):
  """Inside shard_map / pmap over `axis_name`: the mean over workers of their compressed gradients
  (all-gather of the payloads, decoded by every worker) and this worker's new error memory."""
  q, new_error, _ = compress_with_feedback(grads, error, bits, bucket, symmetric)
  gathered = jax.tree.map(lambda a: _all_gather_bits(a, axis_name), q)
  workers = gathered.payload.shape[0] // q.payload.shape[0]
  all_q = dataclasses.replace(gathered, shape=(workers * q.shape[0],) + q.shape[1:])
  flat, unravel = ravel_pytree(grads)
  values = qapi.dequantize(all_q).reshape(workers, -1)[:, :flat.shape[0]]
  mean = unravel(values.mean(axis=0))
  return jax.tree.map(lambda m, g: m.astype(g.dtype), mean, grads), new_error


class ErrorFeedbackState(NamedTuple):
  error: optax.Updates


def error_feedback(bits: int, bucket: int = 512, axis_name: str | None = None,
                   symmetric: bool | None = None) -> optax.GradientTransformation:
  """optax transform: updates -> compressed (and, with axis_name, averaged across workers)
  updates, carrying each worker's error memory in the optimizer state. Chain it first."""
  check(bits, bucket)

  def init(params):
    return ErrorFeedbackState(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))

  def update(updates, state, params=None):
    del params
    if axis_name is None:
      _, error, out = compress_with_feedback(updates, state.error, bits, bucket, symmetric)
      out = jax.tree.map(lambda o, u: o.astype(u.dtype), out, updates)
    else:
      out, error = compressed_mean(updates, state.error, axis_name, bits, bucket, symmetric)
    return out, ErrorFeedbackState(error)

  return optax.GradientTransformation(init, update)
