"""Where a TP-t program on JAX's virtual CPU devices spends its time (launch, all-reduce, LM head).

All pinned to one core and timed in CPU seconds (no model, no validation plan): per TP degree t = 1, 2, 4,
  launch     an empty program on the t devices;
  all-reduce a chain of 24 (matmul 256x256, psum) minus the same chain without the psums, per psum;
  head       a replicated LM head (hidden 512 x vocab 8192, argmax) at batch 1 and 8: a TP group
             that does not split it runs it once per device.
  python experiments/probes/probe_tp_cpu.py [--core=0]
"""

import os
import sys

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')

import resource


def cpu_s() -> float:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def best(fn, repeats=20, inner=10) -> float:
  fn()
  out = float('inf')
  for _ in range(repeats):
    t0 = cpu_s()
    for _ in range(inner):
      fn()
    out = min(out, (cpu_s() - t0) / inner)
  return out


def main(core: int):
  os.sched_setaffinity(0, {core})      # before JAX starts its threads, so all of them inherit it
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  K = 24
  table = np.random.default_rng(0).normal(size=(8192, 512)).astype(np.float32)
  print('| t | launch us | all-reduce us | head b1 ms | head b8 ms |')
  print('| --- | --- | --- | --- | --- |')
  for t in (1, 2, 4):
    mesh = Mesh(np.array(jax.devices()[:t]), ('tp',))
    rep = NamedSharding(mesh, P())
    smap = lambda f: jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P(), P()), out_specs=P(), check_vma=False))

    def chain(reduce):
      def body(x, w):
        for _ in range(K):
          x = jnp.tanh(x @ w)
          x = jax.lax.psum(x, 'tp') if reduce else x
        return x
      return smap(body)
    x = jax.device_put(jnp.ones((1, 256), jnp.float32), rep)
    w = jax.device_put(jnp.ones((256, 256), jnp.float32) / 256, rep)
    with_ar, without = chain(True), chain(False)
    ar = (best(lambda: with_ar(x, w).block_until_ready())
          - best(lambda: without(x, w).block_until_ready())) / K
    empty = smap(lambda a, b: a + 1)
    launch = best(lambda: empty(x, w).block_until_ready())
    head = jax.jit(lambda h, e: jnp.argmax(h @ e.T, -1), out_shardings=rep)
    e = jax.device_put(table, rep)
    heads = []
    for b in (1, 8):
      h = jax.device_put(np.ones((b, 512), np.float32), rep)
      heads.append(best(lambda: head(h, e).block_until_ready(), 10))
    print(f'| {t} | {launch * 1e6:.0f} | {ar * 1e6:.1f} | {heads[0] * 1e3:.2f} | {heads[1] * 1e3:.2f} |',
          flush=True)


if __name__ == '__main__':
  core = 0
  for arg in sys.argv[1:]:
    if not arg.startswith('--core=') or not arg[7:].isdigit():
      print(f'error: unknown argument {arg!r} (usage: probe_tp_cpu.py [--core=N])', file=sys.stderr)
      sys.exit(2)
    core = int(arg[7:])
  if core not in os.sched_getaffinity(0):
    print(f'error: core {core} is not one this process may run on', file=sys.stderr)
    sys.exit(2)
  main(core)
