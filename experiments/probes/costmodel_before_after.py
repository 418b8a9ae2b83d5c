"""Part e of bench_serve's measured decode steps predicted by two versions of the inference cost model.

The same run's measured decode steps and probes (parsed from its printed log), each version calibrated on the calibration
plan as part e does it, then predicting the other plans; the cost model at git revision REV against
the working tree's. Shows what a cost-model change does, measurement held fixed.

  python experiments/bench_serve.py --parts=e --repeats=3 --clock=cpu | tee e.log
  python experiments/probes/costmodel_before_after.py e.log a39abfe
"""

import importlib.util
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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
  found = [re.search(r'links ([\d.]+) ms \(all-reduce probe\) \+ ([\d.]+) Gbit/s', log),
           re.search(r'runtime probe: ([\d.]+) ms of host time per stage op, ([\d.]+) ms', log)]
  meas = re.findall(r'e\. (.+?) batch (\d+): measured ([\d.]+) ms per step', log)
  if not all(found) or not meas:
    print(f'error: {log_path} is not the log of a finished bench_serve part e', file=sys.stderr)
    sys.exit(2)
  (alpha, beta), (over, dev) = [tuple(map(float, f.groups())) for f in found]
  over, dev = over / 1e3, dev / 1e3
  head = re.search(r'head probe: .* runs at ([\d.]+) GFLOP/s', log)
  head_rate = float(head.group(1)) * 1e9 if head else None
  meas = {(name, int(b)): float(m) / 1e3 for name, b, m in meas}
  cfg = get_model_config('tiny_gpt', num_layers=layers, hidden=hidden, num_heads=hidden // 64,
                         num_kv_heads=hidden // 64, ffn=4 * hidden, vocab_size=vocab, max_len=256)
  first = next(iter(meas))[0]

  def machine(tflops, bw):
    n = 8
    devs = [hc.Device(i, 'CPU', 'localhost', 'local', tflops=tflops, memory_gb=8.0, mem_bw_gbs=bw)
            for i in range(n)]
    return hc.Cluster('local', devs, np.full((n, n), alpha), np.full((n, n), beta))

  def predictor(mod):
    """Each version calibrated as bench_serve part e does it (the head at its probed rate where the
    version has head_compute_efficiency and the log a head probe)."""
    def predict(c, name, batch, **eff):
      stages, d = [], 0
      for part in name.split(' + '):          # part e's plans take devices in order
        k, t = map(int, re.match(r'(\d+)L@tp(\d+)', part).groups())
        stages.append(mod.StageLayout(k, list(range(d, d + t))))
        d += t
      setup = mod.ServeSetup(bytes_per_value=4, memory_efficiency=1.0, prompt_len=prompt,
                             gen_len=tokens, batch=batch, op_overhead_s=over, device_overhead_s=dev,
                             **{'compute_efficiency': 1.0, **eff})
      return mod.replica_cost(c, cfg, stages, setup, groups=1)['step']
    memory_only = predict(machine(1e6, 1.0), first, 1) - over           # at 1 GB/s
    compute_only = predict(machine(1.0, 1e9), first, 8) - over          # at 1 TFLOP/s
    bw = memory_only / (meas[(first, 1)] - over)
    with_head = head_rate and 'head_compute_efficiency' in mod.ServeSetup.__dataclass_fields__
    head_s = 2 * 8 * hidden * vocab / 1e12                               # at 1 TFLOP/s
    if with_head:
      rate = (compute_only - head_s) / (meas[(first, 8)] - over - head_s * 1e12 / head_rate)
      top = max(rate, head_rate / 1e12)
      eff = dict(compute_efficiency=rate / top, head_compute_efficiency=head_rate / 1e12 / top)
      return lambda name, b: predict(machine(top, bw), name, b, **eff)
    rate = compute_only / (meas[(first, 8)] - over)
    return lambda name, b: predict(machine(rate, bw), name, b)

  models = [predictor(old_module(rev)), predictor(now)]
  print(f'| plan | batch | measured ms | predicted at {rev} | ratio | predicted now | ratio |')
  print('| --- | --- | --- | --- | --- | --- | --- |')
  for (name, batch), m in meas.items():
    row = []
    for predict in models:
      p = predict(name, batch)
      row += [p * 1e3, m / p]
    print(f'| {name} | {batch} | {m * 1e3:.2f} | {row[0]:.2f} | {row[1]:.2f} | {row[2]:.2f} | {row[3]:.2f} |')


if __name__ == '__main__':
  if len(sys.argv) != 3:
    print('error: usage: costmodel_before_after.py BENCH_SERVE_E_LOG GIT_REV', file=sys.stderr)
    sys.exit(2)
  main(*sys.argv[1:])
