"""How a CPU quota (the testbed's emulated slow device) stretches one op, by the op's length.

The testbed (hetjax/testbed.py) emulates a device of speed q by a CFS quota of q cores per 10 ms
period. The cost model assumes every op takes (its CPU time) / q. CFS grants the quota per period:
a process that was idle runs at a full core until it has spent q x 10 ms of the period, and an op
that arrives once that is spent waits for the next period. This probe measures, in a cgroup with
quota q pinned to one core, the wall time of ops of known CPU time c (a numpy loop), two ways:
  back-to-back   the ops run one after another (what calibration times);
  after gaps     each op starts after an idle gap of random length in [0, 20 ms) (what a pipeline
                 stage sees between messages).
It prints wall / c against 1 / q: the quota's stretch, as the cost model assumes it (1 / q) and
as it is. Needs root and cgroups (as the testbed).

  python experiments/probes/cfs_quota_ops.py [--quota=0.25] [--core=1]
"""

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

CHILD = r'''
import json, random, sys, time
import numpy as np
ms_list, reps = json.loads(sys.argv[1]), int(sys.argv[2])
a = np.random.default_rng(0).random((64, 64))
def work(n):
  x = a
  for _ in range(n):
    x = np.tanh(x @ a * 0.01)
def cpu_ms(n):  # CPU time of n iterations, measured here (the quota does not slow CPU time)
  t = time.process_time(); work(n); return (time.process_time() - t) * 1e3
unit = min(cpu_ms(200) for _ in range(5)) / 200
random.seed(0)
out = {}
for ms in ms_list:
  n = max(1, round(ms / unit))
  cpu = min(cpu_ms(n) for _ in range(3))
  t = time.perf_counter()
  for _ in range(reps):
    work(n)
  back = (time.perf_counter() - t) / reps * 1e3
  walls = []
  for _ in range(reps):
    time.sleep(random.uniform(0, 0.020))
    t = time.perf_counter(); work(n); walls.append((time.perf_counter() - t) * 1e3)
  out[ms] = {'cpu_ms': cpu, 'back_to_back_ms': back, 'after_gaps_ms': walls}
print(json.dumps(out))
'''


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--quota', type=float, default=0.25, help='cores of the quota (0.1-1)')
  p.add_argument('--core', type=int, default=1, help='core to pin the process to')
  p.add_argument('--ops_ms', default='0.5,2,5,10,40', help='CPU milliseconds per op, comma-separated')
  p.add_argument('--reps', type=int, default=60, help='ops per length and way')
  args = p.parse_args()
  from hetjax import testbed
  from hetjax.errors import HetjaxError
  ms_list = [float(x) for x in args.ops_ms.split(',')]
  try:
    with testbed.ComputeQuotas([testbed.Share(args.quota, args.core)]) as quotas:
      r = subprocess.run(quotas.wrap(0, [sys.executable, '-c', CHILD, json.dumps(ms_list), str(args.reps)]),
                         capture_output=True, text=True, check=True)
  except HetjaxError as e:
    raise SystemExit(f'error: {e}')
  import numpy as np
  res = json.loads(r.stdout)
  print(f'quota {args.quota} core(s) per {testbed.PERIOD_US / 1e3:.0f} ms period, core {args.core}; '
        f'the cost model\'s stretch 1/q = {1 / args.quota:.2f}')
  print(f'{"op CPU ms":>9} {"back-to-back":>12} {"after gaps: p10":>15} {"median":>7} {"p90":>6} {"mean":>6}'
        '   (wall / CPU time)')
  for ms, v in res.items():
    c = v['cpu_ms']
    gaps = np.array(v['after_gaps_ms']) / c
    print(f'{c:>9.2f} {v["back_to_back_ms"] / c:>12.2f} {np.percentile(gaps, 10):>15.2f} '
          f'{np.median(gaps):>7.2f} {np.percentile(gaps, 90):>6.2f} {gaps.mean():>6.2f}')


if __name__ == '__main__':
  main()
