"""Part e of bench_serve under two versions of the inference cost model: the same run's measured
decode steps, calibration and probes (parsed from its printed log), predicted by the cost model at
git revision REV and by the working tree's. Shows what a cost-model change does, measurement held fixed.

  python experiments/bench_serve.py --parts=e --repeats=3 --clock=cpu | tee e.log
  python experiments/costmodel_before_after.py e.log a39abfe
"""

import importlib.util
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np

from hetjax import cluster as hc
from hetjax.costmodel import inference as now
from hetjax.models.config import get_model_config


def old_module(rev):
  src = subprocess.run(['git', 'show', f'{rev}:hetjax/costmodel/inference.py'], cwd=ROOT,
                       capture_output=True, text=True)
  if src.returncode:
    sys.exit(f'error: {src.stderr.strip()}')
  path = os.path.join(tempfile.mkdtemp(), 'icm_old.py')
  open(path, 'w').write(src.stdout)
  spec = importlib.util.spec_from_file_location('icm_old', path)
  mod = importlib.util.module_from_spec(spec)
  sys.modules['icm_old'] = mod
  spec.loader.exec_module(mod)
  return mod


def main(log_path, rev, layers=6, hidden=512, vocab=8192, prompt=32, tokens=16):
  try:
    log = open(log_path).read()
  except OSError as e:
    print(f'error: cannot read {log_path}: {e.strerror}', file=sys.stderr)
    sys.exit(2)
  found = [re.search(r'calibrated on .*?: ([\d.]+) GB/s, ([\d.]+) GFLOP/s', log),
           re.search(r'links ([\d.]+) ms \(all-reduce probe\) \+ ([\d.]+) Gbit/s', log),
           re.search(r'runtime probe: ([\d.]+) ms of host time per stage op, ([\d.]+) ms', log)]
  meas = re.findall(r'e\. (.+?) batch (\d+): measured ([\d.]+) ms per step', log)
  if not all(found) or not meas:
    print(f'error: {log_path} is not the log of a finished bench_serve part e', file=sys.stderr)
    sys.exit(2)
  (bw, rate), (alpha, beta), (over, dev) = [tuple(map(float, f.groups())) for f in found]
  cfg = get_model_config('tiny_gpt', num_layers=layers, hidden=hidden, num_heads=hidden // 64,
                         num_kv_heads=hidden // 64, ffn=4 * hidden, vocab_size=vocab, max_len=256)
  n = 8
  devs = [hc.Device(i, 'CPU', 'localhost', 'local', tflops=rate / 1e3, memory_gb=8.0, mem_bw_gbs=bw)
          for i in range(n)]
  machine = hc.Cluster('local', devs, np.full((n, n), alpha), np.full((n, n), beta))
  print(f'| plan | batch | measured ms | predicted at {rev} | ratio | predicted now | ratio |')
  print('| --- | --- | --- | --- | --- | --- | --- |')
  for name, batch, m in meas:
    m, row = float(m), []
    for mod in (old_module(rev), now):
      stages, d = [], 0
      for part in name.split(' + '):          # part e's plans take devices in order
        k, t = map(int, re.match(r'(\d+)L@tp(\d+)', part).groups())
        stages.append(mod.StageLayout(k, list(range(d, d + t))))
        d += t
      setup = mod.ServeSetup(bytes_per_value=4, compute_efficiency=1.0, memory_efficiency=1.0,
                             prompt_len=prompt, gen_len=tokens, batch=int(batch),
                             op_overhead_s=over / 1e3, device_overhead_s=dev / 1e3)
      p = mod.replica_cost(machine, cfg, stages, setup, groups=1)['step'] * 1e3
      row += [p, m / p]
    print(f'| {name} | {batch} | {m:.2f} | {row[0]:.2f} | {row[1]:.2f} | {row[2]:.2f} | {row[3]:.2f} |')


if __name__ == '__main__':
  if len(sys.argv) != 3:
    print('error: usage: costmodel_before_after.py BENCH_SERVE_E_LOG GIT_REV', file=sys.stderr)
    sys.exit(2)
  main(*sys.argv[1:])
