"""Pallas kernels for quantized activation exchange (see kernels/README.md)."""
from kernels.api import (delta_decode, delta_encode, dequantize, pack, quantize, resolve_impl,
                         unpack)
from kernels.layout import QTensor

__all__ = ['QTensor', 'quantize', 'dequantize', 'delta_encode', 'delta_decode', 'pack', 'unpack',
           'resolve_impl']
