"""Quantization kernels against a plain copy on the same device: GB/s, share of copy bandwidth, wire bytes.

Reproduces: AQ-SGD's premise that 2-4 bit activation (delta) compression costs little next to sending
(no paper table; hetjax's own kernel measurement).

For each op, bit width and size: bytes read + written, time, GB/s, fraction of the measured copy
bandwidth, and bytes on the wire vs fp32 and bf16. Writes results.csv and kernels.png (GB/s per op
and width) to --out and prints the table last.

  python experiments/bench_kernels.py --sizes=4 --iters=2                 # CPU: jnp reference vs copy
  python experiments/bench_kernels.py --sizes=64,256 --check --tune       # GPU: Pallas vs reference
--check first asserts Pallas == reference bit for bit on this device; --tune sweeps the Pallas
block size and warp count for the fused delta encode.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import print_table, save_figure, wrote, write_csv  # noqa: E402  (sets sys.path)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

import kernels as K  # noqa: E402
from kernels import pallas_kernels  # noqa: E402

flags.DEFINE_string('out', 'runs/bench_kernels/', 'Output folder (results.csv, kernels.png).')
flags.DEFINE_list('sizes', ['4', '64'], 'Input sizes in MB of fp32.')
flags.DEFINE_list('bits', ['2', '3', '4', '8'], 'Bit widths.')
flags.DEFINE_integer('group_size', 128, 'Values per quantization group.')
flags.DEFINE_list('impls', [], "Implementations; default: 'reference' on CPU, 'pallas,reference' on GPU.")
flags.DEFINE_integer('iters', 5, 'Minimum timed calls per round (best of 3 rounds).')
flags.DEFINE_bool('check', False, 'First assert Pallas == reference bit for bit on this device.')
flags.DEFINE_bool('tune', False, 'Sweep the Pallas block size and warp count (GPU only).')
FLAGS = flags.FLAGS

HIDDEN = 4096  # tensors are (numel / HIDDEN, HIDDEN), like (tokens, hidden) activations


def timeit(fn, *args, iters):
  """Seconds per call: calls are queued back to back (dispatch overlaps the device work) and
  blocked on once per round; best of 3 rounds of >= `iters` calls and >= ~30 ms."""
  jax.block_until_ready(fn(*args))  # compile + warm up
  t = time.perf_counter()
  jax.block_until_ready(fn(*args))
  n = max(iters, min(2000, int(0.03 / max(time.perf_counter() - t, 1e-6)) + 1))
  best = float('inf')
  for _ in range(3):
    t = time.perf_counter()
    for _ in range(n):
      out = fn(*args)
    jax.block_until_ready(out)
    best = min(best, (time.perf_counter() - t) / n)
  return best


def nbytes(tree):
  return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(tree))


def ops(bits, gs, impl):
  """name -> (fn, arg names); every fn is jitted and returns what it writes."""
  q = lambda x: K.quantize(x, bits, gs, impl=impl)
  return {
      'quantize': (jax.jit(q), ('x',)),
      'quantize_sr': (jax.jit(lambda x, k: K.quantize(x, bits, gs, 'stochastic', k, impl=impl)),
                      ('x', 'key')),
      'dequantize': (jax.jit(lambda qt: K.dequantize(qt, impl=impl)), ('q',)),
      'delta_encode': (jax.jit(lambda a, m: K.delta_encode(a, m, bits, gs, impl=impl)),
                       ('x', 'm')),
      'delta_decode': (jax.jit(lambda qt, m: K.delta_decode(qt, m, impl=impl)), ('q', 'm')),
  }


def check(dtype):
  """Pallas == reference, bit for bit, for every width/mode on this device."""
  x = jax.random.normal(jax.random.key(0), (256, 1000)).astype(dtype)
  m = jax.random.normal(jax.random.key(1), x.shape).astype(dtype)
  same = lambda a, b: all(np.array_equal(np.asarray(u).view(np.uint8), np.asarray(v).view(np.uint8))
                          for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  bad = []
  for bits in (2, 3, 4, 8):
    for gs in (32, 128, None):
      for sym in (True, False):
        for rnd in ('nearest', 'stochastic'):
          kw = dict(bits=bits, group_size=gs, rounding=rnd, key=jax.random.key(2), symmetric=sym)
          r = K.delta_encode(x, m, impl='reference', **kw)
          p = K.delta_encode(x, m, impl='pallas', **kw)
          ok = same(r, p) and same(K.quantize(x, impl='pallas', **kw),
                                    K.quantize(x, impl='reference', **kw))
          ok &= same(K.dequantize(r[0], impl='pallas'), K.dequantize(r[0], impl='reference'))
          ok &= same(K.delta_decode(r[0], m, impl='pallas'), r[1])
          if not ok:
            bad.append((bits, gs, sym, rnd))
  print(f'check {jnp.dtype(dtype).name}: {"all bitwise equal" if not bad else "MISMATCH " + str(bad)}')
  return not bad


def tune(size_mb, bits, gs, iters):
  """Sweep block size / warps of the Pallas delta encode; keeps the best setting."""
  n = size_mb * 2**20 // 4
  a = jax.random.normal(jax.random.key(0), (n // HIDDEN, HIDDEN))
  m = jnp.zeros_like(a)
  best = None
  for be in (2048, 4096, 8192, 16384, 32768):
    for nw in (2, 4, 8):
      pallas_kernels.BLOCK_ELEMS, pallas_kernels.NUM_WARPS = be, nw
      f = jax.jit(lambda a, m: pallas_kernels.encode(a, m, None, bits=bits, group_size=gs,
                                                     symmetric=True, scale_dtype=jnp.bfloat16,
                                                     interpret=False))
      t = timeit(f, a, m, iters=iters)
      print(f'tune block_elems={be} num_warps={nw}: {t * 1e3:.3f} ms')
      best = min(best or (t, be, nw), (t, be, nw))
  pallas_kernels.BLOCK_ELEMS, pallas_kernels.NUM_WARPS = best[1], best[2]
  print(f'tune best: block_elems={best[1]} num_warps={best[2]}')


def plot(rows, path):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  kernels_rows = [r for r in rows if r['op'] != 'copy']
  names = sorted({(r['op'], r['impl']) for r in kernels_rows})
  widths = sorted({r['bits'] for r in kernels_rows})
  size = max(r['size_mb'] for r in rows)
  fig, ax = plt.subplots(figsize=(8, 3.6))
  step = 0.8 / max(len(widths), 1)
  for j, bits in enumerate(widths):
    gbps = [next((r['gbps'] for r in kernels_rows if (r['op'], r['impl']) == n and r['bits'] == bits
                  and r['size_mb'] == size), 0) for n in names]
    ax.bar(np.arange(len(names)) + j * step, gbps, step, label=f'{bits}-bit')
  copy = next(r['gbps'] for r in rows if r['op'] == 'copy' and r['size_mb'] == size)
  ax.axhline(copy, color='k', ls='--', lw=1, label='copy')
  ax.set_xticks(np.arange(len(names)) + 0.4 - step / 2, [f'{o}\n{i}' for o, i in names], fontsize=8)
  ax.set_ylabel('GB/s (read + written)')
  ax.set_title(f'{rows[0]["device"]}: kernels on {size} MB of fp32', fontsize=10)
  ax.legend(fontsize=8, ncol=len(widths) + 1)
  save_figure(fig, path)


def main(argv):
  del argv
  sizes, widths, gs = [int(s) for s in FLAGS.sizes], [int(b) for b in FLAGS.bits], FLAGS.group_size
  on_gpu = jax.default_backend() == 'gpu'
  impls = FLAGS.impls or (['pallas', 'reference'] if on_gpu else ['reference'])
  device = jax.devices()[0].device_kind
  print(f'device: {device} ({jax.default_backend()}), jax {jax.__version__}')
  if FLAGS.check and not all(check(dt) for dt in (jnp.float32, jnp.bfloat16)):
    sys.exit('Pallas and reference disagree on this device')
  if FLAGS.tune and on_gpu:
    tune(max(sizes), 4, gs, FLAGS.iters)

  rows = []
  for size_mb in sizes:
    n = size_mb * 2**20 // 4
    x = jax.random.normal(jax.random.key(0), (n // HIDDEN, HIDDEN))
    t_copy = timeit(jax.jit(lambda v: -v), x, iters=FLAGS.iters)
    copy_bw = 2 * x.nbytes / t_copy
    rows.append(dict(device=device, op='copy', impl='xla', bits=32, size_mb=size_mb,
                     rw_mb=2 * x.nbytes / 2**20, ms=t_copy * 1e3, gbps=copy_bw / 1e9, of_copy=1.0,
                     wire_mb=x.nbytes / 2**20, x_fp32=1.0, x_bf16=2.0))
    for bits in widths:
      for impl in impls:
        print(f'{size_mb} MB, {bits}-bit, {impl} ...', flush=True)
        q = K.quantize(x, bits, gs, impl='reference')
        data = dict(x=x, m=0.5 * x, key=jax.random.key(1), q=q)
        for name, (fn, names) in ops(bits, gs, impl).items():
          inputs = [data[k] for k in names]
          out = fn(*inputs)
          rw = sum(nbytes(data[k]) for k in names if k != 'key') + nbytes(out)
          t = timeit(fn, *inputs, iters=FLAGS.iters)
          rows.append(dict(device=device, op=name, impl=impl, bits=bits, size_mb=size_mb,
                           rw_mb=rw / 2**20, ms=t * 1e3, gbps=rw / t / 1e9, of_copy=rw / t / copy_bw,
                           wire_mb=q.nbytes / 2**20, x_fp32=x.nbytes / q.nbytes,
                           x_bf16=x.nbytes / 2 / q.nbytes))
        del data, q

  write_csv(os.path.join(FLAGS.out, 'results.csv'), rows)
  plot(rows, os.path.join(FLAGS.out, 'kernels.png'))
  wrote(FLAGS.out, 'results.csv', 'kernels.png')
  print(f'\n{device}, group_size={gs}, tensors ({HIDDEN} wide) fp32; wire = payload + bf16 scales; '
        f'x_fp32/x_bf16 = wire reduction vs sending fp32/bf16; of_copy = share of copy bandwidth')
  print_table([{k: v for k, v in r.items() if k != 'device'} for r in rows])


if __name__ == '__main__':
  app.run(main)
