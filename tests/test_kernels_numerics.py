"""kernels: error bound, unbiased stochastic rounding, AQ-SGD buffer agreement, robustness."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels as K
from kernels import qmath


def _per_value_scale(q):
  """The stored scale of the group/channel each (padded) value belongs to, as fp32 (N, Dp)."""
  n = int(np.prod(q.shape[:-1]))
  s = np.asarray(q.scale.astype(jnp.float32))
  if q.group_size is None:
    return np.broadcast_to(s[None], (n, s.shape[-1]))
  return np.repeat(s.reshape(n, -1), q.group_size, axis=1)


@pytest.mark.parametrize('bits', [2, 3, 4, 8])
@pytest.mark.parametrize('gs,sym,scale_dtype', [(16, True, jnp.bfloat16), (64, False, jnp.float16),
                                                (None, True, jnp.float16),
                                                (None, False, jnp.bfloat16),
                                                (32, 'midrise', jnp.bfloat16),
                                                (None, 'midrise', jnp.float16)])
def test_nearest_error_within_half_scale(bits, gs, sym, scale_dtype):
  x = 2 * jax.random.normal(jax.random.key(bits), (6, 100)) + 0.5 * (sym is True)
  q = K.quantize(x, bits, gs, symmetric=sym, scale_dtype=scale_dtype, impl='reference')
  err = np.abs(np.asarray(K.dequantize(q)) - np.asarray(x))
  half = _per_value_scale(q)[:, :100] / 2
  # fp32 rounding of x/s and of the zero-point add adds a few ulps on top of scale/2
  assert np.all(err <= half * (1 + 1e-5) + 1e-6 * np.abs(np.asarray(x)))
  assert np.all(np.isfinite(half)) and np.all(half > 0)


@pytest.mark.parametrize('bits,gs,sym', [(2, 32, True), (3, None, False), (4, 16, False),
                                         (2, 16, 'midrise'), (3, None, 'midrise')])
def test_stochastic_rounding_is_unbiased(bits, gs, sym):
  # Values 30% of the way between two levels of a known grid (step 1/8, zero -1 if asymmetric,
  # levels at half steps if midrise), with each group's/channel's extremes pinned so the grid is
  # exactly what quantize picks. Nearest rounding is then biased by -0.3 steps, which the same
  # statistic must detect.
  step = 0.125
  z0 = -1.0 if sym is False else 0.5 * step if sym == 'midrise' else 0.0
  qlo, qhi = qmath.code_range(bits, sym)
  k = np.random.default_rng(bits).integers(qlo, qhi, (8, 64))
  x = z0 + (k + 0.3) * step
  ext = np.zeros(x.shape, bool)
  if gs is None:
    ext[0], ext[1] = True, True
  else:
    ext[:, 0::gs], ext[:, 1::gs] = True, True
  x[ext] = np.where(np.cumsum(ext, axis=0 if gs is None else 1)[ext] % 2 == 1,
                    z0 + qhi * step, z0 + qlo * step)
  x = jnp.asarray(x, jnp.float32)
  def mean_err(rounding):
    qs = jax.vmap(lambda kk: K.dequantize(K.quantize(
        x, bits, gs, rounding, kk, symmetric=sym, impl='reference')))(
            jax.random.split(jax.random.key(7), 256))
    e = np.asarray((qs - x) / step)[:, ~ext]  # error in steps, each in (-1, 1)
    return e.mean(), e.std() / np.sqrt(e.size)
  q = K.quantize(x, bits, gs, symmetric=sym)
  np.testing.assert_array_equal(np.asarray(q.scale.astype(jnp.float32)), step)
  m, se = mean_err('stochastic')
  assert abs(m) < 4 * se + 1e-4, (m, se)
  m_near, se_near = mean_err('nearest')
  assert abs(m_near + 0.3) < 1e-5  # nearest is biased, and the statistic sees it
  assert abs(m_near) > 20 * se


@pytest.mark.parametrize('impl_send,impl_recv,bits,gs,rnd,mdt', [
    ('pallas', 'pallas', 2, 32, 'stochastic', jnp.float32),
    ('pallas', 'reference', 4, None, 'nearest', jnp.bfloat16),
    ('reference', 'pallas', 3, 16, 'stochastic', jnp.bfloat16),
    ('reference', 'reference', 8, 8, 'nearest', jnp.float32)])
def test_delta_buffers_identical_over_50_steps(impl_send, impl_recv, bits, gs, rnd, mdt):
  shape = (4, 64)
  m_send = m_recv = jnp.zeros(shape, mdt)
  a = jax.random.normal(jax.random.key(0), shape)
  key = jax.random.key(1)
  for step in range(50):
    key, ka, kq = jax.random.split(key, 3)
    a = a + 0.1 * jax.random.normal(ka, shape)  # activations drift slowly, as in training
    q, m_send = K.delta_encode(a.astype(mdt), m_send, bits, gs, rnd, kq, impl=impl_send)
    m_recv = K.delta_decode(q, m_recv, impl=impl_recv)
    assert m_send.dtype == mdt
    assert np.array_equal(np.asarray(m_send).view(np.uint8), np.asarray(m_recv).view(np.uint8))
  # and the buffer tracks a: the last delta is quantized to within one step (plus m's rounding)
  err = np.abs(np.asarray(m_recv.astype(jnp.float32) - a.astype(mdt).astype(jnp.float32)))
  assert np.all(err <= _per_value_scale(q) + 1e-2 * np.abs(np.asarray(a)))


@pytest.mark.parametrize('impl', ['reference', 'pallas'])
def test_all_zero_groups_and_non_finite_values(impl):
  x = np.random.default_rng(0).normal(size=(4, 64)).astype(np.float32)
  x[0, :16] = 0.0           # an all-zero group
  x[1, 3] = np.nan          # NaN poisons group (1, 0) only
  x[2, 20] = np.inf         # inf poisons group (2, 1) only
  x[3, 40] = -np.inf
  for sym in (True, False):
    q = K.quantize(jnp.asarray(x), 4, 16, symmetric=sym, impl=impl)
    s = np.asarray(q.scale.astype(jnp.float32))
    bad = np.zeros((4, 4), bool)
    bad[1, 0] = bad[2, 1] = bad[3, 2] = True
    assert np.all(np.isnan(s[bad])) and np.all(np.isfinite(s[~bad])) and np.all(s[~bad] > 0)
    if not sym:
      z = np.asarray(q.zero.astype(jnp.float32))
      assert np.all(np.isnan(z[bad])) and np.all(np.isfinite(z[~bad]))
    d = np.asarray(K.dequantize(q, impl=impl)).reshape(4, 4, 16)
    assert np.all(np.isnan(d[bad])) and np.all(np.isfinite(d[~bad]))
    np.testing.assert_array_equal(d[0, 0], 0.0)
    ok = ~np.repeat(bad, 16, axis=1)
    assert np.abs(d.reshape(4, 64) - x)[ok].max() < 0.5


def test_per_channel_nan_poisons_its_channel_only():
  x = np.ones((8, 16), np.float32)
  x[5, 3] = np.nan
  q = K.quantize(jnp.asarray(x), 8, None, impl='reference')
  d = np.asarray(K.dequantize(q))
  assert np.all(np.isnan(d[:, 3])) and np.allclose(np.delete(d, 3, axis=1), 1.0, atol=1e-2)


def test_float16_scales_saturate_instead_of_overflowing():
  x = jnp.array([[1e9] + [1.0] * 15], jnp.float32)
  q = K.quantize(x, 2, 16, scale_dtype=jnp.float16)
  assert float(q.scale[0, 0]) == 65504.0  # clipped, documented in kernels/README.md
  assert np.all(np.isfinite(np.asarray(K.dequantize(q))))


def test_scale_rounding_never_rounds_down():
  s = jnp.asarray(np.random.default_rng(1).lognormal(0, 20, 4096).astype(np.float32))
  for dt in qmath.SCALE_DTYPES:
    tiny, big = qmath.scale_limits(dt)
    r = qmath.round_up(s, dt).astype(jnp.float32)
    assert bool(jnp.all(r >= jnp.clip(s, tiny, big)))
    # and it is the nearest such value: one step down would be below s
    r16 = np.asarray(r).astype(dt)
    below = (r16.view(np.uint16) - 1).view(r16.dtype).astype(np.float32)
    assert bool(jnp.all((below < s) | (r <= tiny)))
    z = qmath.round_down(s - 1e3, dt).astype(jnp.float32)
    assert bool(jnp.all(z <= jnp.maximum(s - 1e3, -big)))


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_padding_non_divisible_last_axis(dtype):
  x = jax.random.normal(jax.random.key(2), (3, 50)).astype(dtype)
  q = K.quantize(x, 3, 32, impl='pallas')
  assert q.payload.shape == (3, 64 * 3 // 8) and q.scale.shape == (3, 2)
  d = K.dequantize(q, impl='pallas')
  assert d.shape == x.shape and d.dtype == jnp.dtype(dtype)
  assert float(jnp.max(jnp.abs(d.astype(jnp.float32) - x.astype(jnp.float32)))) < 0.6


def test_nearest_codes_do_not_depend_on_division_accuracy():
  # bf16 data on a bf16 grid makes exact ties (x/s = k + 1/2) common; a division that is off by a
  # few ulps (as GPU fast division is) must still give the same codes.
  x = jnp.asarray(np.random.default_rng(0).normal(size=(64, 64)), jnp.bfloat16).astype(jnp.float32)
  s = jnp.full((64, 1), 0.125, jnp.float32)
  sloppy_up = lambda a, b: (a / b) * jnp.float32(1 + 2.0**-22)
  sloppy_down = lambda a, b: (a / b) * jnp.float32(1 - 2.0**-22)
  exact = qmath.encode_codes(x, s, None, None, 8, True)
  ties = np.mean(np.asarray(x / s) % 1 == 0.5)
  assert ties > 0.02  # the data does exercise ties (about 150 of 4096 values)
  for div in (sloppy_up, sloppy_down):
    np.testing.assert_array_equal(qmath.encode_codes(x, s, None, None, 8, True, div), exact)
  # without the exact fix-up, a sloppy division would have changed tie codes
  naive = jnp.floor(sloppy_down(x, s) + 0.5)
  assert np.any(np.asarray(naive) != np.asarray(exact) - 127)


def test_scale_does_not_depend_on_division_accuracy():
  # amax = 7 * (a bf16 value): exact division lands on the grid, a sloppy one one ulp off it.
  amax = jnp.asarray(7 * np.random.default_rng(1).choice(np.arange(1, 256), 512) / 64.0, jnp.float32)
  exact = qmath.scale_for(amax, 7, jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(exact.astype(jnp.float32)) * 7, amax)
  for f in (1 + 2.0**-22, 1 - 2.0**-22):
    sloppy = qmath.scale_for(amax, 7, jnp.bfloat16, lambda a, b: (a / b) * jnp.float32(f))
    np.testing.assert_array_equal(sloppy, exact)
  naive = qmath.round_up(amax / 7 * jnp.float32(1 + 2.0**-22), jnp.bfloat16)
  assert np.any(np.asarray(naive) != np.asarray(exact))
