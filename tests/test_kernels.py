"""kernels: Pallas (interpret on CPU, Triton on GPU) vs jnp reference, packing, wire size, errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels as K
from hetjax.errors import HetjaxError
from kernels import layout


def _bits_equal(a, b):
  a, b = np.asarray(a), np.asarray(b)
  return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(
      a.view(np.uint8), b.view(np.uint8))


def _same_q(qa, qb):
  la, lb = jax.tree.leaves(qa), jax.tree.leaves(qb)
  return (jax.tree.structure(qa) == jax.tree.structure(qb)
          and all(_bits_equal(a, b) for a, b in zip(la, lb)))


# (bits, group_size, symmetric, rounding, dtype, shape): every width, both modes, both roundings,
# all three schemes (asymmetric, symmetric, midrise), fp32/bf16, divisible and padded last axes.
CASES = [
    (2, 32, True, 'nearest', jnp.float32, (4, 96)),
    (2, None, False, 'stochastic', jnp.bfloat16, (3, 5, 36)),
    (3, 16, False, 'nearest', jnp.bfloat16, (2, 3, 40)),
    (3, None, True, 'stochastic', jnp.float32, (6, 64)),
    (4, 64, True, 'stochastic', jnp.float32, (5, 100)),
    (4, None, True, 'nearest', jnp.float32, (8, 30)),
    (8, 8, False, 'stochastic', jnp.float32, (7, 24)),
    (8, None, False, 'nearest', jnp.bfloat16, (4, 16)),
    (2, 16, 'midrise', 'nearest', jnp.float32, (4, 80)),
    (3, None, 'midrise', 'stochastic', jnp.bfloat16, (3, 5, 24)),
    (4, 64, 'midrise', 'stochastic', jnp.float32, (5, 100)),
    (8, None, 'midrise', 'nearest', jnp.float32, (6, 40)),
]


@pytest.mark.parametrize('bits,gs,sym,rnd,dtype,shape', CASES)
def test_pallas_equals_reference_bitwise(bits, gs, sym, rnd, dtype, shape):
  ka, km, kq = jax.random.split(jax.random.key(bits * 7 + len(shape)), 3)
  a = (3 * jax.random.normal(ka, shape)).astype(dtype)
  m = jax.random.normal(km, shape).astype(dtype)
  kw = dict(bits=bits, group_size=gs, rounding=rnd, key=kq, symmetric=sym)
  qr, qp = K.quantize(a, impl='reference', **kw), K.quantize(a, impl='pallas', **kw)
  assert _same_q(qr, qp)
  assert qp.shape == shape and qp.dtype == jnp.dtype(dtype)
  dr, dp = K.dequantize(qr, impl='reference'), K.dequantize(qr, impl='pallas')
  assert dr.dtype == jnp.dtype(dtype) and _bits_equal(dr, dp)
  (er, mr), (ep, mp) = (K.delta_encode(a, m, impl=i, **kw) for i in ('reference', 'pallas'))
  assert _same_q(er, ep) and _bits_equal(mr, mp)
  assert _bits_equal(K.delta_decode(er, m, impl='pallas'), mr)
  assert _bits_equal(K.delta_decode(er, m, impl='reference'), mr)


def test_stochastic_is_reproducible_from_key():
  x = jax.random.normal(jax.random.key(0), (4, 64))
  q = lambda k: K.quantize(x, 2, 16, 'stochastic', jax.random.key(k), impl='reference')
  assert _same_q(q(1), q(1))
  assert not np.array_equal(q(1).payload, q(2).payload)


@pytest.mark.parametrize('bits', layout.BITS)
@pytest.mark.parametrize('impl', ['reference', 'pallas'])
def test_pack_unpack_roundtrip(bits, impl):
  p, nb = layout.planes(bits)
  for shape in [(p,), (3, 5 * p), (2, 3, 7 * p)]:
    codes = np.random.default_rng(bits).integers(0, 2**bits, shape).astype(np.uint8)
    packed = K.pack(jnp.asarray(codes), bits, impl=impl)
    assert packed.dtype == jnp.uint8 and packed.shape == shape[:-1] + (shape[-1] * bits // 8,)
    np.testing.assert_array_equal(K.unpack(packed, bits, impl=impl), codes)
    np.testing.assert_array_equal(packed, K.pack(jnp.asarray(codes), bits, impl='reference'))


def _numpy_pack(codes, bits):
  """The documented layout, written independently with Python ints."""
  p, nb = layout.planes(bits)
  w = len(codes) // p
  out = []
  for b in range(nb):
    for j in range(w):
      word = sum(int(codes[i * w + j]) << (bits * i) for i in range(p))
      out.append((word >> (8 * b)) & 0xFF)
  return np.array(out, np.uint8)


@pytest.mark.parametrize('bits', layout.BITS)
def test_pack_matches_documented_layout(bits):
  codes = np.random.default_rng(0).integers(0, 2**bits, 16 if bits != 3 else 24).astype(np.uint8)
  np.testing.assert_array_equal(K.pack(jnp.asarray(codes), bits), _numpy_pack(codes, bits))
  # 3-bit: codes 0..7 in the 8 chunks of one word -> 0b111110101100011010001000 = 0xFAC688
  if bits == 3:
    np.testing.assert_array_equal(K.pack(jnp.arange(8, dtype=jnp.uint8), 3), [0x88, 0xC6, 0xFA])


@pytest.mark.parametrize('bits', layout.BITS)
@pytest.mark.parametrize('gs,sym', [(32, True), (32, False), (None, True), (None, False),
                                    (32, 'midrise'), (None, 'midrise')])
def test_nbytes_formula(bits, gs, sym):
  x = jnp.ones((3, 5, 72), jnp.float32)
  q = K.quantize(x, bits, gs, symmetric=sym, impl='reference')
  p, _ = layout.planes(bits)
  dp = -(-72 // (gs or p)) * (gs or p)  # padded last axis
  n_scales = 15 * dp // gs if gs else dp
  expected = 15 * dp * bits // 8 + n_scales * 2 * (1 if sym else 2)
  assert q.nbytes == expected
  assert q.nbytes == sum(a.nbytes for a in jax.tree.leaves(q))


@pytest.mark.parametrize('impl', ['reference', 'pallas'])
def test_quantize_under_jit_and_shard_map(impl):
  from jax.sharding import Mesh, PartitionSpec as P
  n = len(jax.devices())  # 8 host devices on CPU (conftest), 1 on a GPU machine
  mesh = Mesh(np.array(jax.devices()), ('d',))
  x = jax.random.normal(jax.random.key(3), (16, 64))
  whole = K.quantize(x, 4, 32, impl='reference')
  # JAX's Pallas interpreter fails vma checks inside shard_map (it asks for check_vma=False);
  # the Triton path on GPU runs with the default check_vma=True.
  check_vma = impl == 'reference' or jax.default_backend() == 'gpu'
  def local(v):
    q = K.quantize(v, 4, 32, impl=impl)
    assert q.shape == (16 // n, 64)  # metadata is per shard
    return q.payload, q.scale, K.dequantize(q, impl=impl)

  f = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P('d'), out_specs=P('d'),
                            check_vma=check_vma))
  payload, scale, deq = f(x)
  assert _bits_equal(payload, whole.payload) and _bits_equal(scale, whole.scale)
  assert _bits_equal(deq, K.dequantize(whole, impl='reference'))


def test_bad_input_raises_hetjax_error():
  x = jnp.ones((4, 32))
  bad = [
      lambda: K.quantize(x, bits=5),
      lambda: K.quantize(x, group_size=48),
      lambda: K.quantize(x, group_size=4),
      lambda: K.quantize(x, rounding='stochastic'),
      lambda: K.quantize(x, rounding='up'),
      lambda: K.quantize(x.astype(jnp.int32)),
      lambda: K.quantize(jnp.ones(())),
      lambda: K.quantize(x, scale_dtype=jnp.float32),
      lambda: K.quantize(x, impl='cuda'),
      lambda: K.delta_encode(x, jnp.ones((4, 33))),
      lambda: K.delta_decode(K.quantize(x), jnp.ones((4,))),
      lambda: K.dequantize(x),
      lambda: K.pack(jnp.ones((5,), jnp.uint8), 3),
      lambda: K.unpack(jnp.ones((4,), jnp.uint8), 3),
  ]
  for f in bad:
    with pytest.raises(HetjaxError):
      f()
