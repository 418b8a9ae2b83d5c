"""Multi-controller training over emulated links: measured vs predicted step time and bytes.

Reproduces: AQ-SGD's point that 8/4-bit activation exchange pays off on slow links, and DT-FM's
that a scheduled placement beats a random one on a two-region network -- both measured here on real
processes over tc-shaped links, against hetjax's training cost model (no paper table reproduced).

  python experiments/runtime_emulated.py            # needs root for the shaped links; minutes

Part 1: two processes (one CPU device each) run a 2-stage GPT over links of several bandwidths
(unshaped loopback, then tbf-shaped) with fp32, 8-bit and 4-bit exchange. Measured step time and
bytes on the wire are compared with the cost model's prediction for the same plan and links. The
model's compute rate is calibrated once, on the unshaped fp32 run; every other row is predicted
from it. netem is not available, so link latency is 0 in both the emulation and the prediction.
Part 2: four processes on a two-region cluster (fast links inside a region, a slow one across):
the scheduler's plan against a random plan, both measured.
Writes results.csv and runtime_emulated.png, prints the table last.
"""

import dataclasses
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import print_table, save_figure, wrote, write_csv  # (sets sys.path)
from absl import app, flags
import numpy as np

from hetjax.cluster import Cluster, Device
from hetjax.costmodel.training import TrainSetup, estimate
from hetjax.models.config import get_model_config
from hetjax.plan import Plan, Replica, Stage

flags.DEFINE_string('out', 'runs/runtime_emulated/', 'Output folder (results.csv, runtime_emulated.png, runs/).')
flags.DEFINE_list('mbits', ['500', '100'], 'Shaped link rates (Mbit/s); unshaped always runs.')
flags.DEFINE_list('codecs', ['fp32', '8', '4'], 'Activation/gradient codecs.')
flags.DEFINE_integer('steps', 7, 'Steps per run; the first 2 (compilation) are not timed.')
flags.DEFINE_integer('hidden', 256, 'Model width (the exchanged activation is batch x seq x hidden).')
FLAGS = flags.FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOOPBACK_GBPS = 7.0  # unshaped gloo over loopback, about 870 MB/s (DESIGN.md)
SEQ, MICRO, MB = 128, 4, 4


def cluster_file(path, hosts, gbps):
  """One CPU device per host; gbps[i][j] between hosts."""
  n = len(hosts)
  c = Cluster(os.path.basename(path)[:-5], [Device(i, 'CPU', h, 'emulated', tflops=1.0, memory_gb=4)
                                            for i, h in enumerate(hosts)],
              np.zeros((n, n)), np.asarray(gbps, float))
  c.save(path)
  return c


def run(plan_path, n, workdir, emulate='', batch=MICRO * MB, codec='fp32'):
  """Launch n processes (one CPU device each) training over the plan; (median step s, bytes/step)."""
  cmd = [sys.executable, '-m', 'hetjax.launch', '-n', str(n), '--devices=1']
  if emulate:
    cmd.append(f'--emulate={emulate}')
  cmd += ['--', sys.executable, 'run.py', '--config=configs/train.py',
          f'--config.pipeline.plan={plan_path}', f'--config.pipeline.codec={codec}',
          f'--config.pipeline.grad_codec={codec}', '--config.model_overrides.num_layers=6',
          f'--config.model_overrides.hidden={FLAGS.hidden}', f'--config.train.steps={FLAGS.steps}',
          f'--config.train.batch_size={batch}', f'--config.train.seq_len={SEQ}',
          '--config.train.eval_every=0', '--config.train.log_every=1', f'--config.workdir={workdir}']
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  if r.returncode:
    raise SystemExit(f'run failed ({" ".join(cmd)}):\n{r.stderr[-2000:]}')
  records = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))][2:]
  return float(np.median([x['step_time_s'] for x in records])), int(records[-1]['bytes_sent'])


def setup_for(codec):
  bits = {'fp32': 32, 'bf16': 16}.get(codec) or int(codec)
  return TrainSetup(global_batch=MICRO * MB, seq_len=SEQ, micro_batch_size=MB, schedule='1f1b',
                    efficiency=1.0, act_bytes=4, activation_bits=bits, compress_group=64,
                    scale_bytes=2, recompute=True)


def with_tflops(cluster, tflops):
  return Cluster(cluster.name, [dataclasses.replace(d, tflops=tflops) for d in cluster.devices],
                 cluster.delay_ms, cluster.bandwidth_gbps)


def predict(plan, cluster, model, codec, tflops):
  return estimate(plan, with_tflops(cluster, tflops), model, setup_for(codec))['total']


def calibrate(plan, cluster, model, measured):
  """Device TFLOP/s that makes the prediction equal `measured` (compute scales as 1/rate)."""
  comm = predict(plan, cluster, model, 'fp32', 1e9)
  compute_at_1 = predict(plan, cluster, model, 'fp32', 1.0) - comm
  return compute_at_1 / max(measured - comm, 1e-9)


def main(_):
  out = os.path.abspath(FLAGS.out)
  os.makedirs(out, exist_ok=True)
  can_emulate = os.geteuid() == 0
  if not can_emulate:
    print('not root: only the unshaped runs are possible (--emulate needs network namespaces)')
  model = get_model_config('tiny_gpt', num_layers=6, hidden=FLAGS.hidden)
  plan = Plan([Replica([Stage(0, 3, [0]), Stage(3, 6, [1])])], num_layers=6, micro_batches=MICRO,
              micro_batch_size=MB, seq_len=SEQ)
  plan_path = os.path.join(out, 'plan_2stage.json')
  plan.save(plan_path)
  rows = []
  links = [('unshaped', LOOPBACK_GBPS, '')]
  if can_emulate:
    links += [(f'{m} Mbit/s', float(m) / 1000, None) for m in FLAGS.mbits]
  tflops = None
  for label, gbps, emulate in links:
    cpath = os.path.join(out, f'link_{label.split()[0]}.json')
    cluster = cluster_file(cpath, ['a', 'b'], [[np.inf, gbps], [gbps, np.inf]])
    for codec in FLAGS.codecs:
      workdir = os.path.join(out, 'runs', f'{label.split()[0]}_{codec}')
      measured, sent = run(plan_path, 2, workdir, cpath if emulate is None else '', codec=codec)
      if tflops is None:
        tflops = calibrate(plan, cluster, model, measured)
      pred = predict(plan, cluster, model, codec, tflops)
      rows.append({'part': 'links', 'link': label, 'plan': '2 stages 3/3', 'codec': codec,
                   'measured_s': measured, 'predicted_s': pred, 'pred_over_meas': pred / measured,
                   'bytes_sent': sent})
      print(f'{label:>10} {codec:>5}: measured {measured:.3f} s, predicted {pred:.3f} s, '
            f'{sent / 1e6:.2f} MB', flush=True)
  if can_emulate:
    from hetjax.search.planner import SearchConfig, plan_training
    fast, slow = 1.0, 0.05
    gbps = [[np.inf if i == j else (fast if (i < 2) == (j < 2) else slow) for j in range(4)]
            for i in range(4)]
    cpath = os.path.join(out, 'two_regions.json')
    cluster = with_tflops(cluster_file(cpath, ['r1a', 'r1b', 'r2a', 'r2b'], gbps), tflops)
    setup = dataclasses.replace(setup_for('fp32'), global_batch=MICRO * MB * 2)
    search = SearchConfig(evaluations=200, population=20, screen_evaluations=20, tp=1)
    plans = {'scheduler': plan_training(cluster, model, setup, search, seed=0),
             'random': plan_training(cluster, model, setup,
                                     dataclasses.replace(search, method='random'), seed=3)}
    for name, p in plans.items():
      p.save(os.path.join(out, f'plan_{name}.json'))
      sub = p.replicas
      workdir = os.path.join(out, 'runs', f'two_regions_{name}')
      batch = p.micro_batches * p.dp * p.micro_batch_size
      measured, sent = run(os.path.join(out, f'plan_{name}.json'), 4, workdir, cpath, batch)
      pred = estimate(p, cluster, model, setup)['total']
      layout = ' | '.join('/'.join(str(s.devices[0]) for s in r.stages) for r in sub)
      rows.append({'part': 'plans', 'link': '1 Gbit/s in, 50 Mbit/s across', 'plan': f'{name}: {layout}',
                   'codec': 'fp32', 'measured_s': measured, 'predicted_s': pred,
                   'pred_over_meas': pred / measured, 'bytes_sent': sent})
      print(f'{name}: {layout}: measured {measured:.3f} s, predicted {pred:.3f} s', flush=True)
  write_csv(os.path.join(out, 'results.csv'), rows)
  plot(rows, os.path.join(out, 'runtime_emulated.png'))
  wrote(out, 'results.csv', 'runtime_emulated.png')
  print(f'\ncalibrated compute rate: {tflops * 1e3:.2f} GFLOP/s per process')
  print_table([{**{k: v for k, v in r.items() if k not in ('part', 'bytes_sent')},
                'mb_sent': r['bytes_sent'] / 1e6} for r in rows])


def plot(rows, path):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(10, 4))
  labels = [f'{r["link"]}\n{r["codec"] if r["part"] == "links" else r["plan"].split(":")[0]}' for r in rows]
  x = np.arange(len(rows))
  ax.bar(x - 0.2, [r['measured_s'] for r in rows], 0.4, label='measured')
  ax.bar(x + 0.2, [r['predicted_s'] for r in rows], 0.4, label='predicted')
  ax.set_xticks(x, labels, fontsize=7)
  ax.set_ylabel('step time (s)')
  ax.set_title('multi-controller training over emulated links')
  ax.legend()
  save_figure(fig, path, dpi=100)


if __name__ == '__main__':
  app.run(main)
