"""Wire format: the QTensor pytree, argument checks, and the bit-packing layout (jnp reference).

Packing layout (same for every bit width). A *row* of L codes (one group in group mode, one token
row in per-channel mode) is split into P contiguous chunks of W = L/P codes, P = 8 // bits
(P = 8 for 3-bit). Codes at the same position j of every chunk share one word

    word[j] = sum_p code[p*W + j] << (bits * p)          (8 bits, or 24 bits for 3-bit)

and the row's bytes are NB = bits*P/8 byte-planes of W bytes each: byte[b*W + j] = word[j] >> 8b.
So 2/4/8-bit use one byte per word (NB = 1); 3-bit packs 8 codes into 3 bytes (NB = 3), stored
plane-major: low bytes of all words, then middle bytes, then high bytes. Chunks (not neighbours)
share a byte so a kernel only needs contiguous loads, shifts and masks; no sub-byte dtypes.
"""
import dataclasses
import math

import jax
import jax.numpy as jnp

from kernels.errors import InputError as HetjaxError
from kernels import qmath

BITS = (2, 3, 4, 8)
ROUNDINGS = ('nearest', 'stochastic')
IN_DTYPES = tuple(jnp.dtype(d) for d in (jnp.float32, jnp.bfloat16, jnp.float16))


def planes(bits):
  """(P, NB): codes chunks per row and byte-planes per row for `bits`."""
  p = 8 if bits == 3 else 8 // bits
  return p, bits * p // 8


@dataclasses.dataclass(frozen=True)
class QTensor:
  """A quantized tensor; `nbytes` (payload + scale + zero) is exactly what goes on the wire.

  payload: uint8, shape lead + (Dp*bits/8,), lead = x.shape[:-1], Dp = padded last dim.
  scale:   lead + (Dp/group_size,) in group mode; (Dp,) in per-channel mode (group_size=None).
  zero:    like scale (asymmetric) or None (symmetric).
  shape/dtype/bits/group_size/midrise are static metadata, known to both ends from the plan.
  """
  payload: jax.Array
  scale: jax.Array
  zero: jax.Array | None
  shape: tuple[int, ...]
  dtype: jnp.dtype
  bits: int
  group_size: int | None
  midrise: bool = False

  @property
  def symmetric(self):
    """False (zero point), True or 'midrise' (see qmath.code_range)."""
    if self.midrise:
      return qmath.MIDRISE
    return self.zero is None

  @property
  def padded_dim(self):
    return self.payload.shape[-1] * 8 // self.bits

  @property
  def nbytes(self):
    leaves = [self.payload, self.scale] + ([] if self.zero is None else [self.zero])
    return sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in leaves)


jax.tree_util.register_dataclass(
    QTensor, data_fields=['payload', 'scale', 'zero'],
    meta_fields=['shape', 'dtype', 'bits', 'group_size', 'midrise'])


def check_args(x, bits, group_size, rounding, key, scale_dtype, symmetric=True):
  if symmetric not in (True, False, qmath.MIDRISE):
    raise HetjaxError(f"symmetric must be True, False or 'midrise', got {symmetric!r}")
  if bits not in BITS:
    raise HetjaxError(f'bits must be one of {BITS}, got {bits!r}')
  if rounding not in ROUNDINGS:
    raise HetjaxError(f'rounding must be one of {ROUNDINGS}, got {rounding!r}')
  if rounding == 'stochastic' and key is None:
    raise HetjaxError("rounding='stochastic' needs a PRNG key")
  if jnp.dtype(scale_dtype) not in qmath.SCALE_DTYPES:
    raise HetjaxError(f'scale_dtype must be bfloat16 or float16, got {scale_dtype}')
  if x.ndim == 0 or x.size == 0:
    raise HetjaxError(f'cannot quantize an array of shape {x.shape}')
  if jnp.dtype(x.dtype) not in IN_DTYPES:
    raise HetjaxError(f'quantize takes float32/bfloat16/float16, got {x.dtype}')
  if group_size is not None:
    if not isinstance(group_size, int) or group_size < 8 or group_size & (group_size - 1):
      raise HetjaxError(f'group_size must be a power of two >= 8 (or None), got {group_size!r}')


def padded_dim(dim, bits, group_size):
  """Last-axis length after padding: a multiple of group_size, or of P in per-channel mode."""
  unit = group_size if group_size is not None else planes(bits)[0]
  return -(-dim // unit) * unit


def pack(codes, bits):
  """uint8 codes (..., L), values < 2**bits, L % P == 0 -> packed uint8 (..., L*bits/8)."""
  p, nb = planes(bits)
  if codes.shape[-1] % p:
    raise HetjaxError(f'{bits}-bit packing needs the last axis to be a multiple of {p}, '
                      f'got {codes.shape[-1]}')
  lead, w = codes.shape[:-1], codes.shape[-1] // p
  c = codes.reshape(lead + (p, w)).astype(jnp.int32)
  word = sum(c[..., i, :] << (bits * i) for i in range(p))
  out = jnp.stack([(word >> (8 * b)) & 0xFF for b in range(nb)], axis=-2)
  return out.reshape(lead + (nb * w,)).astype(jnp.uint8)


def unpack(packed, bits):
  """Inverse of pack: uint8 (..., L*bits/8) -> uint8 codes (..., L)."""
  p, nb = planes(bits)
  if packed.shape[-1] % nb:
    raise HetjaxError(f'{bits}-bit payload length must be a multiple of {nb}, '
                      f'got {packed.shape[-1]}')
  lead, w = packed.shape[:-1], packed.shape[-1] // nb
  b = packed.reshape(lead + (nb, w)).astype(jnp.int32)
  word = sum(b[..., i, :] << (8 * i) for i in range(nb))
  mask = 2**bits - 1
  out = jnp.stack([(word >> (bits * i)) & mask for i in range(p)], axis=-2)
  return out.reshape(lead + (p * w,)).astype(jnp.uint8)
