"""HexGen's scheduling experiment: Llama-2-70B on heterogeneous vs homogeneous GPUs, rate vs SLO.

Reproduces: the HexGen paper's (ICML 2024) end-to-end comparison -- Llama-2-70B on the full- and
half-budget heterogeneous settings vs the homogeneous A100 setting, SLO attainment against request
rate (see /work/shared/paper_facts/hexgen_setups.json) -- with symmetric plans on the same GPUs as a
second baseline, on hetjax's cost model and dispatch simulator. Replicas decode pipelined: one
request group per stage (costmodel/inference.py), and a simulated round takes up to max_batch
requests per stage.

For each setting x system the planner maximises the request rate served within the deadline
(slo_scale x the single-request latency on the homogeneous setting), then the dispatch simulator
(Poisson arrivals, shortest-expected-completion; round-robin as an ablation) measures SLO attainment at
each request rate and the deadline 99% of requests meet. max_rate_99pct: the largest rate
(bisection) at which 99% of requests meet the deadline. Writes hexgen_scheduling.csv,
hexgen_scheduling_summary.csv and hexgen_scheduling.png, prints the table last.

  python experiments/hexgen_scheduling.py                       # ~3 minutes on 2 CPU cores
  python experiments/hexgen_scheduling.py --lengths=128 --evaluations=3000 --slo_scale=16
"""

import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import print_table, save_figure, wrote, write_csv  # (sets sys.path)
from absl import app, flags


from hetjax.cluster import get_cluster
from hetjax.costmodel.inference import ServeSetup
from hetjax.inference import dispatch
from hetjax.models.config import get_model_config
from hetjax.search import hexgen

SETTINGS = {'full_budget': 'hexgen_full_budget', 'half_budget': 'hexgen_half_budget'}


flags.DEFINE_string('out', 'runs/hexgen_scheduling/', 'Output folder (CSVs and hexgen_scheduling.png).')
flags.DEFINE_list('settings', list(SETTINGS), 'Heterogeneous settings to plan (the homogeneous one always runs).')
flags.DEFINE_list('lengths', ['32', '64', '128'], 'Prompt = output lengths.')
flags.DEFINE_list('rates', '0.125,1,2,4,8,16,24,32,48,64,96,128,192'.split(','), 'Request rates (req/s).')
flags.DEFINE_float('slo_scale', 8.0, 'Deadline = this x the single-request latency on the homogeneous setting.')
flags.DEFINE_integer('evaluations', 1500, 'Groupings each plan search evaluates.')
flags.DEFINE_integer('population', 40, 'Genetic-algorithm population.')
flags.DEFINE_integer('requests', 2000, 'Poisson requests simulated per rate.')
flags.DEFINE_integer('seed', 0, 'Seed of the search and the arrivals.')
FLAGS = flags.FLAGS


def main(argv):
  del argv
  a = FLAGS
  t0 = time.time()
  model = get_model_config('llama2_70b')
  rates = [float(r) for r in a.rates]
  homo = get_cluster('hexgen_homogeneous')
  rows, summary = [], []
  for length in (int(x) for x in a.lengths):
    setup = ServeSetup(prompt_len=length, gen_len=length)
    ref = hexgen.reference_latency(homo, model, setup)
    deadline = a.slo_scale * ref
    base = hexgen.HexGenConfig(objective='rate', deadline=deadline, evaluations=a.evaluations,
                               population=a.population, max_batch=64)
    systems = [('homogeneous', 'homogeneous', homo, base)]
    for name in a.settings:
      if name not in SETTINGS:
        raise app.UsageError(f'--settings: choose from {", ".join(SETTINGS)}')
      c = get_cluster(SETTINGS[name])
      systems += [(name, 'symmetric', c, dataclasses.replace(base, symmetric=True)),
                  (name, 'hetjax', c, base)]
    for setting, system, cluster, cfg in systems:
      res = hexgen.plan_serving(cluster, model, setup, cfg, seed=a.seed, model_name='llama2_70b')
      reps = dispatch.replicas_from_plan(res.plan, cluster, model, setup)
      policies = ['shortest_completion'] + (['round_robin'] if system == 'hetjax' else [])
      for pol in policies:
        for row in dispatch.sweep(reps, rates, deadline, pol, a.requests, a.seed):
          rows.append({'length': length, 'setting': setting, 'system': system, 'deadline_s': deadline, **row})
      mine = [r for r in rows if r['length'] == length and r['setting'] == setting and r['system'] == system
              and r['policy'] == 'shortest_completion']
      at = min(mine, key=lambda r: abs(r['rate'] - 8.0))
      st = [len(r.stages) for r in res.plan.replicas]
      summary.append({'length': length, 'setting': setting, 'system': system, 'gpus': cluster.n,
                      'replicas': len(res.plan.replicas), 'stages': f'{min(st)}-{max(st)}',
                      'tp': '/'.join(sorted({str(s.tp) for r in res.plan.replicas for s in r.stages})),
                      'latency_1_s': res.plan.prediction['latency_1_min_s'],
                      'pred_capacity_rps': res.plan.prediction['capacity_rps'],
                      'max_rate_99pct': dispatch.max_rate(reps, deadline, 'shortest_completion', 0.99,
                                                          a.requests, a.seed),
                      f'deadline99_at_{at["rate"]:g}rps_s': at['deadline_99'],
                      'search_s': res.seconds, 'evaluations': res.evaluations})
      print(f'L={length} {setting:12s} {system:12s} searched in {res.seconds:.1f} s', flush=True)
  tag = 'hexgen_scheduling'
  write_csv(os.path.join(a.out, f'{tag}.csv'), rows)
  write_csv(os.path.join(a.out, f'{tag}_summary.csv'), summary)
  plot(rows, os.path.join(a.out, f'{tag}.png'))
  wrote(a.out, f'{tag}.csv', f'{tag}_summary.csv', f'{tag}.png')
  print(f'total {time.time() - t0:.0f} s; deadline = {a.slo_scale} x single-request latency on '
        f'hexgen_homogeneous; attainment with shortest-expected-completion dispatch, {a.requests} '
        f'Poisson requests per rate')
  print_table(summary, precision='.3f')


def plot(rows, path):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  lengths = sorted({r['length'] for r in rows})
  fig, axes = plt.subplots(len(lengths), 2, figsize=(11, 4 * len(lengths)), squeeze=False)
  curves = sorted({(r['setting'], r['system'], r['policy']) for r in rows})
  for li, length in enumerate(lengths):
    for setting, system, pol in curves:
      rr = [r for r in rows if r['length'] == length and (r['setting'], r['system'], r['policy']) == (setting, system, pol)]
      lab = f'{system} ({setting})' + ('' if pol == 'shortest_completion' else ' round-robin')
      style = '--' if pol == 'round_robin' else '-'
      axes[li, 0].plot([r['rate'] for r in rr], [r['attainment'] for r in rr], style, marker='o', ms=3, label=lab)
      axes[li, 1].plot([r['rate'] for r in rr], [r['deadline_99'] for r in rr], style, marker='o', ms=3, label=lab)
    axes[li, 0].set(xlabel='request rate (req/s)', ylabel='SLO attainment', title=f'prompt = output = {length}')
    axes[li, 1].set(xlabel='request rate (req/s)', ylabel='deadline for 99% (s)', yscale='log')
    axes[li, 1].axhline(rows[0]['deadline_s'] if length == rows[0]['length'] else
                        next(r['deadline_s'] for r in rows if r['length'] == length), color='gray', lw=0.8)
    axes[li, 0].legend(fontsize=7)
  save_figure(fig, path)


if __name__ == '__main__':
  app.run(main)
