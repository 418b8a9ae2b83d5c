"""DT-FM's scheduling study, re-run with hetjax's planners and DT-FM's own scheduler.

Reproduces: DT-FM paper Fig. 4 / Table 2 (scheduler vs random and hybrid), re-run with
hetjax's planners and, given a local copy of DT-FM's repository, DT-FM's released scheduler itself.

Every plan is scored with one cost function: DT-FM's communication cost (dp + 2 pp, seconds) of the
plan in the order it runs (hetjax.costmodel.training.plan_link_cost), with DT-FM's constants
(c_pp = 0.471 GiB per tasklet, c_dp = 0.65 GB per stage, as hard-coded in the peer's scheduler).
Peer plans are partitions; they run in their best pipeline order (the peer computes that order too).

Scenarios: DT-FM's five cases (64 GPUs, 8 stages x 8 replicas), shuffled-id variants of cases 3-5,
and two mixed scenarios of our own with shuffled ids (uneven_world, spot_geo; see `scenario`).
Methods: random, index (pipeline outermost), strided (data outermost), hybrid (DT-FM's hybrid gain),
dtfm (hetjax's search), dtfm_noseed (the same without seeds read from the matrices), peer (DT-FM's
released code, --peer_dir; 330-440 s per run unloaded, so --peer_seeds is small).

  python experiments/dtfm_scheduling.py --seeds=10
  python experiments/dtfm_scheduling.py --methods=dtfm --bundle_evaluations=0   # ablation: no bundle search
  python experiments/dtfm_scheduling.py --peer_dir=/work/peer/DT-FM --peer_seeds=1 --scenarios=dtfm_case5

Writes results.csv, cost_by_scenario.png and table.txt under --out; prints the table last.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import importlib
import io
import json
import os
import random
import sys
import time

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import write_csv  # noqa: E402

from hetjax.cluster import Cluster, Device, dtfm_case  # noqa: E402
from hetjax.costmodel import training as cm  # noqa: E402
from hetjax.errors import HetjaxError  # noqa: E402
from hetjax.models.config import get_model_config  # noqa: E402
from hetjax.search.planner import SearchConfig, plan_training  # noqa: E402

PAPER_C_PP = 0.471 * 2 ** 30   # bytes: activations of one tasklet (DT-FM scheduler.py: 0.471 GiB)
PAPER_C_DP = 0.65e9            # bytes: gradients of one stage (DT-FM: 1.3 GB x 4 B x 3/24 layers)
SCENARIOS = ('dtfm_case1', 'dtfm_case2', 'dtfm_case3', 'dtfm_case4', 'dtfm_case5', 'dtfm_case3_shuf',
             'dtfm_case4_shuf', 'dtfm_case5_shuf', 'uneven_world', 'spot_geo')
METHODS = ('random', 'index', 'strided', 'hybrid', 'dtfm', 'dtfm_noseed')

FLAGS = flags.FLAGS
flags.DEFINE_string('scenarios', ','.join(SCENARIOS), 'comma-separated scenario names (see module doc)')
flags.DEFINE_string('methods', ','.join(METHODS), 'comma-separated hetjax methods; "peer" is added by --peer_dir')
flags.DEFINE_integer('seeds', 10, 'seeds for dtfm (hetjax search)')
flags.DEFINE_integer('other_seeds', 3, 'seeds for the other searching methods (random, hybrid, dtfm_noseed)')
flags.DEFINE_string('peer_dir', '', "local copy of github.com/DS3Lab/DT-FM; runs its scheduler's GCMA")
flags.DEFINE_integer('peer_seeds', 1, 'seeds for the peer scheduler (each run takes minutes)')
flags.DEFINE_bool('peer_run_missing', True, 'run peer seeds missing from the cache (else use cached runs only)')
flags.DEFINE_bool('table_only', False, 'rebuild the table from results.csv and the peer cache, running nothing')
flags.DEFINE_string('peer_mode', 'default', "peer gain: 'default' (DT-FM) or 'baseline' (its hybrid)")
flags.DEFINE_string('model', 'gpt3_xl', 'model (sets layers; c_pp/c_dp come from the flags below)')
flags.DEFINE_integer('evaluations', 5000, 'distinct candidates per search (DT-FM: 5000)')
flags.DEFINE_integer('seed_variants', 4, 'dtfm: independent draws of the structural seeds')
flags.DEFINE_integer('bundle_evaluations', 600, 'dtfm: true-cost evaluations per search of a seed\'s bundling of lines')
flags.DEFINE_float('c_pp_bytes', PAPER_C_PP, 'DT-FM c_pp in bytes (0: derive from the model)')
flags.DEFINE_float('c_dp_bytes', PAPER_C_DP, 'DT-FM c_dp in bytes (0: derive from the model)')
flags.DEFINE_string('out', 'runs/dtfm_scheduling/', 'output directory')
flags.DEFINE_string('csv', 'results.csv', 'result file name under --out (--table_only reads results*.csv)')


# ------------------------------------------------------------------ scenarios
def _shuffled(c: Cluster, name: str, seed: int = 2022) -> Cluster:
  return c.subset(np.random.default_rng(seed).permutation(c.n).tolist(), name)


def _regional(name: str, hosts: dict, intra_gbps: float, intra_ms: float) -> Cluster:
  """Devices over case-5 regions, hosts[region] = GPUs per host; 100 Gbit/s inside a host,
  intra_gbps / intra_ms between hosts of a region, DT-FM case 5's table between regions."""
  ref = dtfm_case(5)
  rep = {r: ids[0] for r, ids in ref.regions().items()}
  region, host = [], []
  for r, sizes in hosts.items():
    for h, size in enumerate(sizes):
      region += [r] * size
      host += [f'{r}-h{h}'] * size
  n = len(region)
  delay, bw = np.zeros((n, n)), np.ones((n, n))
  for i in range(n):
    for j in range(n):
      if host[i] == host[j]:
        delay[i, j], bw[i, j] = 0.0, 100.0
      elif region[i] == region[j]:
        delay[i, j], bw[i, j] = intra_ms, intra_gbps
      else:
        a, b = rep[region[i]], rep[region[j]]
        delay[i, j], bw[i, j] = ref.delay_ms[a, b], ref.bandwidth_gbps[a, b]
  devs = [Device(i, 'V100-SXM2-32GB', host[i], region[i]) for i in range(n)]
  return _shuffled(Cluster(name, devs, delay, bw), name)


def scenario(name: str) -> Cluster:
  """DT-FM cases, shuffled variants ('_shuf'), and two mixed scenarios of our own (shuffled ids):
  uneven_world: 24 Oregon / 16 Virginia / 12 Tokyo / 8 London / 4 Frankfurt on 4-GPU hosts, 2 Gbit/s
    5 ms between hosts of a region; most regions are not a whole number of 8-GPU groups.
  spot_geo: Ohio 3 x 8-GPU hosts + 8 single GPUs, Virginia 4 x 4-GPU hosts + 16 singles, 1.25 Gbit/s
    between hosts of a region (DT-FM case 2's spot links), Ohio-Virginia from case 5's table."""
  if name.startswith('dtfm_case'):
    c = dtfm_case(int(name[len('dtfm_case')]))
    return _shuffled(c, name) if name.endswith('_shuf') else c
  if name == 'uneven_world':
    sizes = {'Oregon': 24, 'Virginia': 16, 'Tokyo': 12, 'London': 8, 'Frankfurt': 4}
    return _regional(name, {r: [4] * (n // 4) for r, n in sizes.items()}, 2.0, 5.0)
  if name == 'spot_geo':
    return _regional(name, {'Ohio': [8] * 3 + [1] * 8, 'Virginia': [4] * 4 + [1] * 16}, 1.25, 0.0)
  raise HetjaxError(f'unknown scenario {name!r}; choose from {", ".join(SCENARIOS)}')


# ------------------------------------------------------------------ the peer's scheduler
def run_peer(peer_dir: str, cluster: Cluster, seed: int, mode: str) -> tuple[list[list[int]], float, float]:
  """DT-FM's released GCMA (scheduler/heuristic_evolutionary_solver/scheduler.py), unmodified, on this
  cluster's matrices; returns its best partition and the wall and CPU seconds it took. Glue only: it reads module
  globals peer_delay (ms) and peer_bandwidth (Gbit/s), and it overwrites random.seed / np.random.seed
  with ints (`random.seed = i`), so those are restored after the run."""
  src = os.path.join(peer_dir, 'scheduler', 'heuristic_evolutionary_solver')
  if not os.path.exists(os.path.join(src, 'scheduler.py')):
    raise HetjaxError(f'--peer_dir={peer_dir}: no scheduler/heuristic_evolutionary_solver/scheduler.py there')
  if cluster.n != 64:
    raise HetjaxError(f"the peer's scheduler is written for 64 devices (8 x 8), not {cluster.n}")
  sys.path.insert(0, src)
  saved = random.seed, np.random.seed
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      sched = importlib.import_module('scheduler')
    sched.peer_delay = cluster.delay_ms.copy()
    sched.peer_bandwidth = cluster.bandwidth_gbps.copy()
    random.seed(seed)
    np.random.seed(seed)
    t0, c0 = time.perf_counter(), time.process_time()
    parts, scores, _ = sched.GCMA(nodes=list(range(64)), population_size=100, trails=4900, mode=mode)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
  finally:
    random.seed, np.random.seed = saved
    sys.path.remove(src)
  best = parts[int(np.argmin(scores))]
  size = sched.partition_size
  return [sorted(int(d) for d in best[i:i + size]) for i in range(0, 64, size)], seconds, cpu


def peer_rows(name: str, cluster: Cluster, c_pp: float, c_dp: float, cache_path: str) -> list[dict]:
  """Peer runs for this scenario, from the cache file when already done (each run takes minutes)."""
  done = {}
  if os.path.exists(cache_path):
    with open(cache_path) as f:
      for line in f:
        r = json.loads(line)
        done[(r['scenario'], r['mode'], r['seed'])] = r
  rows = []
  for seed in range(FLAGS.peer_seeds):
    key = (name, FLAGS.peer_mode, seed)
    if key not in done and not FLAGS.peer_run_missing:
      continue
    if key not in done:
      print(f'{name:16s} peer ({FLAGS.peer_mode}) seed {seed}: running DT-FM\'s scheduler '
            f'(minutes) ...', flush=True)
      groups, seconds, cpu = run_peer(FLAGS.peer_dir, cluster, seed, FLAGS.peer_mode)
      done[key] = {'scenario': name, 'mode': FLAGS.peer_mode, 'seed': seed, 'groups': groups, 'seconds': seconds,
                   'cpu_seconds': cpu}
      with open(cache_path, 'a') as f:
        f.write(json.dumps(done[key]) + '\n')
    r = done[key]
    cost = cm.dtfm_cost(cluster, r['groups'], c_pp, c_dp)['total']
    rows.append({'scenario': name, 'method': 'peer' if FLAGS.peer_mode == 'default' else 'peer_hybrid',
                 'seed': seed, 'dtfm_cost_s': cost, 'evaluations': 5000, 'search_s': r['seconds'],
                 'search_cpu_s': r.get('cpu_seconds', float('nan'))})
  return rows


# ------------------------------------------------------------------ main
def run_method(name, cluster, model, setup, method, seed) -> dict:
  cfg = SearchConfig(method='dtfm' if method == 'dtfm_noseed' else method, evaluations=FLAGS.evaluations,
                     seeds=method != 'dtfm_noseed', seed_variants=FLAGS.seed_variants,
                     bundle_evaluations=FLAGS.bundle_evaluations, progress_s=0.0)
  t0, c0 = time.perf_counter(), time.process_time()
  plan = plan_training(cluster, model, setup, cfg, seed=seed, model_name=FLAGS.model)
  return {'scenario': name, 'method': method, 'seed': seed, 'dtfm_cost_s': plan.prediction['dtfm_cost'],
          'evaluations': plan.search.get('evaluations', 0), 'search_s': time.perf_counter() - t0,
          'search_cpu_s': time.process_time() - c0}


def main(argv):
  del argv
  os.makedirs(FLAGS.out, exist_ok=True)
  model = get_model_config(FLAGS.model)
  setup = cm.TrainSetup(global_batch=1024, seq_len=model.max_len, micro_batch_size=1, schedule='1f1b',
                        c_pp_bytes=FLAGS.c_pp_bytes or None, c_dp_bytes=FLAGS.c_dp_bytes or None)
  methods = [m for m in FLAGS.methods.split(',') if m]
  rows = []
  if FLAGS.table_only:
    methods = []
    for name in sorted(glob.glob(os.path.join(FLAGS.out, 'results*.csv'))):
      with open(name) as f:
        for r in csv.DictReader(f):
          if not r['method'].startswith('peer'):
            rows.append({k: (v if k in ('scenario', 'method') else float(v)) for k, v in r.items()})
  for name in FLAGS.scenarios.split(','):
    cluster = scenario(name)
    c_pp, c_dp = cm.dtfm_workload(model, setup, 8, cluster.n // 8)
    for method in methods:
      seeds = 1 if method in ('index', 'strided') else FLAGS.seeds if method == 'dtfm' else FLAGS.other_seeds
      for seed in range(seeds):
        row = run_method(name, cluster, model, setup, method, seed)
        rows.append(row)
        print(f"{name:16s} {method:12s} seed {seed}: DT-FM cost {row['dtfm_cost_s']:8.3f} s "
              f"({row['search_s']:.1f} s, {row['search_cpu_s']:.1f} s CPU, {row['evaluations']} candidates)",
              flush=True)
    if FLAGS.peer_dir:
      if FLAGS.table_only:
        FLAGS.peer_run_missing = False
      for row in peer_rows(name, cluster, c_pp, c_dp, os.path.join(FLAGS.out, 'peer_runs.jsonl')):
        rows.append(row)
        print(f"{name:16s} {row['method']:12s} seed {row['seed']}: DT-FM cost {row['dtfm_cost_s']:8.3f} s "
              f"({row['search_s']:.1f} s)", flush=True)
    if rows and not FLAGS.table_only:   # partial results survive an interrupted sweep
      write_csv(os.path.join(FLAGS.out, FLAGS.csv), rows)
  best = {}
  for r in rows:
    best[r['scenario']] = min(best.get(r['scenario'], np.inf), r['dtfm_cost_s'])
  for r in rows:
    r['best_known_s'] = best[r['scenario']]
    r['reached_best'] = int(r['dtfm_cost_s'] <= best[r['scenario']] * (1 + 1e-9))
  write_csv(os.path.join(FLAGS.out, 'table.csv' if FLAGS.table_only else FLAGS.csv), rows)
  plot(rows, FLAGS.out)
  print_table(rows, FLAGS.out)


def _group(rows, scen, method):
  return [r for r in rows if r['scenario'] == scen and r['method'] == method]


def plot(rows, out):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  scens = list(dict.fromkeys(r['scenario'] for r in rows))
  methods = list(dict.fromkeys(r['method'] for r in rows))
  fig, ax = plt.subplots(figsize=(12, 4))
  x = np.arange(len(scens))
  width = 0.8 / len(methods)
  for k, m in enumerate(methods):
    vals = [np.mean([r['dtfm_cost_s'] / r['best_known_s'] for r in _group(rows, s, m)] or [np.nan]) for s in scens]
    ax.bar(x + k * width, vals, width, label=m)
  ax.set_xticks(x + 0.4 - width / 2)
  ax.set_xticklabels(scens, rotation=20, fontsize=8)
  ax.set_ylabel('DT-FM cost / best known (mean over seeds)')
  ax.axhline(1.0, color='k', lw=0.5)
  ax.set_title('64 GPUs, 8 x 8: DT-FM communication cost of each plan as it runs')
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(out, 'cost_by_scenario.png'), dpi=110)
  plt.close(fig)


def print_table(rows, out):
  scens = list(dict.fromkeys(r['scenario'] for r in rows))
  methods = list(dict.fromkeys(r['method'] for r in rows))
  lines = [f'DT-FM cost (s, plan as it runs): mean over seeds [seeds reaching the best known / seeds] '
           f'(mean search CPU s). Files in {out}',
           f"{'scenario':16s}{'best':>8s}" + ''.join(f'{m:>24s}' for m in methods)]
  for s in scens:
    line = f'{s:16s}{_group(rows, s, methods[0])[0]["best_known_s"] if _group(rows, s, methods[0]) else np.nan:8.2f}'
    for m in methods:
      g = _group(rows, s, m)
      if not g:
        line += f'{"-":>24s}'
        continue
      cell = (f"{np.mean([r['dtfm_cost_s'] for r in g]):.2f} [{sum(r['reached_best'] for r in g)}/{len(g)}] "
              f"({np.mean([r['search_cpu_s'] for r in g]):.1f})")
      line += f'{cell:>24s}'
    lines.append(line)
  text = '\n'.join(lines)
  with open(os.path.join(out, 'table.txt'), 'w') as f:
    f.write(text + '\n')
  print(text)


if __name__ == '__main__':
  app.run(main)
