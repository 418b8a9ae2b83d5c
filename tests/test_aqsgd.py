"""AQ-SGD codec with per-sample buffer stores (sender and receiver), and DP gradient compression."""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hetjax import data as data_lib
from hetjax.compression.aqsgd import AQSGD
from hetjax.compression.buffers import BufferStore
from hetjax.compression.codecs import Identity, make_codec
from hetjax.errors import HetjaxError

KEY = ('b0', 'fwd', 0)
SEQ, HID = 8, 64


@functools.lru_cache(maxsize=None)
def _coders(codec):
  return jax.jit(codec.encode), jax.jit(codec.decode, static_argnames='dtype')


def _send(codec, sender, receiver, ids, a, prefetch_next=None):
  """One exchange as the runtime does it: each end gathers, codes, and scatters its own rows."""
  encode, decode = _coders(codec)
  s = sender.gather(KEY, ids)
  wire, s_new = encode(a, s)
  sender.scatter(KEY, ids, s_new)
  r = receiver.gather(KEY, ids)
  x, r_new = decode(wire, r, dtype=jnp.float32)
  receiver.scatter(KEY, ids, r_new)
  if prefetch_next is not None:
    sender.prefetch(KEY, prefetch_next)
    receiver.prefetch(KEY, prefetch_next)
  return wire, x


def _activations(ids, step):
  """Per-sample activations that drift slowly with the step, as during fine-tuning."""
  rng = np.random.default_rng
  base = np.stack([rng(int(i)).normal(size=(SEQ, HID)) for i in ids]).astype(np.float32)
  noise = rng(10_000 + step).normal(size=base.shape).astype(np.float32)
  return jnp.asarray(base * (1 + 0.01 * step) + 0.05 * noise)


@pytest.mark.parametrize('placement,codec', [
    ('host', AQSGD(4)),
    ('disk', AQSGD(2, group_size=64, rounding='stochastic', buffer_dtype='bfloat16')),
    ('device', AQSGD(3, buffer_dtype='float32', symmetric=True))])
def test_sender_and_receiver_buffers_stay_bitwise_identical(tmp_path, placement, codec):
  it = data_lib.BatchIterator(np.arange(20 * SEQ + 1), 4, SEQ, seed=0)  # 20 samples, 5 steps/epoch
  mk = lambda side: BufferStore(20, placement, codec.buffer_dtype, folder=str(tmp_path / side),
                                say=lambda *a: None)
  sender, receiver = mk('send'), mk('recv')
  batches = [next(it) for _ in range(31)]
  piece = (4, SEQ, HID)
  warm_bytes, cold_bytes = codec.wire_bytes(piece), codec.wire_bytes(piece, warm=False)
  for step, b in enumerate(batches[:-1]):
    a = _activations(b['ids'], step)
    wire, x = _send(codec, sender, receiver, b['ids'], a, prefetch_next=batches[step + 1]['ids'])
    nbytes = sum(l.nbytes for l in jax.tree.leaves(wire))
    if step < 5:  # first epoch: full precision, exactly the activation
      assert nbytes == cold_bytes == 4 * a.size
      np.testing.assert_array_equal(np.asarray(x), np.asarray(a))
    else:  # after warm-up: exactly the codec's formula, and close to a
      assert nbytes == warm_bytes
      rel = float(jnp.linalg.norm(x - a) / jnp.linalg.norm(a))
      assert rel < {2: 0.5, 3: 0.2, 4: 0.1}[codec.bits], rel
    np.testing.assert_array_equal(np.asarray(sender.gather(KEY, b['ids'])),
                                  np.asarray(receiver.gather(KEY, b['ids'])))
  s, r = sender.state_dict()['b0.fwd.0'], receiver.state_dict()['b0.fwd.0']
  assert s['filled'].all() and r['filled'].all()
  assert s['leaves'][0].dtype == jnp.dtype(codec.buffer_dtype)
  np.testing.assert_array_equal(s['leaves'][0].view(np.uint8), r['leaves'][0].view(np.uint8))


def test_wire_bytes_formula():
  # 4-bit per channel, asymmetric: payload n*d/2 + (scale + zero) 2 bytes each per channel
  n, d = 4 * SEQ, HID
  assert AQSGD(4).wire_bytes((4, SEQ, HID)) == n * d // 2 + 2 * 2 * d
  assert AQSGD(2, group_size=32, symmetric=True).wire_bytes((4, SEQ, HID)) == n * d // 4 + 2 * n * d // 32
  assert AQSGD(8).wire_bytes((4, SEQ, HID), warm=False) == 4 * n * d


def test_identity_codec_through_the_same_path_is_exact(tmp_path):
  sender, receiver = (BufferStore(8, 'host', say=lambda *a: None) for _ in range(2))
  for step in range(3):
    a = _activations([1, 2], step)
    _, x = _send(Identity('float32'), sender, receiver, [1, 2], a)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(a))


def test_warm_up_flag_sends_full_precision_even_with_buffers():
  codec = AQSGD(4)
  sender, receiver = (BufferStore(4, 'host', say=lambda *a: None) for _ in range(2))
  _send(codec, sender, receiver, [0, 1], _activations([0, 1], 0))
  sender.warming_up = receiver.warming_up = True
  a = _activations([0, 1], 1)
  wire, x = _send(codec, sender, receiver, [0, 1], a)
  np.testing.assert_array_equal(np.asarray(x), np.asarray(a))
  sender.warming_up = receiver.warming_up = False
  wire, _ = _send(codec, sender, receiver, [0, 1], a)
  assert not isinstance(wire, jax.Array)  # a QTensor now


def test_make_codec_aqsgd():
  c = make_codec('aqsgd3', {'rounding': 'stochastic', 'group_size': 0, 'buffer_dtype': 'float32'})
  assert c == AQSGD(3, None, 'stochastic', False, 'float32') and c.stateful and c.name == 'aqsgd3'
  assert hash(c) == hash(AQSGD(3, None, 'stochastic', False, 'float32'))
  assert c.state_spec((4, SEQ, HID)) == jax.ShapeDtypeStruct((SEQ, HID), jnp.float32)
  for bad in ('aqsgd5', 'aqsgdx'):
    with pytest.raises(HetjaxError):
      make_codec(bad)
  with pytest.raises(HetjaxError, match='rounding'):
    make_codec('aqsgd4', {'rounding': 'up'})
  from hetjax.compression.aqsgd import check_batch
  check_batch(c, {'inputs': 0, 'ids': 0})
  check_batch(Identity(), {'inputs': 0})
  with pytest.raises(HetjaxError, match="needs batches with sample 'ids'"):
    check_batch(c, {'inputs': 0})


@pytest.mark.parametrize('placement', ['device', 'host', 'disk'])
@pytest.mark.parametrize('dtype', ['float16', 'bfloat16', 'float32'])
def test_store_round_trip_checkpoint_and_reset(tmp_path, placement, dtype):
  store = BufferStore(10, placement, dtype, folder=str(tmp_path / 'a'), say=lambda *a: None)
  assert store.gather(KEY, [1, 2]) is None
  rows = np.random.default_rng(0).normal(size=(3, 2, 5)).astype(np.float32)
  store.scatter(KEY, [7, 1, 7], rows)  # repeated id: the last row wins
  got = np.asarray(store.gather(KEY, [1, 7]))
  assert got.dtype == jnp.dtype(dtype)
  np.testing.assert_array_equal(got, rows[[1, 2]].astype(dtype))
  assert store.gather(KEY, [1, 3]) is None  # 3 has no buffer yet
  store.prefetch(KEY, [7, 1])
  np.testing.assert_array_equal(np.asarray(store.gather(KEY, [7, 1])), rows[[2, 1]].astype(dtype))
  store.prefetch(KEY, [1])  # a write after a prefetch must not be hidden by it
  store.scatter(KEY, [1], rows[:1] + 1)
  np.testing.assert_array_equal(np.asarray(store.gather(KEY, [1])), (rows[:1] + 1).astype(dtype))
  assert store.nbytes == 10 * 2 * 5 * jnp.dtype(dtype).itemsize
  saved = store.state_dict()
  other = BufferStore(10, placement, dtype, folder=str(tmp_path / 'b'), say=lambda *a: None)
  spec = jax.ShapeDtypeStruct((2, 5), jnp.float32)
  moved = ('b1', 'fwd', 0)
  fresh = other.load_state_dict(saved, {KEY: spec, moved: spec})
  assert fresh == ['b1.fwd.0']
  np.testing.assert_array_equal(np.asarray(other.gather(KEY, [1, 7])), np.asarray(store.gather(KEY, [1, 7])))
  assert other.gather(moved, [1]) is None
  other.reset(KEY)
  assert other.gather(KEY, [1]) is None and not other.filled(KEY).any()
  with pytest.raises(HetjaxError, match='sample ids'):
    other.gather(KEY, [10])


def test_store_refuses_what_does_not_fit(tmp_path):
  with pytest.raises(HetjaxError, match='placement'):
    BufferStore(10, 'gpu')
  with pytest.raises(HetjaxError, match='dtype'):
    BufferStore(10, 'host', 'int8')
  lines = []
  store = BufferStore(1000, 'host', 'float16', budget_bytes=2**20, say=lines.append)
  store.reserve(KEY, jax.ShapeDtypeStruct((8, 64), jnp.float32))  # 1000*8*64*2 = 1 MB - fits
  assert '0.001 GiB' in lines[0] and 'float16[8, 64]' in lines[0]
  with pytest.raises(HetjaxError, match=r'need 0\.001 GiB .*1000 samples x float16\[8, 64\].*budget'):
    store.reserve(('b1', 'fwd', 0), jax.ShapeDtypeStruct((8, 64), jnp.float32))
  with pytest.raises(HetjaxError, match='free host'):
    BufferStore(2**40, 'host', say=lambda *a: None).reserve(KEY, jax.ShapeDtypeStruct((1024,), jnp.float32))


# ---- DP gradient compression ---------------------------------------------------------------

from jax.sharding import Mesh, PartitionSpec as P  # noqa: E402

from hetjax.compression import grad as gradc  # noqa: E402


def _collective_bytes(hlo: str, workers: int = 8) -> dict:
  """Bytes per worker that all-gather / all-reduce ops put on the wire, from compiled HLO."""
  sizes = {'u8': 1, 'u16': 2, 's8': 1, 'bf16': 2, 'f16': 2, 'f32': 4, 'u32': 4, 's32': 4}
  out = {'all-gather': 0, 'all-reduce': 0}
  for line in hlo.splitlines():
    line = re.sub(r'/\*.*?\*/', '', line)  # tuple comments such as /*index=5*/
    for op in out:
      m = re.search(r'= \(?([^=]*?)\)? ' + op + r'(-start)?\(', line)
      if m:
        for dt, dims in re.findall(r'(\w+)\[([\d,]*)\]', m.group(1)):
          n = sizes[dt] * math.prod(int(d) for d in dims.split(',') if d)
          out[op] += n // workers if op == 'all-gather' else n  # the result holds every worker's part
  return out


@pytest.mark.parametrize('bits', [2, 4, 8])
def test_compressed_mean_over_8_devices(bits):
  mesh = Mesh(np.array(jax.devices()), ('dp',))
  rng = np.random.default_rng(bits)
  g = {'w': jnp.asarray(rng.normal(size=(8, 4096)), jnp.float32),
       'b': jnp.asarray(rng.normal(size=(8, 37)), jnp.float32)}
  err = jax.tree.map(jnp.zeros_like, g)

  def per_worker(fn):
    def body(g, e):
      out = fn(jax.tree.map(lambda a: a[0], g), jax.tree.map(lambda a: a[0], e))
      return jax.tree.map(lambda a: a[None], out)
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P('dp'), out_specs=P('dp')))

  compressed = per_worker(lambda g, e: gradc.compressed_mean(g, e, 'dp', bits, 256))
  plain = per_worker(lambda g, e: (jax.tree.map(lambda a: jax.lax.pmean(a, 'dp'), g), e))
  (mean, new_err), (exact, _) = compressed(g, err), plain(g, err)
  for name in g:
    np.testing.assert_array_equal(np.asarray(mean[name]), np.asarray(mean[name][:1]).repeat(8, 0))
  # bound: each worker's decoded value is within half its bucket's scale: range/(2^b-1) when
  # asymmetric (4, 8 bits), max|g|/(2^(b-1)-1) when symmetric (the 2-bit default)
  sym = gradc.scheme(bits, None)
  flat = np.concatenate([np.asarray(g['b']), np.asarray(g['w'])], axis=1)  # ravel order: sorted keys
  pad = np.pad(flat, ((0, 0), (0, -flat.shape[1] % 256))).reshape(8, -1, 256)
  scale = (np.abs(pad).max(-1) / (2**(bits - 1) - 1) if sym
           else (pad.max(-1) - pad.min(-1)) / (2**bits - 1))
  half = (scale / 2).mean(0)  # mean over workers, per bucket
  bound = np.repeat(half, 256)[:flat.shape[1]] * 1.02  # scales are rounded up to bf16
  diff = np.concatenate([np.asarray(mean['b'] - exact['b']), np.asarray(mean['w'] - exact['w'])], 1)
  assert np.all(np.abs(diff) <= bound), np.max(np.abs(diff) / bound)
  # the error memory is exactly what each worker's decoded gradient missed
  q, e_ref, local = gradc.compress_with_feedback(jax.tree.map(lambda a: a[3], g),
                                                 jax.tree.map(lambda a: a[3], err), bits, 256)
  np.testing.assert_array_equal(np.asarray(new_err['w'][3]), np.asarray(e_ref['w']))
  # bytes on the wire: the all-gather carries the payload; the fp32 path all-reduces 4 bytes/value
  n = 4096 + 37
  sent = _collective_bytes(compressed.lower(g, err).compile().as_text())
  fp32 = _collective_bytes(plain.lower(g, err).compile().as_text())
  assert sent == {'all-gather': gradc.payload_bytes(n, bits, 256), 'all-reduce': 0}
  assert q.nbytes == gradc.payload_bytes(n, bits, 256)
  assert fp32['all-reduce'] == 4 * n
  expected = 4 / (bits / 8 + (2 if sym else 4) / 256)  # codes + bf16 scale (+ zero) per 256 values
  assert expected * 0.93 < fp32['all-reduce'] / sent['all-gather'] <= expected


def test_error_feedback_is_carried_over():
  """A constant gradient through 2-bit compression: with the error memory the running sum of
  compressed updates stays within one step's error of the true sum; without it the bias grows."""
  g = {'w': jnp.asarray(np.random.default_rng(0).normal(size=(1000,)), jnp.float32)}
  tx = gradc.error_feedback(bits=2, bucket=64)
  state = tx.init(g)
  total, steps = jax.tree.map(jnp.zeros_like, g), 40
  update = jax.jit(tx.update)
  for _ in range(steps):
    out, state = update(g, state)
    total = jax.tree.map(jnp.add, total, out)
  drift = float(jnp.abs(total['w'] - steps * g['w']).max())
  one_step = float(jnp.abs(gradc.compress_with_feedback(g, jax.tree.map(jnp.zeros_like, g), 2, 64)[2]['w']
                           - g['w']).max())
  np.testing.assert_allclose(np.asarray(total['w'] - steps * g['w']), -np.asarray(state.error['w']),
                             atol=1e-4)
  assert drift <= 1.5 * one_step  # bounded: the memory only holds the last step's rounding
  assert steps * one_step > 10 * drift  # without feedback the same bias would add up every step
  with pytest.raises(HetjaxError, match='grad_bits'):
    gradc.error_feedback(bits=3)


def test_store_from_config(tmp_path):
  from configs import base
  from hetjax.compression import buffers
  acfg = base.aqsgd_fields()
  acfg.buffers, acfg.buffer_budget_gb = 'disk', 1e-6
  store = buffers.from_config(acfg, 100, str(tmp_path), say=lambda *a: None)
  assert store.placement == 'disk' and store.dtype == jnp.float16
  with pytest.raises(HetjaxError, match='budget'):
    store.reserve(KEY, jax.ShapeDtypeStruct((SEQ, HID), jnp.float32))
  acfg.buffers = 'ssd'
  with pytest.raises(HetjaxError, match="unknown buffer placement 'ssd'"):
    buffers.from_config(acfg, 100, str(tmp_path))
  assert buffers.warming_up(0.99, 1) and not buffers.warming_up(1.0, 1)
