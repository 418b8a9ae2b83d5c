"""Benchmark the quantization kernels against a plain copy on the same device.

For each op, bit width and size: bytes read + written, time, GB/s, fraction of the measured copy
bandwidth, and bytes on the wire vs fp32 and bf16. Prints a table last; writes results.csv to --out.

  python3 experiments/bench_kernels.py --out /tmp/bench            # CPU: jnp reference vs copy
  python3 experiments/bench_kernels.py --sizes 64,256 --check --tune --out $OUT   # GPU
--check first asserts Pallas == reference bit for bit on this device; --tune sweeps the Pallas
block size and warp count for the fused delta encode.
"""
import argparse
import csv
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

import kernels as K
from kernels import pallas_kernels

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


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--sizes', default='4,64', help='input sizes in MB of fp32')
  ap.add_argument('--bits', default='2,3,4,8')
  ap.add_argument('--group-size', type=int, default=128)
  ap.add_argument('--impls', default=None, help="default: 'reference' on CPU, 'pallas,reference' on GPU")
  ap.add_argument('--iters', type=int, default=5)
  ap.add_argument('--check', action='store_true')
  ap.add_argument('--tune', action='store_true')
  ap.add_argument('--out', default='experiments/out/bench_kernels')
  args = ap.parse_args()
  on_gpu = jax.default_backend() == 'gpu'
  impls = (args.impls or ('pallas,reference' if on_gpu else 'reference')).split(',')
  device = jax.devices()[0].device_kind
  print(f'device: {device} ({jax.default_backend()}), jax {jax.__version__}')
  if args.check and not all(check(dt) for dt in (jnp.float32, jnp.bfloat16)):
    sys.exit('Pallas and reference disagree on this device')
  if args.tune and on_gpu:
    tune(max(int(s) for s in args.sizes.split(',')), 4, args.group_size, args.iters)

  rows = []
  for size_mb in (int(s) for s in args.sizes.split(',')):
    n = size_mb * 2**20 // 4
    x = jax.random.normal(jax.random.key(0), (n // HIDDEN, HIDDEN))
    t_copy = timeit(jax.jit(lambda v: -v), x, iters=args.iters)
    copy_bw = 2 * x.nbytes / t_copy
    rows.append(dict(op='copy', impl='xla', bits=32, size_mb=size_mb, bytes_rw=2 * x.nbytes,
                     ms=t_copy * 1e3, gbps=copy_bw / 1e9, frac_copy=1.0, wire=x.nbytes,
                     vs_fp32=1.0, vs_bf16=2.0))
    for bits in (int(b) for b in args.bits.split(',')):
      for impl in impls:
        q = K.quantize(x, bits, args.group_size, impl='reference')
        data = dict(x=x, m=0.5 * x, key=jax.random.key(1), q=q)
        for name, (fn, names) in ops(bits, args.group_size, impl).items():
          inputs = [data[k] for k in names]
          out = fn(*inputs)
          rw = sum(nbytes(data[k]) for k in names if k != 'key') + nbytes(out)
          t = timeit(fn, *inputs, iters=args.iters)
          rows.append(dict(op=name, impl=impl, bits=bits, size_mb=size_mb, bytes_rw=rw,
                           ms=t * 1e3, gbps=rw / t / 1e9, frac_copy=rw / t / copy_bw,
                           wire=q.nbytes, vs_fp32=x.nbytes / q.nbytes,
                           vs_bf16=x.nbytes / 2 / q.nbytes))
        del data, q

  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, 'results.csv'), 'w', newline='') as f:
    w = csv.DictWriter(f, fieldnames=['device'] + list(rows[0]))
    w.writeheader()
    for r in rows:
      w.writerow(dict(device=device, **r))
  print(f'\n{device}, group_size={args.group_size}, tensors ({HIDDEN} wide) fp32; wire = payload '
        f'+ bf16 scales; x_fp32/x_bf16 = wire reduction vs sending fp32/bf16')
  hdr = f'{"op":<13}{"impl":<10}{"bits":>4}{"MB":>6}{"R+W MB":>9}{"ms":>9}{"GB/s":>9}' \
        f'{"of copy":>9}{"wire MB":>9}{"x_fp32":>7}{"x_bf16":>7}'
  print(hdr)
  for r in rows:
    print(f'{r["op"]:<13}{r["impl"]:<10}{r["bits"]:>4}{r["size_mb"]:>6}'
          f'{r["bytes_rw"] / 2**20:>9.1f}{r["ms"]:>9.3f}{r["gbps"]:>9.1f}{r["frac_copy"]:>8.0%} '
          f'{r["wire"] / 2**20:>9.2f}{r["vs_fp32"]:>7.1f}{r["vs_bf16"]:>7.1f}')


if __name__ == '__main__':
  main()
