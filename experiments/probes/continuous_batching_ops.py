"""Where continuous batching's time goes, against static rounds, in one process.

Serves the same requests (random 16-token prompts, 4-32 new tokens, all arriving at once) over a
2-stage plan of a 6-layer tiny GPT on 2 CPU devices, max_batch 2, with ContinuousServer (chunk 4)
and with Server (static rounds), after a warm-up pass of each. Every op of the runtime is timed
(waiting for its output, which serialises the ops) and grouped by mode, kind ('P' prefill, 'D'
decode, 'K' keep) and whether a decode op also prefills a refilled slot. Prints each mode's wall
time and op totals, and the step counts each mode needs.

  taskset -c 1 python experiments/probes/continuous_batching_ops.py [--requests=48] [--rounds=2]
"""

import argparse
import collections
import os
import sys
import time

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax
import numpy as np
from flax import nnx

from hetjax.inference.engine import ServeEngine
from hetjax.inference.serving import ContinuousServer, Request, Server
from hetjax.models.config import get_model_config
from hetjax.models.model import build_model
from hetjax.parallel import generation
from hetjax.plan import Plan, Replica, Stage


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--requests', type=int, default=48, help='requests per pass')
  parser.add_argument('--rounds', type=int, default=2, help='timed passes of each mode, after a warm-up')
  args = parser.parse_args()
  cfg = get_model_config('tiny_gpt', num_layers=6)
  plan = Plan([Replica([Stage(0, 3, [0]), Stage(3, 6, [1])], max_batch=2)], num_layers=6, kind='serve')
  engine = ServeEngine(plan, cfg, nnx.state(build_model(cfg, 0)))
  rng = np.random.default_rng(0)
  spec = [(rng.integers(0, 256, 16).astype(np.int32), int(rng.integers(4, 33)))
          for _ in range(args.requests)]
  new = [n for _, n in spec]
  print(f'{sum(new)} tokens; static rounds of 4 need {sum(max(new[i:i + 4]) for i in range(0, len(new), 4))} '
        f'decode steps, 4 slots at least {-(-sum(new) // 4)}')

  stats, mode = collections.defaultdict(list), ['']
  compute = generation.GenerationHandler.compute

  def timed(handler, op, received):
    batch = handler.batches[handler.stages[op.stage][0]][op.micro]
    refill = op.kind == 'D' and bool(batch.prefills(op.step + handler.first_step))
    t0 = time.perf_counter()
    out = jax.block_until_ready(compute(handler, op, received))
    stats[(mode[0], op.kind + (' + slot prefill' if refill else ''))].append(time.perf_counter() - t0)
    return out

  generation.GenerationHandler.compute = timed
  servers = {'continuous': lambda: ContinuousServer(engine, 'round_robin', 2, {}, chunk=4),
             'static': lambda: Server(engine, 'round_robin', 2, {})}
  for r in range(args.rounds + 1):
    stats.clear()
    for name, make in servers.items():
      mode[0] = name
      t0 = time.perf_counter()
      make().serve([Request(str(i), p, n) for i, (p, n) in enumerate(spec)], progress=lambda *a, **k: None)
      print(f'{"warm-up" if r == 0 else f"pass {r}"}: {name} {time.perf_counter() - t0:.2f} s', flush=True)
    if r:
      for (name, kind), times in sorted(stats.items()):
        print(f'  {name:10s} {kind:18s} {len(times):5d} ops, {1e3 * np.mean(times):6.2f} ms each, '
              f'{sum(times):5.2f} s')
      totals = {m: sum(sum(t) for (n, _), t in stats.items() if n == m) for m in servers}
      print(f'  op time static / continuous: {totals["static"] / totals["continuous"]:.2f}')


if __name__ == '__main__':
  main()
