"""A codec turns a tensor into what goes on the wire and back; `nbytes` is its exact wire size.

encode(x, state) -> (wire, state'); decode(wire, state) -> (x, state'). `state` is per-sample codec
memory (AQ-SGD's activation buffers live there); stateless codecs take and return None.
Both functions are pure and jittable, and `wire` is a pytree of arrays.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from hetjax.errors import HetjaxError
from kernels import api as qapi


def tree_nbytes(tree) -> int:
  return sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree))


@dataclasses.dataclass(frozen=True)
class Identity:
  """Sends the tensor as is (fp32) or cast (bf16)."""
  dtype: str = 'float32'

  @property
  def name(self) -> str:
    return 'fp32' if self.dtype == 'float32' else 'bf16'

  @property
  def bits(self) -> int:
    return jnp.dtype(self.dtype).itemsize * 8

  def encode(self, x, state=None):
    return x.astype(self.dtype), state

  def decode(self, wire, state=None, dtype=jnp.float32):
    return wire.astype(dtype), state


@dataclasses.dataclass(frozen=True)
class Quantize:
  """Direct quantization (kernels.quantize, round to nearest). Default: one scale and zero point
  per hidden channel over the micro-batch, the lowest error per byte in kernels/README.md
  ("Choosing a scheme"); group_size=64 gives one per run of 64 values."""
  bits: int = 8
  group_size: int | None = None
  symmetric: bool | str = False

  @property
  def name(self) -> str:
    return f'int{self.bits}'

  def encode(self, x, state=None):
    return qapi.quantize(x, self.bits, self.group_size, symmetric=self.symmetric), state

  def decode(self, wire, state=None, dtype=jnp.float32):
    return qapi.dequantize(wire).astype(dtype), state


def make_codec(spec, aqsgd=None):
  """'fp32', 'bf16', an int bit width (2, 3, 4, 8; 16 means bf16, 32 means fp32), or 'aqsgd<bits>'
  (the AQ-SGD delta codec; `aqsgd` is the config's aqsgd block: rounding, group_size, buffer_dtype)."""
  if isinstance(spec, str) and spec.startswith('aqsgd'):
    from hetjax.compression.aqsgd import AQSGD
    try:
      bits = int(spec[5:])
    except ValueError:
      raise HetjaxError(f"unknown codec {spec!r}; AQ-SGD is 'aqsgd2', 'aqsgd3', 'aqsgd4' or 'aqsgd8'") from None
    opts = {} if aqsgd is None else dict(
        rounding=aqsgd.get('rounding', 'nearest'), group_size=aqsgd.get('group_size', 0) or None,
        buffer_dtype=aqsgd.get('buffer_dtype', 'float16'))
    return AQSGD(bits, **opts)
  if spec in ('fp32', 32, '32', None, ''):
    return Identity('float32')
  if spec in ('bf16', 16, '16'):
    return Identity('bfloat16')
  try:
    bits = int(spec)
  except (TypeError, ValueError):
    bits = None
  if bits in (2, 3, 4, 8):
    return Quantize(bits)
  raise HetjaxError(f"unknown codec {spec!r}; use 'fp32', 'bf16', a bit width 2, 3, 4, 8 or aqsgd<bits>")
