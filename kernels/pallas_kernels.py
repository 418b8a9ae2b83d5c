"""Pallas kernels (Triton on GPU, interpret=True elsewhere) on the same padded (N, Dp) inputs.

Kernels see a row view (R, P, W) of the input: R rows of L = P*W values (a group in group mode, a
token row in per-channel mode), split into the P chunks of the packing layout (kernels/layout.py).
A program handles a (BM, P, BW) block: it loads each chunk with one contiguous load, computes the
group scale in registers (group mode) or reads the per-channel scales, quantizes, ORs the codes into
words and stores NB byte-planes. The AQ-SGD delta encode also writes m' = m + deQ(codes) in the same
pass, so a and m are read once and nothing but payload, scales and m' is written.

Triton notes: every loaded/stored value has a power-of-two size (BM and BW are powers of two that
divide R and W), there is no in-kernel RNG (stochastic rounding hashes the global element index),
fp32 division is `div.rn` via inline PTX so codes match XLA's IEEE division bit for bit, and max/min
never see NaN (non-finite values are masked first; Triton's maxnumf would drop NaN silently).
"""
import functools
import inspect

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels import layout, qmath, reference

F32 = jnp.float32
BLOCK_ELEMS = 2048  # values per program; tuned on an H200 (see README)
MAX_BW = 512
NUM_WARPS = 8


def _pow2_divisor(n, cap):
  """Largest power of two that divides n and is <= cap (>= 1)."""
  b = 1
  while b * 2 <= cap and n % (b * 2) == 0:
    b *= 2
  return b


def _ieee_div(a, b):
  """fp32 a / b rounded to nearest (Triton's own f32 division is approximate)."""
  from jax.experimental.pallas import triton as plgpu
  shape = jnp.broadcast_shapes(a.shape, b.shape)
  a, b = jnp.broadcast_to(a, shape), jnp.broadcast_to(b, shape)
  return plgpu.elementwise_inline_asm(
      'div.rn.f32 $0, $1, $2;', args=[a, b], constraints='=r,r,r', pack=1,
      result_shape_dtypes=[jax.ShapeDtypeStruct(shape, F32)])[0]


def _words(codes, bits):
  return functools.reduce(jnp.bitwise_or, [c << (bits * p) for p, c in enumerate(codes)])


def _store_bytes(out_ref, word, nb):
  for b in range(nb):
    out_ref[:, b, :] = ((word >> (8 * b)) & 0xFF).astype(jnp.uint8)


def _load_codes(in_ref, bits):
  p, nb = layout.planes(bits)
  word = functools.reduce(jnp.bitwise_or,
                          [in_ref[:, b, :].astype(jnp.int32) << (8 * b) for b in range(nb)])
  return [(word >> (bits * i)) & (2**bits - 1) for i in range(p)]


def _geometry(r, w, p, group):
  bw = w if group else _pow2_divisor(w, MAX_BW)
  bm = _pow2_divisor(r, max(1, BLOCK_ELEMS // (p * bw)))
  return bm, bw


def _struct(shape, dtype, like):
  """ShapeDtypeStruct that varies over the same shard_map axes as `like` (needed under check_vma)."""
  params = inspect.signature(jax.ShapeDtypeStruct).parameters
  aval = jax.typeof(like)
  for name in ('manual_axis_type', 'vma'):
    if name in params and getattr(aval, name, None) is not None:
      return jax.ShapeDtypeStruct(shape, dtype, **{name: getattr(aval, name)})
  return jax.ShapeDtypeStruct(shape, dtype)


def _call(body, grid, in_specs, out_specs, out_shape, interpret, args):
  like = args[0]
  out_shape = jax.tree.map(lambda s: _struct(s.shape, s.dtype, like), out_shape)
  extra = {}
  if not interpret:
    from jax.experimental.pallas import triton as plgpu
    extra['compiler_params'] = plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=1)
  return pl.pallas_call(body, grid=grid, in_specs=in_specs, out_specs=out_specs,
                        out_shape=out_shape, interpret=interpret, **extra)(*args)


def _scale_spec(group, bm, p, bw):
  if group:
    return pl.BlockSpec((bm, 1, 1), lambda i, j: (i, 0, 0))
  return pl.BlockSpec((1, p, bw), lambda i, j: (0, 0, j))


def encode(x, m, seed, *, bits, group_size, symmetric, scale_dtype, interpret):
  """Same contract as reference.encode."""
  n, d = x.shape
  group = group_size is not None
  p, nb = layout.planes(bits)
  row_len = group_size if group else d
  r, w = n * d // row_len, row_len // p
  bm, bw = _geometry(r, w, p, group)
  div = qmath.true_div if interpret else _ieee_div
  delta, stochastic = m is not None, seed is not None
  sdt = jnp.dtype(scale_dtype)

  def body(*refs):
    refs = list(refs)
    x_ref = refs.pop(0)
    m_ref = refs.pop(0) if delta else None
    s_in = refs.pop(0) if not group else None
    z_in = refs.pop(0) if not group and not symmetric else None
    seed_ref = refs.pop(0) if stochastic else None
    pay_ref = refs.pop(0)
    s_out = refs.pop(0) if group else None
    z_out = refs.pop(0) if group and not symmetric else None
    m_out = refs.pop(0) if delta else None

    vs = [x_ref[:, k, :].astype(F32) for k in range(p)]
    ms = [m_ref[:, k, :].astype(F32) for k in range(p)] if delta else None
    if delta:
      vs = [v - mk for v, mk in zip(vs, ms)]
    if group:  # reduce each chunk along the row, then across chunks
      fin = [qmath.isfinite(v) for v in vs]
      vf = [jnp.where(f, v, F32(0)) for f, v in zip(fin, vs)]
      red = lambda fn, vals: functools.reduce(
          getattr(jnp, fn + 'imum'), [getattr(jnp, fn)(a, axis=1, keepdims=True) for a in vals])
      nbad = red('max', [jnp.where(f, 0, 1) for f in fin])
      s, z = qmath.group_params(red('max', [jnp.abs(v) for v in vf]), red('min', vf),
                                red('max', vf), nbad > 0, bits, symmetric, sdt, div)
      s_out[:, 0, :] = s
      if z_out is not None:
        z_out[:, 0, :] = z
      scales = [(s, z)] * p
    else:
      scales = [(s_in[:, k, :], None if symmetric else z_in[:, k, :]) for k in range(p)]

    if stochastic:
      i, j = pl.program_id(0), pl.program_id(1)
      rows = (i * bm + jax.lax.broadcasted_iota(jnp.int32, (bm, bw), 0)).astype(jnp.uint32)
      cols = (j * bw + jax.lax.broadcasted_iota(jnp.int32, (bm, bw), 1)).astype(jnp.uint32)
      base = rows * jnp.uint32(row_len) + cols
      seed_v = seed_ref[...]
    codes = []
    for k in range(p):
      off = qmath.uniform(base + jnp.uint32(k * w), seed_v) if stochastic else None
      sk, zk = scales[k]
      codes.append(qmath.encode_codes(vs[k], sk, zk, off, bits, symmetric, div))
    _store_bytes(pay_ref, _words(codes, bits), nb)
    if delta:
      for k in range(p):
        sk, zk = scales[k]
        m_out[:, k, :] = (ms[k] + qmath.decode_codes(codes[k], sk, zk, bits, symmetric)
                          ).astype(m_out.dtype)

  row_spec = pl.BlockSpec((bm, p, bw), lambda i, j: (i, 0, j))
  args, in_specs = [x.reshape(r, p, w)], [row_spec]
  if delta:
    args.append(m.reshape(r, p, w)); in_specs.append(row_spec)
  if not group:
    s, z = reference.channel_params(x, m, bits, symmetric, sdt)
    for a in (s, z):
      if a is not None:
        args.append(a.reshape(1, p, w)); in_specs.append(_scale_spec(False, bm, p, bw))
  if stochastic:
    args.append(jnp.asarray(seed, jnp.uint32).reshape(1, 1))
    in_specs.append(pl.BlockSpec((1, 1), lambda i, j: (0, 0)))
  out_shape = [jax.ShapeDtypeStruct((r, nb, w), jnp.uint8)]
  out_specs = [pl.BlockSpec((bm, nb, bw), lambda i, j: (i, 0, j))]
  if group:
    for _ in range(1 if symmetric else 2):
      out_shape.append(jax.ShapeDtypeStruct((r, 1, 1), sdt))
      out_specs.append(_scale_spec(True, bm, p, bw))
  if delta:
    out_shape.append(jax.ShapeDtypeStruct((r, p, w), m.dtype)); out_specs.append(row_spec)
  outs = list(_call(body, (r // bm, w // bw), in_specs, out_specs, out_shape, interpret, args))

  payload = outs.pop(0).reshape(n, d * bits // 8)
  if group:
    s = outs.pop(0).reshape(n, d // group_size)
    z = None if symmetric else outs.pop(0).reshape(n, d // group_size)
  m_new = outs.pop(0).reshape(n, d) if delta else None
  return payload, s, z, m_new


def decode(payload, scale, zero, m, *, bits, group_size, out_dtype, symmetric, interpret):
  """Same contract as reference.decode."""
  n = payload.shape[0]
  d = payload.shape[1] * 8 // bits
  group = group_size is not None
  p, nb = layout.planes(bits)
  row_len = group_size if group else d
  r, w = n * d // row_len, row_len // p
  bm, bw = _geometry(r, w, p, group)
  delta = m is not None

  def body(*refs):
    refs = list(refs)
    pay_ref, s_ref = refs.pop(0), refs.pop(0)
    z_ref = None if symmetric else refs.pop(0)
    m_ref = refs.pop(0) if delta else None
    out_ref = refs.pop(0)
    for k, c in enumerate(_load_codes(pay_ref, bits)):
      kk = 0 if group else k
      zk = None if symmetric else z_ref[:, kk, :]
      v = qmath.decode_codes(c, s_ref[:, kk, :], zk, bits, symmetric)
      if delta:
        v = m_ref[:, k, :].astype(F32) + v
      out_ref[:, k, :] = v.astype(out_ref.dtype)

  sview = (r, 1, 1) if group else (1, p, w)
  row_spec = pl.BlockSpec((bm, p, bw), lambda i, j: (i, 0, j))
  args = [payload.reshape(r, nb, w), scale.reshape(sview)]
  in_specs = [pl.BlockSpec((bm, nb, bw), lambda i, j: (i, 0, j)), _scale_spec(group, bm, p, bw)]
  if not symmetric:
    args.append(zero.reshape(sview)); in_specs.append(_scale_spec(group, bm, p, bw))
  if delta:
    args.append(m.reshape(r, p, w)); in_specs.append(row_spec)
  dt = m.dtype if delta else out_dtype
  out = _call(body, (r // bm, w // bw), in_specs, row_spec,
              jax.ShapeDtypeStruct((r, p, w), dt), interpret, args)
  return out.reshape(n, d)


def pack(codes, bits, *, interpret):
  """Same contract as layout.pack, on a 2-D (R, L) array of uint8 codes."""
  r, l = codes.shape
  p, nb = layout.planes(bits)
  w = l // p
  bm, bw = _geometry(r, w, p, False)

  def body(c_ref, o_ref):
    _store_bytes(o_ref, _words([c_ref[:, k, :].astype(jnp.int32) for k in range(p)], bits), nb)

  out = _call(body, (r // bm, w // bw), [pl.BlockSpec((bm, p, bw), lambda i, j: (i, 0, j))],
              pl.BlockSpec((bm, nb, bw), lambda i, j: (i, 0, j)),
              jax.ShapeDtypeStruct((r, nb, w), jnp.uint8), interpret, [codes.reshape(r, p, w)])
  return out.reshape(r, nb * w)


def unpack(packed, bits, *, interpret):
  """Same contract as layout.unpack, on a 2-D (R, L*bits/8) uint8 array."""
  r, nbytes = packed.shape
  p, nb = layout.planes(bits)
  w = nbytes // nb
  bm, bw = _geometry(r, w, p, False)

  def body(i_ref, o_ref):
    for k, c in enumerate(_load_codes(i_ref, bits)):
      o_ref[:, k, :] = c.astype(jnp.uint8)

  out = _call(body, (r // bm, w // bw), [pl.BlockSpec((bm, nb, bw), lambda i, j: (i, 0, j))],
              pl.BlockSpec((bm, p, bw), lambda i, j: (i, 0, j)),
              jax.ShapeDtypeStruct((r, p, w), jnp.uint8), interpret, [packed.reshape(r, nb, w)])
  return out.reshape(r, p * w)
