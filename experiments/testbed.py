"""Emulated heterogeneous testbed: the scheduler's plan against random and index order, measured vs predicted.

Reproduces: DT-FM's claim that a scheduled placement beats a random one on a heterogeneous network,
measured on the emulated testbed (hetjax.launch --emulate: per-process CPU quotas in proportion to
device speed, tbf-shaped links, user-space link latency) against hetjax's training cost model
(no paper table reproduced; issue 12's proof suite, partial: no even-layers baseline yet).

  python experiments/testbed.py --scenarios=two_regions     # needs root; minutes per scenario

For each scenario (2-4 processes, one CPU device each) and each plan (hetjax scheduler, random,
index order; mode=plan with search.method), it trains a tiny GPT for --steps steps over the plan
on the testbed and compares the median step time (the first 2 steps, compilation, not timed) with
the plan's predicted step time. Writes results.csv and testbed.png (predicted against measured,
with the +-15% band), prints the table last. Measurements on a shared machine are contention-bound:
CPU quotas cap a process, they do not reserve a core for it.
"""

import json
import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import print_table, save_figure, wrote, write_csv  # (sets sys.path)
from absl import app, flags
import numpy as np

flags.DEFINE_string('out', 'runs/testbed/', 'Output folder (results.csv, testbed.png, runs/).')
flags.DEFINE_list('scenarios', ['all'], 'Scenario names to run, or all.')
flags.DEFINE_list('plans', ['hetjax', 'random', 'index'], 'search.method values to compare.')
flags.DEFINE_integer('steps', 5, 'Steps per run; the first 2 (compilation) are not timed.')
flags.DEFINE_integer('layers', 3, 'Transformer blocks of the tiny GPT.')
FLAGS = flags.FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH, SEQ, MICRO = 8, 32, 4
# name: (TFLOP/s per host (quota in proportion), one-way delay ms, bandwidth Gbit/s), symmetric
SCENARIOS = {
    'two_regions': ([0.01, 0.005, 0.0025], [[0, 5, 50], [5, 0, 50], [50, 50, 0]],
                    [[0, 1, 0.02], [1, 0, 0.02], [0.02, 0.02, 0]]),
    'compute_decides': ([0.01, 0.0025, 0.005], [[0, 1, 1], [1, 0, 1], [1, 1, 0]],
                        [[0, 1, 1], [1, 0, 1], [1, 1, 0]]),
    'world_wide': ([0.01, 0.01, 0.005, 0.005], [[0, 1, 80, 100], [1, 0, 80, 100], [80, 80, 0, 1],
                                                [100, 100, 1, 0]],
                   [[0, 1, 0.05, 0.02], [1, 0, 0.05, 0.05], [0.05, 0.05, 0, 1], [0.02, 0.05, 1, 0]]),
    'two_even': ([0.01, 0.01], [[0, 10], [10, 0]], [[0, 0.1], [0.1, 0]]),
    'two_uneven': ([0.01, 0.0025], [[0, 1], [1, 0]], [[0, 1], [1, 0]]),
    'slow_pair': ([0.01, 0.005, 0.005], [[0, 1, 1], [1, 0, 100], [1, 100, 0]],
                  [[0, 1, 1], [1, 0, 0.02], [1, 0.02, 0]]),
    'four_mixed': ([0.01, 0.005, 0.0025, 0.005], [[0, 1, 20, 20], [1, 0, 20, 20], [20, 20, 0, 1],
                                                  [20, 20, 1, 0]],
                   [[0, 1, 0.1, 0.1], [1, 0, 0.1, 0.1], [0.1, 0.1, 0, 1], [0.1, 0.1, 1, 0]]),
    'latency_only': ([0.01, 0.01, 0.01], [[0, 100, 0], [100, 0, 100], [0, 100, 0]],
                     [[0, 1, 1], [1, 0, 1], [1, 1, 0]]),
}


def cluster_file(path, name):
  tflops, delay, bw = SCENARIOS[name]
  devices = [{'id': i, 'gpu': 'CPU', 'host': f'h{i}', 'region': 'emulated', 'tflops': t,
              'memory_gb': 2} for i, t in enumerate(tflops)]
  with open(path, 'w') as f:
    json.dump({'name': name, 'devices': devices, 'delay_ms': delay, 'bandwidth_gbps': bw}, f)
  return len(tflops)


def plan(cluster_path, n, method, workdir):
  """mode=plan with one search method; (plan.json path, predicted step s)."""
  cmd = [sys.executable, 'run.py', '--config=configs/plan.py', f'--config.cluster={cluster_path}',
         '--config.model=tiny_gpt', f'--config.model_overrides.num_layers={FLAGS.layers}',
         f'--config.train.global_batch={BATCH}', f'--config.train.seq_len={SEQ}',
         f'--config.train.micro_batch_size={MICRO}', f'--config.search.method={method}',
         f'--config.search.d_pp={n}', '--config.search.evaluations=50', '--config.draw=false',
         '--config.train.efficiency=1.0', '--config.seed=1', f'--config.workdir={workdir}']
  r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  found = re.search(r'predicted step \(s\): total=([\d.]+)', r.stdout)
  if r.returncode or not found:
    raise SystemExit(f'plan failed ({" ".join(cmd)}):\n{r.stderr[-2000:]}')
  return os.path.join(workdir, 'plan.json'), float(found.group(1))


def train(cluster_path, n, plan_path, workdir):
  """Launch n processes on the testbed; (median step s, bytes sent per step)."""
  cmd = [sys.executable, '-m', 'hetjax.launch', '-n', str(n), f'--emulate={cluster_path}',
         '--timeout=800', '--', sys.executable, 'run.py', '--config=configs/train.py',
         f'--config.pipeline.plan={plan_path}', f'--config.model_overrides.num_layers={FLAGS.layers}',
         f'--config.train.steps={FLAGS.steps}', f'--config.train.batch_size={BATCH}',
         f'--config.train.seq_len={SEQ}', '--config.train.eval_every=0',
         '--config.train.log_every=1', f'--config.workdir={workdir}']
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  print(f'  training over {plan_path} ...', flush=True)
  r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  if r.returncode:
    raise SystemExit(f'run failed ({" ".join(cmd)}):\n{r.stderr[-2000:]}')
  records = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))][2:]
  steps = [x['step_time_s'] for x in records]
  return float(np.median(steps)), int(records[-1]['bytes_sent'])


def main(_):
  if os.geteuid() != 0:
    raise SystemExit('error: the testbed needs root (cgroups, network namespaces)')
  names = list(SCENARIOS) if FLAGS.scenarios == ['all'] else FLAGS.scenarios
  unknown = [s for s in names if s not in SCENARIOS]
  if unknown:
    raise SystemExit(f'error: unknown scenarios {unknown}; choose from {list(SCENARIOS)}')
  out = FLAGS.out
  os.makedirs(out, exist_ok=True)
  print(f'machine load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores')
  rows = []
  for name in names:
    cpath = os.path.abspath(os.path.join(out, f'{name}.json'))
    n = cluster_file(cpath, name)
    print(f'scenario {name}: {n} processes', flush=True)
    for method in FLAGS.plans:
      work = os.path.abspath(os.path.join(out, 'runs', f'{name}_{method}'))
      plan_path, predicted = plan(cpath, n, method, work + '_plan')
      measured, sent = train(cpath, n, plan_path, work)
      rows.append({'scenario': name, 'plan': 'scheduler' if method == 'hetjax' else method,
                   'measured_s': round(measured, 4), 'predicted_s': round(predicted, 4),
                   'measured_over_predicted': round(measured / predicted, 3), 'bytes_sent': sent})
  for name in names:
    mine = [r for r in rows if r['scenario'] == name]
    sched = next((r for r in mine if r['plan'] == 'scheduler'), None)
    for r in mine:
      r['scheduler_over_this'] = round(sched['measured_s'] / r['measured_s'], 3) if sched else ''
  write_csv(os.path.join(out, 'results.csv'), rows)
  plot(rows, os.path.join(out, 'testbed.png'))
  wrote(out, 'results.csv', 'testbed.png')
  print_table(rows)


def plot(rows, path):
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5, 5))
  pred, meas = [r['predicted_s'] for r in rows], [r['measured_s'] for r in rows]
  top = max(pred + meas) * 1.1
  x = np.linspace(0, top, 50)
  ax.fill_between(x, x * 0.85, x * 1.15, color='0.9', label='+-15%')
  ax.plot(x, x, 'k-', lw=0.8)
  for plan_name, marker in (('scheduler', 'o'), ('random', 's'), ('index', '^')):
    pts = [(r['predicted_s'], r['measured_s']) for r in rows if r['plan'] == plan_name]
    if pts:
      ax.scatter(*zip(*pts), marker=marker, label=plan_name)
  ax.set_xlabel('predicted step (s)')
  ax.set_ylabel('measured step (s)')
  ax.set_title('emulated testbed: measured vs predicted')
  ax.legend()
  save_figure(fig, path)


if __name__ == '__main__':
  app.run(main)
