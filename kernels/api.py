"""Public ops: quantize, dequantize, AQ-SGD delta encode/decode, pack/unpack.

Each op pads/reshapes its input to (N, Dp) and hands it to one implementation:
'reference' (pure jnp, kernels/reference.py) or 'pallas' (kernels/pallas_kernels.py; Triton on GPU,
interpret=True elsewhere). impl=None picks 'pallas' on GPU and 'reference' on other backends.
"""
import functools
import math

import jax
import jax.numpy as jnp

from kernels.errors import InputError as HetjaxError
from kernels import layout, pallas_kernels, reference
from kernels.layout import QTensor

IMPLS = ('reference', 'pallas')


def resolve_impl(impl):
  if impl is None:
    return 'pallas' if jax.default_backend() == 'gpu' else 'reference'
  if impl not in IMPLS:
    raise HetjaxError(f'impl must be one of {IMPLS} or None, got {impl!r}')
  return impl


def _interpret():
  return jax.default_backend() != 'gpu'


def _to_2d(x, dp, group_size):
  """(..., D) -> (N, Dp): edge padding in group mode (keeps each group's min/max), else zeros."""
  d = x.shape[-1]
  x = x.reshape(-1, d)
  if dp == d:
    return x
  return jnp.pad(x, ((0, 0), (0, dp - d)), mode='edge' if group_size is not None else 'constant')


def _seed(key):
  return None if key is None else jax.random.bits(key, (), jnp.uint32)


@functools.partial(jax.jit, static_argnames=('bits', 'group_size', 'symmetric', 'scale_dtype',
                                             'impl'))
def _encode(x, m, seed, *, bits, group_size, symmetric, scale_dtype, impl):
  dp = layout.padded_dim(x.shape[-1], bits, group_size)
  x2 = _to_2d(x, dp, group_size)
  m2 = None if m is None else _to_2d(m, dp, group_size)
  kw = dict(bits=bits, group_size=group_size, symmetric=symmetric, scale_dtype=scale_dtype)
  if impl == 'pallas':
    payload, s, z, m_new = pallas_kernels.encode(x2, m2, seed, interpret=_interpret(), **kw)
  else:
    payload, s, z, m_new = reference.encode(x2, m2, seed, **kw)
  lead = x.shape[:-1]
  if group_size is not None:
    s = s.reshape(lead + s.shape[-1:])
    z = None if z is None else z.reshape(s.shape)
  q = QTensor(payload.reshape(lead + payload.shape[-1:]), s, z, x.shape, jnp.dtype(x.dtype),
              bits, group_size, symmetric == 'midrise')
  if m_new is not None:
    m_new = m_new[:, :x.shape[-1]].reshape(x.shape)
  return q, m_new


@functools.partial(jax.jit, static_argnames=('impl',))
def _decode(q, m, *, impl):
  n = math.prod(q.shape[:-1])
  payload = q.payload.reshape(n, -1)
  s, z = q.scale, q.zero
  if q.group_size is not None:
    s = s.reshape(n, -1)
    z = None if z is None else z.reshape(n, -1)
  m2 = None if m is None else _to_2d(m, q.padded_dim, q.group_size)
  kw = dict(bits=q.bits, group_size=q.group_size, out_dtype=q.dtype, symmetric=q.symmetric)
  if impl == 'pallas':
    out = pallas_kernels.decode(payload, s, z, m2, interpret=_interpret(), **kw)
  else:
    out = reference.decode(payload, s, z, m2, **kw)
  return out[:, :q.shape[-1]].reshape(q.shape)


def quantize(x, bits=4, group_size=128, rounding='nearest', key=None, *, symmetric=True,
             scale_dtype=jnp.bfloat16, impl=None):
  """Quantize x (..., D) to `bits` per value; returns a QTensor (see kernels/layout.py).

  group_size: a power of two >= 8: one scale (and zero point if not symmetric) per run of
    group_size values along the last axis; D is padded to a multiple by repeating the last value.
    None: per-channel mode, one scale per last-axis channel over all leading axes (one
    micro-batch), as in AQ-SGD.
  symmetric: True: levels c*scale, c in [-(2^(b-1)-1), 2^(b-1)-1] (one code unused); False: a
    zero point per group/channel and all 2^b levels; 'midrise': levels (c + 1/2)*scale, all 2^b
    codes, no zero level and no zero point (see kernels/README.md for the error of each).
  rounding: 'nearest' or 'stochastic' (unbiased; reproducible from `key`).
  """
  layout.check_args(x, bits, group_size, rounding, key, scale_dtype, symmetric)
  seed = _seed(key) if rounding == 'stochastic' else None
  q, _ = _encode(x, None, seed, bits=bits, group_size=group_size, symmetric=symmetric,
                 scale_dtype=jnp.dtype(scale_dtype), impl=resolve_impl(impl))
  return q


def dequantize(q, *, impl=None):
  """The inverse of quantize: an array of q.shape and q.dtype."""
  if not isinstance(q, QTensor):
    raise HetjaxError(f'dequantize takes a QTensor, got {type(q).__name__}')
  return _decode(q, None, impl=resolve_impl(impl))


def _check_buffer(m, shape):
  if tuple(m.shape) != tuple(shape):
    raise HetjaxError(f'AQ-SGD buffer has shape {tuple(m.shape)}, expected {tuple(shape)}')
  if jnp.dtype(m.dtype) not in layout.IN_DTYPES:
    raise HetjaxError(f'AQ-SGD buffer must be float32/bfloat16/float16, got {m.dtype}')


def delta_encode(a, m, bits=4, group_size=128, rounding='nearest', key=None, *, symmetric=True,
                 scale_dtype=jnp.bfloat16, impl=None):
  """Fused AQ-SGD sender step: (Q(a - m), m' = m + deQ(Q(a - m))) in one pass over a and m.

  m' has m's dtype and is bitwise equal to delta_decode(Q(a - m), m) on the receiver.
  """
  layout.check_args(a, bits, group_size, rounding, key, scale_dtype, symmetric)
  _check_buffer(m, a.shape)
  seed = _seed(key) if rounding == 'stochastic' else None
  return _encode(a, m, seed, bits=bits, group_size=group_size, symmetric=symmetric,
                 scale_dtype=jnp.dtype(scale_dtype), impl=resolve_impl(impl))


def delta_decode(q, m, *, impl=None):
  """Fused AQ-SGD receiver step: m' = m + deQ(q), in m's dtype."""
  if not isinstance(q, QTensor):
    raise HetjaxError(f'delta_decode takes a QTensor, got {type(q).__name__}')
  _check_buffer(m, q.shape)
  return _decode(q, m, impl=resolve_impl(impl))


def _packing(x, bits, impl, op, unit, reference_fn, pallas_fn):
  """Shared checks and dispatch of pack/unpack; `unit` is the last-axis multiple Pallas needs."""
  if bits not in layout.BITS:
    raise HetjaxError(f'bits must be one of {layout.BITS}, got {bits!r}')
  if jnp.dtype(x.dtype) != jnp.uint8 or x.ndim == 0:
    raise HetjaxError(f'{op} takes a uint8 array with at least 1 axis, got {x.dtype}')
  if resolve_impl(impl) == 'reference' or x.shape[-1] % unit:
    return reference_fn(x, bits)  # the layout raises its own error on a bad length
  out = pallas_fn(x.reshape(-1, x.shape[-1]), bits, interpret=_interpret())
  return out.reshape(x.shape[:-1] + out.shape[-1:])


def pack(codes, bits, *, impl=None):
  """Pack uint8 codes (..., L) (values < 2**bits, L a multiple of 8//bits, or 8 for 3-bit)."""
  unit = layout.planes(bits)[0] if bits in layout.BITS else 1
  return _packing(codes, bits, impl, 'pack', unit, layout.pack, pallas_kernels.pack)


def unpack(packed, bits, *, impl=None):
  """Inverse of pack."""
  unit = layout.planes(bits)[1] if bits in layout.BITS else 1
  return _packing(packed, bits, impl, 'unpack', unit, layout.unpack, pallas_kernels.unpack)
