"""DT-FM's scheduling study, re-run on hetjax's cost model.

Sweeps DT-FM's five network scenarios x {random, index order, hybrid gain, DT-FM, hetjax} x seeds for
GPT3-XL (24 layers, seq 2048, batch 1024, micro-batch 1, 1F1B) on 64 V100s. Writes results.csv, a
convergence plot and a bar chart of predicted step time, then prints a table (last).

  python experiments/dtfm_scheduling.py --seeds 2 --out runs/dtfm_scheduling
  python experiments/dtfm_scheduling.py --scenarios mixed_worldwide,mixed_datacenter --seeds 1

Two metrics: `step` = hetjax's predicted step time (compute + bubble + TP + PP + DP, seconds);
`dtfm` = DT-FM's communication cost (dp + 2 pp, seconds) for plans of the DT-FM shape (TP 1).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import write_csv  # noqa: E402

from hetjax.cluster import get_cluster  # noqa: E402
from hetjax.costmodel.training import TrainSetup  # noqa: E402
from hetjax.models.config import get_model_config  # noqa: E402
from hetjax.search.planner import SearchConfig, plan_training  # noqa: E402

METHODS = ('random', 'index', 'hybrid', 'dtfm', 'hetjax')
SCENARIOS = tuple(f'dtfm_case{i}' for i in range(1, 6))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--scenarios', default=','.join(SCENARIOS))
  ap.add_argument('--methods', default=','.join(METHODS))
  ap.add_argument('--seeds', type=int, default=2)
  ap.add_argument('--devices', type=int, default=64)
  ap.add_argument('--model', default='gpt3_xl')
  ap.add_argument('--evaluations', type=int, default=5000)
  ap.add_argument('--out', default='runs/dtfm_scheduling')
  args = ap.parse_args()
  os.makedirs(args.out, exist_ok=True)
  model = get_model_config(args.model)
  setup = TrainSetup(global_batch=1024, seq_len=model.max_len, micro_batch_size=1, schedule='1f1b')
  rows, histories = [], {}
  for scen in args.scenarios.split(','):
    cluster = get_cluster(scen, args.devices)
    for method in args.methods.split(','):
      for seed in range(1 if method == 'index' else args.seeds):
        t0 = time.perf_counter()
        plan = plan_training(cluster, model, setup, SearchConfig(method=method, evaluations=args.evaluations),
                             seed=seed, model_name=args.model)
        p, s = plan.prediction, plan.search
        row = {'scenario': scen, 'method': method, 'seed': seed, 'tp': s['shape'][0], 'd_pp': s['shape'][1],
               'd_dp': s['shape'][2], 'layers': '-'.join(map(str, plan.layer_counts())),
               'step_s': p['total'], 'compute_s': p['compute'], 'bubble_s': p['bubble'], 'tp_s': p['tp_comm'],
               'pp_s': p['pp_comm'], 'dp_s': p['dp_comm'], 'dtfm_cost_s': p.get('dtfm_cost', float('nan')),
               'memory_ok': int(p['memory_ok']), 'evaluations': s.get('evaluations', 0),
               'search_s': time.perf_counter() - t0}
        rows.append(row)
        if 'history' in s:
          histories[(scen, method, seed)] = s['history']
        print(f"{scen:11s} {method:7s} seed {seed}: step {row['step_s']:8.2f} s  dtfm {row['dtfm_cost_s']:8.2f} s"
              f"  shape {s['shape']} layers {row['layers']}  ({row['search_s']:.1f} s)", flush=True)
  write_csv(os.path.join(args.out, 'results.csv'), rows)
  plot(rows, histories, args.out)
  print_table(rows, args.out)


def mean(rows, scen, method, key):
  vals = [r[key] for r in rows if r['scenario'] == scen and r['method'] == method]
  return float(np.mean(vals)) if vals else float('nan')


def plot(rows, histories, out):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  scens = list(dict.fromkeys(r['scenario'] for r in rows))
  methods = list(dict.fromkeys(r['method'] for r in rows))
  fig, ax = plt.subplots(figsize=(10, 4))
  x = np.arange(len(scens))
  width = 0.8 / len(methods)
  for k, m in enumerate(methods):
    ax.bar(x + k * width, [mean(rows, s, m, 'step_s') for s in scens], width, label=m)
  ax.set_xticks(x + 0.4 - width / 2)
  ax.set_xticklabels(scens)
  ax.set_ylabel('predicted step time (s)')
  ax.set_title('GPT3-XL on 64 GPUs: predicted step time by placement method')
  ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(out, 'cost_by_scenario.png'), dpi=110)
  plt.close(fig)

  fig, axes = plt.subplots(1, len(scens), figsize=(4 * len(scens), 3.2), squeeze=False)
  for ax, s in zip(axes[0], scens):
    for (sc, m, seed), h in histories.items():
      if sc == s:
        ax.plot(np.arange(len(h)), h, label=f'{m} s{seed}', lw=1)
    ax.set_title(s, fontsize=9)
    ax.set_xlabel('generation (100 candidates)')
    ax.set_yscale('log')
  axes[0][0].set_ylabel('best objective (s)')
  axes[0][-1].legend(fontsize=7)
  fig.suptitle('Convergence (dtfm/hybrid: DT-FM cost; hetjax: approximate step time of the finalist shape)',
               fontsize=9)
  fig.tight_layout()
  fig.savefig(os.path.join(out, 'convergence.png'), dpi=110)
  plt.close(fig)


def print_table(rows, out):
  scens = list(dict.fromkeys(r['scenario'] for r in rows))
  methods = list(dict.fromkeys(r['method'] for r in rows))
  lines = [f'Predicted step time (s), mean over seeds; ratios vs hetjax; DT-FM cost ratios vs DT-FM search. '
           f'Files in {out}']
  head = f"{'scenario':12s}" + ''.join(f'{m:>9s}' for m in methods)
  head += f"{'rnd/hj':>8s}{'idx/hj':>8s}{'dtfm/hj':>8s}{'hj shape':>10s}{'  dtfm-cost rnd/dtfm idx/dtfm hyb/dtfm'}"
  lines.append(head)
  for s in scens:
    hj = mean(rows, s, 'hetjax', 'step_s')
    line = f'{s:12s}' + ''.join(f'{mean(rows, s, m, "step_s"):9.2f}' for m in methods)
    line += f"{mean(rows, s, 'random', 'step_s') / hj:8.2f}{mean(rows, s, 'index', 'step_s') / hj:8.2f}"
    line += f"{mean(rows, s, 'dtfm', 'step_s') / hj:8.2f}"
    shp = [r for r in rows if r['scenario'] == s and r['method'] == 'hetjax']
    shape = '{tp}x{d_pp}x{d_dp}'.format(**shp[0]) if shp else '-'
    line += f'{shape:>10s}'
    d = mean(rows, s, 'dtfm', 'dtfm_cost_s')
    line += (f"  {mean(rows, s, 'random', 'dtfm_cost_s') / d:13.2f} {mean(rows, s, 'index', 'dtfm_cost_s') / d:8.2f}"
             f" {mean(rows, s, 'hybrid', 'dtfm_cost_s') / d:8.2f}")
    lines.append(line)
  text = '\n'.join(lines)
  with open(os.path.join(out, 'table.txt'), 'w') as f:
    f.write(text + '\n')
  print(text)


if __name__ == '__main__':
  main()
