"""Elementwise quantization math shared by the jnp reference and the Pallas kernel bodies.

Everything here is plain jnp on arrays of any shape, so the same ops run in XLA and inside a
Pallas kernel (Triton or interpret). Rules that make results reproducible everywhere:

- Scales are rounded *up* and zero points *down* to the stored dtype (with integer ops on the fp32
  bits, so XLA's excess-precision rewrites cannot skip the rounding), and codes are computed from
  the stored values, so |x - deQ(Q(x))| <= scale/2 holds with the scale that travels.
- Scales are kept >= 2^-100 (bf16) or 2^-14 (fp16, its smallest normal): no division by zero for
  all-zero groups, and no subnormals (which CPUs may flush and GPUs do not).
- Dequantization is exact: a code (<= 255) times a bf16/fp16 scale fits in fp32's 24-bit mantissa,
  so `m + code*scale` rounds once whether or not a compiler fuses it into an FMA. This is what makes
  the AQ-SGD buffers of sender and receiver bitwise equal.
- A group (or channel) holding NaN or +-inf gets a NaN scale (and zero point) and all-zero codes,
  so it dequantizes to NaN: loud, never a silently wrong finite scale.
"""
import jax
import jax.numpy as jnp
import numpy as np

F32 = jnp.float32
FLT_MAX = float(np.finfo(np.float32).max)

# scale dtype -> (mantissa bits, smallest scale, largest finite). bf16's floor is 2^-100, not its
# smallest normal 2^-126, so that (code +- 1/2) * scale stays a normal fp32 number (no FTZ issues).
_SCALE_INFO = {
    jnp.dtype(jnp.bfloat16): (7, 2.0**-100, float(jnp.finfo(jnp.bfloat16).max)),
    jnp.dtype(jnp.float16): (10, 2.0**-14, 65504.0),
}
SCALE_DTYPES = tuple(_SCALE_INFO)


def scale_limits(dtype):
  """(smallest, largest) scale value used for `dtype`."""
  return _SCALE_INFO[jnp.dtype(dtype)][1:]


MIDRISE = 'midrise'


def code_range(bits, symmetric):
  """(lowest, highest) signed code value; stored codes are value - lowest, in [0, 2**bits).

  symmetric: False (code c means z + c*s), True (c*s, c in [-q, q]: one code unused), or
  'midrise' (all 2**bits codes, c in [-2^(b-1), 2^(b-1)-1] means (c + 1/2)*s: no zero level)."""
  if symmetric == MIDRISE:
    return -2 ** (bits - 1), 2 ** (bits - 1) - 1
  if symmetric:
    q = 2 ** (bits - 1) - 1
    return -q, q
  return 0, 2**bits - 1


def true_div(a, b):
  return a / b


def isfinite(x):
  return jnp.abs(x) <= FLT_MAX  # False for NaN and +-inf; portable to Triton


def _to_grid(v, dtype, away):
  """fp32 v to a value of `dtype` (normal range), rounding toward zero or, where `away`, away
  from zero, with integer ops on the fp32 bits. XLA's excess-precision rewrites (which may drop an
  f32->bf16->f32 round trip on GPU) cannot change integer ops, so every backend agrees.
  """
  drop = 23 - _SCALE_INFO[jnp.dtype(dtype)][0]  # fp32 mantissa bits the target lacks
  bits = jax.lax.bitcast_convert_type(v, jnp.uint32)
  low = bits & np.uint32(2**drop - 1)
  t = bits - low + jnp.where(away & (low != 0), np.uint32(2**drop), np.uint32(0))
  return jax.lax.bitcast_convert_type(t, F32).astype(dtype)  # exact: t is on the grid


def round_up(s, dtype):
  """Smallest value of `dtype` >= s (fp32, >= 0), clamped to the normal finite range."""
  _, tiny, big = _SCALE_INFO[jnp.dtype(dtype)]
  return _to_grid(jnp.clip(s, tiny, big), dtype, True)


def round_down(z, dtype):
  """Largest value of `dtype` <= z (fp32); |z| below the smallest normal snaps to 0 or -tiny."""
  _, tiny, big = _SCALE_INFO[jnp.dtype(dtype)]
  z = jnp.where(jnp.abs(z) < tiny, jnp.where(z < 0, -tiny, 0.0), z)
  z = jnp.clip(z, -big, big)
  return _to_grid(z, dtype, z < 0)


def _step(v, dtype, n):
  """fp32 v (positive, on the dtype grid) moved n grid steps."""
  drop = 23 - _SCALE_INFO[jnp.dtype(dtype)][0]
  bits = jax.lax.bitcast_convert_type(v, jnp.int32) + n * 2**drop
  return jax.lax.bitcast_convert_type(bits, F32)


def scale_for(num, q, dtype, div=true_div):
  """Smallest normal `dtype` value s with s*q >= num (num >= 0 fp32, q an integer <= 255).

  The quotient only proposes s; exact checks (s*q has <= 19 significant bits) settle it, so it
  does not matter whether a backend divides exactly or multiplies by a rounded 1/q.
  """
  _, tiny, big = _SCALE_INFO[jnp.dtype(dtype)]
  s = round_up(div(num, F32(q)), dtype).astype(F32)
  down = _step(s, dtype, -1)
  s = jnp.where((down >= tiny) & (down * q >= num), down, s)
  s = jnp.where((s * q < num) & (s < big), _step(s, dtype, 1), s)
  return s.astype(dtype)


def group_params(amax, lo, hi, bad, bits, symmetric, dtype, div=true_div):
  """Stored (scale, zero) for groups with finite abs-max / min / max and a bad (non-finite) flag.

  Returns arrays of `dtype`; zero is None when symmetric. Bad groups get NaN.
  """
  qlo, qhi = code_range(bits, symmetric)
  nan = jnp.array(jnp.nan, dtype)
  if symmetric == MIDRISE:  # levels +-(k + 1/2)*s up to (2^b - 1)/2 * s >= amax
    s = scale_for(amax * F32(2), qhi - qlo, dtype, div)
    return jnp.where(bad, nan, s), None
  if symmetric:
    s = scale_for(amax, qhi, dtype, div)
    return jnp.where(bad, nan, s), None
  z = round_down(lo, dtype)
  s = scale_for(hi - z.astype(F32), qhi - qlo, dtype, div)
  return jnp.where(bad, nan, s), jnp.where(bad, nan, z)


def fmix32(h):
  """murmur3 finalizer on uint32 (wrapping integer ops only)."""
  h = h ^ (h >> 16)
  h = h * np.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * np.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def uniform(idx, seed):
  """Uniform [0, 1) fp32 (24-bit resolution) from uint32 element index and uint32 seed."""
  h = fmix32(idx * np.uint32(0x9E3779B1) + seed)
  h = fmix32(h ^ seed)
  return (h >> 8).astype(jnp.int32).astype(F32) * F32(2.0**-24)


def encode_codes(x, s, z, offset, bits, symmetric, div=true_div):
  """Stored codes (int32 in [0, 2**bits)) for fp32 x, stored scale/zero (any float dtype).

  offset None: round to nearest (half up). The quotient x/s only proposes a code; exact
  comparisons against (c +- 1/2)*s (a product with <= 21 significant bits, so exact in fp32) fix
  it, so ties round the same on every backend whatever its division accuracy.
  offset array: stochastic rounding, floor(x/s + u) with u uniform in [0, 1).
  """
  qlo, qhi = code_range(bits, symmetric)
  s = s.astype(F32)
  bad = s != s
  s = jnp.where(bad, F32(1), s)
  x = jnp.where(isfinite(x), x, F32(0))
  if not symmetric:
    x = x - jnp.where(bad, F32(0), z.astype(F32))
  v = div(x, s)
  if symmetric == MIDRISE:  # level (q + 1/2)*s is nearest iff q*s <= x < (q+1)*s (exact products)
    if offset is None:
      q = jnp.floor(v)
      q = jnp.where(x >= (q + 1) * s, q + 1, q)
      q = jnp.where(x < q * s, q - 1, q)
    else:
      q = jnp.floor(v - F32(0.5) + offset)
  elif offset is None:
    q = jnp.floor(v + F32(0.5))
    q = jnp.where(x >= (q + F32(0.5)) * s, q + 1, q)
    q = jnp.where(x < (q - F32(0.5)) * s, q - 1, q)
  else:
    q = jnp.floor(v + offset)
  q = jnp.clip(q, F32(qlo), F32(qhi))
  return jnp.where(bad, 0, q.astype(jnp.int32) - qlo)


def decode_codes(c, s, z, bits, symmetric):
  """fp32 values for stored int32 codes; exact product, at most one rounding (the + zero)."""
  qlo, _ = code_range(bits, symmetric)
  if symmetric == MIDRISE:  # (2c + 1) is odd and <= 255 in magnitude: the product stays exact
    return (2 * (c + qlo) + 1).astype(F32) * s.astype(F32) * F32(0.5)
  v = (c + qlo).astype(F32) * s.astype(F32)
  return v if symmetric else v + z.astype(F32)
