"""Serving across processes: continuous batching against static rounds, on the emulated testbed.

Reproduces: no paper table; issue 10's "continuous batching" (a finished sequence's slot is refilled
by a waiting request), measured where each stage of the replica is its own process.

  python experiments/serve_batching.py            # needs root (testbed); ~4 minutes (48 requests, 3 repeats)

One replica, one stage per process of the testbed scenario (hetjax.launch --emulate: a CPU quota
per process in proportion to its device's speed, shaped links, user-space latency), layers split
evenly. The same requests (random prompts, max_new_tokens drawn uniformly from
[--min_tokens, --max_tokens], all arriving at once, or Poisson at --rate) are served with
mode=serve twice per repeat, alternating: --config.batching=continuous (process 0 decides each
chunk's refills; the others replay them) and --config.batching=static (rounds: a round decodes
until its longest request is done). Static rounds leave a short request's slot idle until the
round's longest finishes; continuous batching refills it within the chunk.

Per run, from metrics.json: tokens/s over the run's wall time (compilation included, in both), p50
and p99 request latency. The ratio rows are continuous / static of the repeat medians. Writes
results.csv and serve_batching.png, prints the table last.
"""

import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import testbed  # the scenario table, cluster_file and launch (with its --cpus and --layers flags)
from common import print_table, save_figure, wrote, write_csv  # (sets sys.path)
from absl import app, flags
import numpy as np

flags.DEFINE_string('out', 'runs/serve_batching/', 'Output folder (results.csv, serve_batching.png, runs/).',
                    allow_override=True)
flags.DEFINE_string('scenario', 'two_even', 'Testbed scenario (experiments/testbed.py): one stage per process.')
flags.DEFINE_integer('requests', 48, 'Requests served per run.')
flags.DEFINE_integer('max_batch', 2, 'Requests per group (slots per group; each stage holds one group).')
flags.DEFINE_integer('min_tokens', 4, 'Fewest new tokens of a request.')
flags.DEFINE_integer('max_tokens', 32, 'Most new tokens of a request.')
flags.DEFINE_integer('prompt_len', 16, 'Prompt tokens per request (random ids).')
flags.DEFINE_float('rate', 0.0, 'Poisson arrivals per second (0: all arrive at once).')
flags.DEFINE_integer('chunk', 4, 'Continuous batching: decode steps per engine call.')
flags.DEFINE_integer('repeats', 3, 'Runs of each batching mode, alternating.', allow_override=True)
flags.DEFINE_string('transport', 'socket', 'Transport between processes (socket or pair).')
flags.DEFINE_integer('seed', 0, 'Seed of the requests.')
FLAGS = flags.FLAGS

MODES = ('continuous', 'static')


def write_requests(path, count, min_tokens, max_tokens, prompt_len, rate, seed):
  """`count` requests of random prompts; max_new_tokens uniform in [min_tokens, max_tokens];
  all arriving at 0, or Poisson at `rate` per second."""
  rng = np.random.default_rng(seed)
  arrivals = np.cumsum(rng.exponential(1 / rate, count)) if rate > 0 else np.zeros(count)
  with open(path, 'w') as f:
    for i, at in enumerate(arrivals):
      f.write(json.dumps({'id': str(i), 'ids': rng.integers(0, 256, prompt_len).tolist(),
                          'max_new_tokens': int(rng.integers(min_tokens, max_tokens + 1)),
                          'arrival_s': float(at)}) + '\n')


def save_plan(path, n, layers, max_batch):
  """One replica of n stages, stage i on device i, layers split as evenly as they go."""
  bounds = np.linspace(0, layers, n + 1).round().astype(int)
  stages = [{'layers': [int(a), int(b)], 'devices': [i]} for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]
  with open(path, 'w') as f:
    json.dump({'kind': 'serve', 'replicas': [{'stages': stages, 'max_batch': max_batch}]}, f)


def serve(cluster, n, plan, requests, mode, workdir):
  testbed.launch(cluster, n, ['--config=configs/serve.py', f'--config.plan={plan}',
                              f'--config.requests={requests}', f'--config.batching={mode}',
                              f'--config.chunk={FLAGS.chunk}', f'--config.transport={FLAGS.transport}',
                              '--config.generate.stop_at_eos=false'], workdir, f'serving ({mode})')
  metrics = json.load(open(os.path.join(workdir, 'metrics.json')))
  return {'tokens_per_s': metrics['tokens_per_s'], 'p50_s': metrics['latency_p50_s'],
          'p99_s': metrics['latency_p99_s'], 'seconds': metrics['seconds'], 'tokens': metrics['tokens']}


def plot(rows, path):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  runs = [r for r in rows if r['repeat'] != 'median']
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
  for ax, key, label in [(axes[0], 'tokens_per_s', 'tokens/s (higher is better)'),
                         (axes[1], 'p99_s', 'p99 latency s (lower is better)')]:
    for i, mode in enumerate(MODES):
      ys = [r[key] for r in runs if r['batching'] == mode]
      ax.scatter([i] * len(ys), ys, color=f'C{i}', zorder=3)
      ax.bar(i, statistics.median(ys), color=f'C{i}', alpha=0.4)
    ax.set_xticks(range(len(MODES)), MODES)
    ax.set_title(label)
  fig.suptitle(f'{FLAGS.scenario}: {FLAGS.requests} requests, {FLAGS.min_tokens}-{FLAGS.max_tokens} new '
               f'tokens, max_batch {FLAGS.max_batch} (dots: runs, bars: median)')
  fig.tight_layout()
  save_figure(fig, path)


def main(_):
  if os.geteuid() != 0:
    raise SystemExit('error: the testbed needs root (cgroups, network namespaces)')
  if FLAGS.scenario not in testbed.SCENARIOS:
    raise SystemExit(f'error: unknown scenario {FLAGS.scenario!r}; choose from {list(testbed.SCENARIOS)}')
  if not 1 <= FLAGS.min_tokens <= FLAGS.max_tokens or FLAGS.requests < 1 or FLAGS.repeats < 1:
    raise SystemExit('error: need 1 <= --min_tokens <= --max_tokens, --requests >= 1, --repeats >= 1')
  if FLAGS.transport not in ('socket', 'pair') or FLAGS.chunk < 1 or not np.isfinite(FLAGS.rate):
    raise SystemExit('error: --transport is socket or pair, --chunk >= 1, --rate finite')
  out = FLAGS.out
  work = os.path.join(out, 'runs')
  os.makedirs(work, exist_ok=True)
  cluster = os.path.join(work, f'{FLAGS.scenario}.json')
  n = testbed.cluster_file(cluster, FLAGS.scenario)
  if FLAGS.layers < n:
    raise SystemExit(f'error: --layers ({FLAGS.layers}) must be at least the {n} processes')
  plan, requests = os.path.join(work, 'plan.json'), os.path.join(work, 'requests.jsonl')
  save_plan(plan, n, FLAGS.layers, FLAGS.max_batch)
  write_requests(requests, FLAGS.requests, FLAGS.min_tokens, FLAGS.max_tokens, FLAGS.prompt_len,
                 FLAGS.rate, FLAGS.seed)
  print(f'machine load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores')
  rows = []
  for repeat in range(FLAGS.repeats):
    for mode in MODES:
      got = serve(cluster, n, plan, requests, mode, os.path.join(work, f'{mode}{repeat}'))
      rows.append({'scenario': FLAGS.scenario, 'batching': mode, 'repeat': repeat, **got,
                   'load': round(os.getloadavg()[0], 1)})
      write_csv(os.path.join(out, 'results.csv'), rows)
  medians = {}
  for mode in MODES:
    runs = [r for r in rows if r['batching'] == mode]
    medians[mode] = {k: statistics.median(r[k] for r in runs)
                     for k in ('tokens_per_s', 'p50_s', 'p99_s', 'seconds', 'tokens')}
    rows.append({'scenario': FLAGS.scenario, 'batching': mode, 'repeat': 'median', **medians[mode],
                 'load': ''})
  c, s = medians['continuous'], medians['static']
  rows.append({'scenario': FLAGS.scenario, 'batching': 'continuous / static', 'repeat': 'median',
               'tokens_per_s': c['tokens_per_s'] / s['tokens_per_s'], 'p50_s': c['p50_s'] / s['p50_s'],
               'p99_s': c['p99_s'] / s['p99_s'], 'seconds': c['seconds'] / s['seconds'],
               'tokens': c['tokens'] / s['tokens'], 'load': ''})
  write_csv(os.path.join(out, 'results.csv'), rows)
  plot(rows, os.path.join(out, 'serve_batching.png'))
  wrote(out, 'results.csv', 'serve_batching.png')
  print_table(rows, columns=['scenario', 'batching', 'repeat', 'tokens_per_s', 'p50_s', 'p99_s', 'seconds',
                             'tokens', 'load'])


if __name__ == '__main__':
  app.run(main)
