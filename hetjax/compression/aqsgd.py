"""AQ-SGD forward codec: send the quantized *change* of each sample's activation.

Per training sample xi, sender and receiver both keep a buffer m(xi). The sender sends
Q(a(xi) - m(xi)) at `bits`; both ends then set m(xi) <- m(xi) + deQ(Q(a(xi) - m(xi))) (fused in
kernels.delta_encode / delta_decode, bitwise identical on both ends) and the receiver uses the new
m(xi) as the activation. A micro-batch with a sample that has no buffer yet (state=None: first visit,
or warm-up) goes in full precision and fills the buffers with it. Backward gradients are not delta
coded: the pipeline quantizes them directly (codecs.Quantize).

State is one micro-batch of buffers, shape piece_shape in `buffer_dtype`; the exchange gathers and
scatters the rows by sample id from a compression.buffers.BufferStore.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from hetjax.errors import HetjaxError
from kernels import api as qapi

BUFFER_DTYPES = ('float16', 'bfloat16', 'float32')
ROUNDINGS = ('nearest', 'stochastic')


def _seed_key(x):
  """A PRNG key that changes with the data (the codec interface carries no key): a hash of the
  first values' bits. Only the sender draws rounding offsets; the receiver just reads codes."""
  bits = jax.lax.bitcast_convert_type(x.reshape(-1)[:4096].astype(jnp.float32), jnp.uint32)
  mix = bits * (jnp.arange(bits.shape[0], dtype=jnp.uint32) * jnp.uint32(2654435761) + 1)
  return jax.random.fold_in(jax.random.key(0x5EED), jnp.bitwise_xor.reduce(mix))


@dataclasses.dataclass(frozen=True)
class AQSGD:
  """Delta codec at `bits` (2, 3, 4, 8). group_size None: one scale per hidden channel over the
  micro-batch (as in the paper's code); else one per run of group_size values. `symmetric` picks
  the kernels' scheme (False: scale + zero point per group; see kernels/README.md)."""
  bits: int = 4
  group_size: int | None = None
  rounding: str = 'nearest'
  symmetric: bool = False
  buffer_dtype: str = 'float16'
  stateful: ClassVar[bool] = True

  def __post_init__(self):
    if self.bits not in (2, 3, 4, 8):
      raise HetjaxError(f'AQ-SGD forward bits must be 2, 3, 4 or 8, got {self.bits}')
    if self.rounding not in ROUNDINGS:
      raise HetjaxError(f'aqsgd.rounding must be one of {ROUNDINGS}, got {self.rounding!r}')
    if self.buffer_dtype not in BUFFER_DTYPES:
      raise HetjaxError(f'aqsgd.buffer_dtype must be one of {BUFFER_DTYPES}, got {self.buffer_dtype!r}')
    gs = self.group_size
    if gs is not None and (not isinstance(gs, int) or gs < 8 or gs & (gs - 1)):
      raise HetjaxError(f'aqsgd.group_size must be 0 (per channel) or a power of two >= 8, got {gs}')

  @property
  def name(self) -> str:
    return f'aqsgd{self.bits}'

  def state_spec(self, piece_shape, dtype=jnp.float32):
    """One sample's buffer: the activation without its batch axis."""
    return jax.ShapeDtypeStruct(tuple(piece_shape[1:]), jnp.dtype(self.buffer_dtype))

  def encode(self, x, state=None):
    if state is None:  # first visit / warm-up: full precision, and it becomes the buffer
      return x, x.astype(self.buffer_dtype)
    key = _seed_key(x) if self.rounding == 'stochastic' else None
    q, m_new = qapi.delta_encode(x, state.astype(self.buffer_dtype), self.bits, self.group_size,
                                 self.rounding, key, symmetric=self.symmetric)
    return q, m_new

  def decode(self, wire, state=None, dtype=jnp.float32):
    if state is None:
      return wire.astype(dtype), wire.astype(self.buffer_dtype)
    m_new = qapi.delta_decode(wire, state.astype(self.buffer_dtype))
    return m_new.astype(dtype), m_new

  def wire_bytes(self, piece_shape, dtype=jnp.float32, warm=True) -> int:
    """Exact bytes on the wire for one micro-batch (warm: delta coded; else full precision)."""
    x = jax.ShapeDtypeStruct(tuple(piece_shape), jnp.dtype(dtype))
    m = jax.ShapeDtypeStruct(tuple(piece_shape), jnp.dtype(self.buffer_dtype)) if warm else None
    wire = jax.eval_shape(lambda a, s: self.encode(a, s)[0], x, m)
    return sum(l.size * l.dtype.itemsize for l in jax.tree.leaves(wire))


def check_batch(codec, batch: dict) -> None:
  """A stateful codec keys its buffers by sample id: refuse a batch that carries none."""
  if getattr(codec, 'stateful', False) and 'ids' not in batch:
    raise HetjaxError(f'codec {codec.name} keeps per-sample buffers and needs batches with sample '
                      f"'ids' (hetjax.data.BatchIterator provides them)")
