"""Pure-jnp reference: whole-array quantize / dequantize / AQ-SGD delta, on padded (N, Dp) arrays.

Inputs are already padded by kernels.api. Group mode groups the last axis in runs of group_size;
per-channel mode (group_size=None) has one scale per column over all N rows.
"""
import jax.numpy as jnp

from kernels import layout, qmath

F32 = jnp.float32


def element_offsets(shape, seed):
  """Rounding offsets for an (N, Dp) array: None (nearest) or hashed uniforms (stochastic)."""
  if seed is None:
    return None
  n, d = shape
  idx = (jnp.arange(n, dtype=jnp.uint32)[:, None] * jnp.uint32(d)
         + jnp.arange(d, dtype=jnp.uint32)[None, :])
  return qmath.uniform(idx, seed)


def _params(v, axis, bits, symmetric, scale_dtype):
  """Stored (scale, zero) from fp32 values reduced over `axis`."""
  fin = qmath.isfinite(v)
  vf = jnp.where(fin, v, F32(0))
  bad = jnp.any(~fin, axis=axis)
  return qmath.group_params(jnp.max(jnp.abs(vf), axis=axis), jnp.min(vf, axis=axis),
                            jnp.max(vf, axis=axis), bad, bits, symmetric, scale_dtype)


def channel_params(x, m, bits, symmetric, scale_dtype):
  """Per-channel (scale, zero), shape (Dp,): one per column of the (N, Dp) input (minus m)."""
  v = x.astype(F32) if m is None else x.astype(F32) - m.astype(F32)
  return _params(v, 0, bits, symmetric, scale_dtype)


def encode(x, m, seed, *, bits, group_size, symmetric, scale_dtype):
  """(payload (N, Dp*bits/8), scale, zero, m_new or None) for a padded (N, Dp) input."""
  n, d = x.shape
  v = x.astype(F32) if m is None else x.astype(F32) - m.astype(F32)
  off = element_offsets((n, d), seed)
  if group_size is None:
    s, z = channel_params(x, m, bits, symmetric, scale_dtype)
    sb, zb = s[None], None if z is None else z[None]
  else:
    v = v.reshape(n, d // group_size, group_size)
    off = off if seed is None else off.reshape(v.shape)
    s, z = _params(v, -1, bits, symmetric, scale_dtype)
    sb, zb = s[..., None], None if z is None else z[..., None]
  codes = qmath.encode_codes(v, sb, zb, off, bits, symmetric)
  payload = layout.pack(codes.astype(jnp.uint8), bits).reshape(n, d * bits // 8)
  m_new = None
  if m is not None:
    deq = qmath.decode_codes(codes, sb, zb, bits, symmetric).reshape(n, d)
    m_new = (m.astype(F32) + deq).astype(m.dtype)
  return payload, s, z, m_new


def decode(payload, scale, zero, m, *, bits, group_size, out_dtype, symmetric):
  """(N, Dp) values: deQ(payload), or m + deQ(payload) in m's dtype when m is given."""
  n = payload.shape[0]
  if group_size is None:
    codes = layout.unpack(payload, bits).astype(jnp.int32)
    sb, zb = scale[None], None if symmetric else zero[None]
  else:
    g = scale.shape[-1]
    codes = layout.unpack(payload.reshape(n, g, -1), bits).astype(jnp.int32)
    sb, zb = scale[..., None], None if symmetric else zero[..., None]
  deq = qmath.decode_codes(codes, sb, zb, bits, symmetric).reshape(n, -1)
  if m is None:
    return deq.astype(out_dtype)
  return (m.astype(F32) + deq).astype(m.dtype)
