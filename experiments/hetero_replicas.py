"""Predicted gain of heterogeneous data-parallel replicas over the best uniform training plan.

Reproduces: issue 16's "plans only hetjax can run" question (HexiScale/FlashFlex-style asymmetric
DP/PP/TP): on mixed_worldwide and small_lab, the step time of the best heterogeneous-replica plan we
construct against the best uniform plan of the planner (method hetjax), all scored by one model,
hetjax.search.hetero_replicas.estimate (the slowest replica's pipeline for its share + the per-layer
cross-replica all-reduce; for identical replicas it is cm.estimate).

Candidates per cluster:
- uniform:    the planner's plan (every replica identical, equal shares);
- rebalanced: that plan with per-replica layer splits and fitted batch shares;
- islands:    replicas formed from regions, hosts or GPU kinds (hetero_replicas.construct), every
  device used;
- subset:     the same, islands may stay unused (a plan over part of the cluster, which the uniform
  planner never considers: it is reported apart, not as the hetero gain).

  python experiments/hetero_replicas.py
  python experiments/hetero_replicas.py --clusters=mixed_worldwide:gpt3_xl:1024 --grad_bytes=1 \
      --out=runs/hetero_replicas_grad8/

Writes results.csv, step_time.png and the plans (JSON) under --out; prints the table last.
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import print_table, save_figure, write_csv, wrote  # noqa: E402

from hetjax.cluster import get_cluster  # noqa: E402
from hetjax.costmodel import training as cm  # noqa: E402
from hetjax.errors import HetjaxError  # noqa: E402
from hetjax.models.config import get_model_config  # noqa: E402
from hetjax.search import hetero_replicas as hr  # noqa: E402
from hetjax.search.planner import SearchConfig, plan_training  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string('clusters', 'small_lab:gpt2_medium:32,mixed_worldwide:gpt3_xl:1024',
                    'comma-separated cluster:model:global_batch (sequences of the model\'s max_len)')
flags.DEFINE_integer('evaluations', 5000, 'candidates of the uniform planner\'s GA (method hetjax)')
flags.DEFINE_string('islands', 'region,host,gpu', 'island kinds the constructor tries')
flags.DEFINE_integer('seed', 0, 'seed of the uniform planner')
flags.DEFINE_integer('grad_bytes', 4, 'bytes per gradient value in the cross-replica sync (4: fp32 as DT-FM; '
                     '1: 8-bit gradient compression), for every plan and the planner alike')
flags.DEFINE_string('out', 'runs/hetero_replicas/', 'output directory')


def _shares(micro: list[int]) -> str:
  return f'{micro[0]}x{len(micro)}' if len(set(micro)) == 1 else '+'.join(map(str, micro))


def _row(cluster, model, kind, plan, setup, seconds, uses_all=True):
  pred = hr.estimate(plan, cluster, model, setup)
  return {'cluster': cluster.name, 'model': plan.model, 'grad_bytes': setup.grad_bytes, 'plan': kind, 'step_s': pred['total'],
          'pipeline_s': pred['pipeline'], 'dp_comm_s': pred['dp_comm'], 'replicas': plan.dp,
          'micro_batches': _shares(plan.replica_micro_batches()),
          'devices': len(plan.devices), 'all_devices': uses_all, 'symmetric': plan.symmetric,
          'search_cpu_s': seconds}


def run_cluster(spec: str, out: str) -> list[dict]:
  name, model_name, batch = spec.split(':')
  cluster, model = get_cluster(name), get_model_config(model_name)
  setup = cm.TrainSetup(global_batch=int(batch), seq_len=model.max_len, grad_bytes=FLAGS.grad_bytes)
  print(f'{name}: {cluster.n} devices, {model_name}, batch {batch} x {model.max_len} tokens', flush=True)
  rows = []
  c0 = time.process_time()
  uniform = plan_training(cluster, model, setup, SearchConfig(method='hetjax', evaluations=FLAGS.evaluations),
                          seed=FLAGS.seed, model_name=model_name)
  rows.append(_row(cluster, model, 'uniform', uniform, setup, time.process_time() - c0))
  print(f'  uniform (planner): {uniform.prediction["total"]:.3f} s by cm.estimate', flush=True)
  c0 = time.process_time()
  reb = hr.rebalance(uniform, cluster, model, setup)
  rows.append(_row(cluster, model, 'rebalanced', reb, setup, time.process_time() - c0))
  plans = {'uniform': uniform, 'rebalanced': reb}
  for by in FLAGS.islands.split(','):
    for use_all in (True, False):
      kind = f'{"islands" if use_all else "subset"}_{by}'
      c0 = time.process_time()
      try:
        plan = hr.construct(cluster, model, setup, by=by, use_all=use_all, model_name=model_name)
      except HetjaxError as e:
        print(f'  {kind}: {e}')
        continue
      rows.append(_row(cluster, model, kind, plan, setup, time.process_time() - c0,
                       len(plan.devices) == cluster.n))
      plans[kind] = plan
      print(f'  {kind}: {rows[-1]["step_s"]:.3f} s', flush=True)
  base = rows[0]['step_s']
  for r in rows:
    r['gain_vs_uniform'] = base / r['step_s']
  for kind, plan in plans.items():
    plan.save(os.path.join(out, f'{name}_{kind}.json'))
  return rows


def main(argv):
  del argv
  out = FLAGS.out
  os.makedirs(out, exist_ok=True)
  rows = []
  for spec in FLAGS.clusters.split(','):
    rows += run_cluster(spec, out)
  write_csv(os.path.join(out, 'results.csv'), rows)
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  clusters = list(dict.fromkeys(r['cluster'] for r in rows))
  fig, axes = plt.subplots(1, len(clusters), figsize=(6 * len(clusters), 4), squeeze=False)
  for ax, name in zip(axes[0], clusters):
    sub = [r for r in rows if r['cluster'] == name]
    ax.bar(range(len(sub)), [r['pipeline_s'] for r in sub], label='slowest pipeline')
    ax.bar(range(len(sub)), [r['dp_comm_s'] for r in sub], bottom=[r['pipeline_s'] for r in sub],
           label='cross-replica all-reduce')
    ax.set_xticks(range(len(sub)), [r['plan'] for r in sub], rotation=45, ha='right')
    ax.set_ylabel('predicted step (s)')
    ax.set_title(name)
    ax.legend()
  save_figure(fig, os.path.join(out, 'step_time.png'))
  wrote(out, 'results.csv', 'step_time.png')
  print_table(rows, columns=['cluster', 'plan', 'step_s', 'pipeline_s', 'dp_comm_s', 'replicas',
                             'micro_batches', 'devices', 'symmetric', 'gain_vs_uniform', 'search_cpu_s'])


if __name__ == '__main__':
  app.run(main)
