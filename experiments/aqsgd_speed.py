"""AQ-SGD step-time speed-up over fp32 on emulated links, multi-controller (one process per stage).

Reproduces: AQ-SGD's end-to-end speed-up (Wang et al. 2022, training throughput over slower and
slower links): >= 4.3x over fp32 at 100 Mbit/s and <= 5% overhead on a fast network -- measured
here with CPU processes, whose compute is about 1000x slower than the paper's GPUs.

  python experiments/aqsgd_speed.py            # needs root (namespaces, tc, cgroups); ~15 min

Two processes, each pinned to its own core at a full-core quota (the launcher's testbed,
hetjax.testbed cgroups), in their own network namespaces joined by one veth link (hetjax.netem):
unshaped, then tbf-shaped to each --mbits rate; latency 0 (no netem here). A 2-stage GPT (one
layer per stage, untied embeddings, so only the stage boundary crosses the link) trains with
  fp32          activations and gradients in fp32;
  aqsgd4        --config.pipeline.codec=aqsgd4 --config.pipeline.grad_codec=8 (fw4/bw8);
  aqsgd4+dp4    the same plus --config.dp.grad_bits=4 on a plan with 2 data-parallel replicas
                (each process holds one replica of each stage, so each stage's gradient
                reduction crosses the link), compared with fp32_dp2 on that same plan. It needs
                the pipeline's DP gradient compression (branch i11grad): where the config rejects
                the flag, or the flag changes nothing (losses equal aqsgd4_dp2's exactly), the DP
                arms are skipped with the reason printed.
Communication dominates at *narrow* widths on a CPU: bytes per token grow with hidden, compute
with hidden^2 (and the vocabulary head), so the default is hidden = ffn = 128, one layer per stage,
4 micro-batches of 8 x 128 tokens (4.2 MB per step in fp32). Even so, a message's link time only
shows in the step time when it exceeds the other stage's compute for a micro-batch (the sender's
socket takes the data at once and the 1F1B pipeline overlaps the rest): on this CPU that happens
below ~100 Mbit/s, so 10 Mbit/s is added to show the communication-bound regime that 100 Mbit/s
is for the paper's GPUs.
The training set is tiny (--warmup_steps steps per epoch), so AQ-SGD's full-precision first epoch
ends fast; only steps after it and after the compressed path's compilation are timed, the same
steps for every arm. Speed-up = fp32's median (and min) step time over the arm's, same link, same
plan, measured side by side in one run. Writes results.csv and aqsgd_speed.png; prints `uptime`
(the machine is shared: other load lands on the pinned cores too) and the table last.
"""

import gzip
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import ROOT, print_table, save_figure, wrote, write_csv  # (sets sys.path)
from absl import app, flags
import numpy as np

flags.DEFINE_string('out', 'runs/aqsgd_speed/', 'Output folder (results.csv, aqsgd_speed.png, runs/).')
flags.DEFINE_list('mbits', ['1000', '500', '100', '10'],
                  'Shaped link rates (Mbit/s); unshaped always runs first.')
flags.DEFINE_list('arms', ['fp32', 'aqsgd4', 'aqsgd4+dp4'],
                  'Codec arms: fp32, aqsgd4 (fw4/bw8) on one replica; aqsgd4+dp4 on two replicas '
                  '(it also runs fp32_dp2 and aqsgd4_dp2, its baselines on the same plan).')
flags.DEFINE_integer('hidden', 128, 'Model width: the exchanged activation is micro x seq x hidden.')
flags.DEFINE_integer('ffn', 128, 'MLP width (0: the preset 4 x hidden); narrow keeps compute small.')
flags.DEFINE_integer('seq_len', 128, 'Tokens per sequence.')
flags.DEFINE_integer('micro_batches', 4, 'Micro-batches per step.')
flags.DEFINE_integer('micro_batch_size', 8, 'Sequences per micro-batch (per replica).')
flags.DEFINE_integer('warmup_steps', 2, 'Steps in one epoch of the tiny training set (AQ-SGD warm-up).')
flags.DEFINE_integer('timed_steps', 10, 'Steps timed after warm-up and compilation.')
flags.DEFINE_integer('timeout', 600, 'Seconds one run may take before it is stopped.')
FLAGS = flags.FLAGS

ARMS = {  # name: (replicas, extra config)
    'fp32': (1, []),
    'aqsgd4': (1, ['--config.pipeline.codec=aqsgd4', '--config.pipeline.grad_codec=8']),
    'fp32_dp2': (2, []),
    'aqsgd4_dp2': (2, ['--config.pipeline.codec=aqsgd4', '--config.pipeline.grad_codec=8']),
    'aqsgd4+dp4': (2, ['--config.pipeline.codec=aqsgd4', '--config.pipeline.grad_codec=8',
                       '--config.dp.grad_bits=4']),
}
BASELINE = {1: 'fp32', 2: 'fp32_dp2'}
COMPILE_STEPS = 2  # after warm-up: the compressed path compiles on its first steps


def write_plan(path, replicas):
  """Two stages of one layer each. One replica: stage s on process s. Two replicas: each process
  holds devices 2p, 2p+1 and one replica of each stage (replica 1 runs stage 0 on process 1)."""
  from hetjax.plan import Plan, Replica, Stage
  if replicas == 1:
    reps = [Replica([Stage(0, 1, [0]), Stage(1, 2, [1])])]
  else:
    reps = [Replica([Stage(0, 1, [0]), Stage(1, 2, [2])]), Replica([Stage(0, 1, [3]), Stage(1, 2, [1])])]
  Plan(reps, num_layers=2, micro_batches=FLAGS.micro_batches,
       micro_batch_size=FLAGS.micro_batch_size, seq_len=FLAGS.seq_len).save(path)


def write_corpus(path, samples):
  """The first bytes of the shipped corpus: `samples` training windows (+ 5% validation)."""
  from hetjax.data import DEFAULT_CORPUS
  need = int((samples * FLAGS.seq_len + 2) / 0.95) + 8
  with gzip.open(DEFAULT_CORPUS) as f:
    text = f.read()[:need]
  with open(path, 'wb') as f:
    f.write(text)


def command(arm, plan_path, corpus, workdir):
  replicas, extra = ARMS[arm]
  batch = FLAGS.micro_batches * FLAGS.micro_batch_size * replicas
  steps = FLAGS.warmup_steps + COMPILE_STEPS + FLAGS.timed_steps
  return [sys.executable, 'run.py', '--config=configs/train.py', f'--config.workdir={workdir}',
          f'--config.pipeline.plan={plan_path}', f'--config.data.path={corpus}',
          '--config.model=tiny_gpt', '--config.model_overrides.num_layers=2',
          f'--config.model_overrides.hidden={FLAGS.hidden}',
          *([f'--config.model_overrides.ffn={FLAGS.ffn}'] if FLAGS.ffn else []),
          '--config.model_overrides.tie_embeddings=false', f'--config.train.steps={steps}',
          f'--config.train.batch_size={batch}', f'--config.train.seq_len={FLAGS.seq_len}',
          '--config.train.eval_every=0', '--config.train.log_every=1',
          '--config.aqsgd.warmup_epochs=1', '--config.aqsgd.buffers=host', *extra]


def run_arm(arm, bed, plans, corpus, workdir, log):
  """Launch the arm's two processes on the testbed; its metrics records, or an error string."""
  from hetjax.launch import launch
  import shutil
  shutil.rmtree(workdir, ignore_errors=True)
  replicas = ARMS[arm][0]
  env_xla = os.environ.pop('XLA_FLAGS', None)
  try:
    code = launch(command(arm, plans[replicas], corpus[replicas], workdir), 2, [replicas] * 2, network=bed,
                  timeout_s=FLAGS.timeout, logs=os.path.join(workdir, 'launch'), out=log, err=log)
  finally:
    if env_xla is not None:
      os.environ['XLA_FLAGS'] = env_xla
  if code:
    lines = open(os.path.join(workdir, 'launch', 'p0.log')).read().splitlines()
    errors = [l for l in lines if l.startswith('error:')]
    return errors[-1] if errors else f'exit code {code} (logs: {workdir}/launch)'
  return [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl')) if '"loss"' in l]


def testbed(mbits):
  """Namespaces + a veth link (tbf-shaped unless mbits is None) + one full core per process."""
  from hetjax import netem, testbed as tb
  gbps = np.inf if mbits is None else mbits / 1000.0
  network = netem.EmulatedNetwork(np.array([[np.inf, gbps], [gbps, np.inf]]))
  shares = tb.plan_quotas([1.0, 1.0], 2.0, sorted(os.sched_getaffinity(0)))
  return network, tb.ComputeQuotas(shares)


def arms_to_run(requested, skipped):
  """The requested arms in run order; the compressed-DP arm brings its two baselines (same plan),
  the uncompressed one first, so that the probe in dp_arm_problem can compare losses."""
  order = []
  for arm in requested:
    if arm == 'aqsgd4+dp4':
      order += ['aqsgd4_dp2', 'aqsgd4+dp4', 'fp32_dp2']
    else:
      order.append(arm)
  return [a for a in dict.fromkeys(order) if a not in skipped]


def dp_arm_problem(arm, rec, results):
  """Why the compressed-DP arm cannot be measured on this branch ('' when it can)."""
  if ARMS[arm][0] != 2:
    return ''
  if isinstance(rec, str):
    return f'the run failed: {rec}'
  if arm == 'aqsgd4+dp4' and [r['loss'] for r in rec] == [r['loss'] for r in results['aqsgd4_dp2']]:
    return ('--config.dp.grad_bits=4 changed nothing (the losses equal the uncompressed DP run\'s '
            'exactly): the pipeline ignores the flag on this branch (it needs branch i11grad)')
  return ''


def codec_work_s(reps=30):
  """Seconds of AQ-SGD work per training step, in this process, min over `reps` (load only adds
  time): per micro-batch, the sender's row read + delta encode + row write, the receiver's row
  read + delta decode + row write (host fp16 buffers), and the 8-bit gradient encode + decode;
  minus the same micro-batch through the fp32 Identity codec. The overhead AQ-SGD adds when the
  link is free, measured without the noise of two loaded processes."""
  import time
  import jax
  from hetjax.compression.aqsgd import AQSGD
  from hetjax.compression.buffers import BufferStore
  from hetjax.compression.codecs import Identity, make_codec
  piece = (FLAGS.micro_batch_size, FLAGS.seq_len, FLAGS.hidden)
  x = jax.random.normal(jax.random.key(0), piece)
  ids = np.arange(piece[0])
  store = BufferStore(piece[0], 'host', 'float16', say=lambda *a: None)
  for side in ('send', 'recv'):
    store.scatter(side, ids, np.asarray(x, np.float16))

  def timed(act, grad, stateful):
    enc, dec = jax.jit(act.encode), jax.jit(act.decode)
    genc, gdec = jax.jit(grad.encode), jax.jit(grad.decode)

    def once():
      m = store.gather('send', ids) if stateful else None
      wire, new = enc(x, m)
      if stateful:
        store.scatter('send', ids, new)
      m = store.gather('recv', ids) if stateful else None
      out, new = dec(wire, m)
      if stateful:
        store.scatter('recv', ids, new)
      g, _ = gdec(genc(x, None)[0], None)
      jax.block_until_ready((out, g))
    once()  # compile
    best = np.inf
    for _ in range(reps):
      t0 = time.perf_counter()
      once()
      best = min(best, time.perf_counter() - t0)
    return best
  per_micro = timed(AQSGD(4), make_codec('8'), True) - timed(Identity(), Identity(), False)
  return per_micro * FLAGS.micro_batches


def uptime():
  return subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()


def main(_):
  from hetjax import testbed as tb
  if os.geteuid() != 0:
    raise SystemExit('error: this experiment needs root (network namespaces, tc, cgroups)')
  if len(os.sched_getaffinity(0)) < 2:
    raise SystemExit('error: two cores are needed (one per process, never shared)')
  out = os.path.abspath(FLAGS.out)
  os.makedirs(out, exist_ok=True)
  os.chdir(ROOT)  # the launched command is `python run.py --config=configs/train.py ...`
  unknown = [a for a in FLAGS.arms if a not in ARMS]
  if unknown:
    raise SystemExit(f'error: unknown arms {unknown}; choose from {list(ARMS)}')
  plans = {r: os.path.join(out, f'plan_dp{r}.json') for r in (1, 2)}
  for r, p in plans.items():
    write_plan(p, r)
  corpus = {r: os.path.join(out, f'corpus_dp{r}.txt') for r in (1, 2)}
  for r, path in corpus.items():  # one epoch = warmup_steps steps of r replicas' batch
    write_corpus(path, FLAGS.warmup_steps * FLAGS.micro_batches * FLAGS.micro_batch_size * r)
  loads = [uptime()]
  print(f'machine load at start: {loads[0]}', flush=True)
  first = FLAGS.warmup_steps + COMPILE_STEPS  # records[first:] are the timed steps
  rows, skipped = [], {}
  log = open(os.path.join(out, 'launch.log'), 'w')
  for mbits in [None] + [float(m) for m in FLAGS.mbits]:
    link = 'unshaped' if mbits is None else f'{mbits:g} Mbit/s'
    network, quotas = testbed(mbits)
    with network, quotas:
      bed = tb.Testbed(network, quotas, np.zeros((2, 2)))
      results = {}
      for arm in arms_to_run(FLAGS.arms, skipped):
        if arm in skipped:
          continue
        print(f'{link:>13} {arm:>11}: running ...', flush=True)
        rec = run_arm(arm, bed, plans, corpus, os.path.join(out, 'runs', f'{link.split()[0]}_{arm}'), log)
        why = dp_arm_problem(arm, rec, results)
        if why:
          skipped.update({a: why for a in ARMS if ARMS[a][0] == 2})
          print(f'  skipping the data-parallel arms: {why}', flush=True)
          continue
        if isinstance(rec, str):
          raise SystemExit(f'error: {link} {arm} failed: {rec}')
        results[arm] = rec
        times = np.array([r['step_time_s'] for r in rec[first:]])
        rows.append({'link': link, 'arm': arm, 'replicas': ARMS[arm][0],
                     'median_step_s': float(np.median(times)), 'min_step_s': float(times.min()),
                     'max_step_s': float(times.max()),
                     'bytes_per_step': int(rec[-1]['bytes_sent']),
                     'warmup_bytes_per_step': int(rec[0]['bytes_sent']),
                     'final_loss': float(rec[-1]['loss'])})
        print(f'{link:>13} {arm:>11}: median {rows[-1]["median_step_s"]:.3f} s/step, '
              f'{rows[-1]["bytes_per_step"] / 1e6:.3f} MB/step', flush=True)
    rows = [r for r in rows if r['arm'] not in skipped]
    loads.append(uptime())
  log.close()
  if not rows:
    raise SystemExit('error: nothing was measured' + ''.join(f'; {a}: {w}' for a, w in skipped.items()))
  for r in rows:  # against fp32 on the same link and plan (nan where that baseline did not run)
    base = next((b for b in rows if b['link'] == r['link'] and b['arm'] == BASELINE[r['replicas']]),
                {k: np.nan for k in r})
    r['speedup_vs_fp32'] = base['median_step_s'] / r['median_step_s']
    r['speedup_of_min'] = base['min_step_s'] / r['min_step_s']  # contention only adds time
    r['bytes_ratio_vs_fp32'] = base['bytes_per_step'] / r['bytes_per_step']
  work = codec_work_s()
  fp32_free = next((r for r in rows if r['link'] == 'unshaped' and r['arm'] == 'fp32'), None)
  for r in rows:
    r['codec_work_s'] = work if r['arm'].startswith('aqsgd4') else 0.0
  write_csv(os.path.join(out, 'results.csv'), rows)
  plot(rows, os.path.join(out, 'aqsgd_speed.png'))
  wrote(out, 'results.csv', 'aqsgd_speed.png')
  for why in dict.fromkeys(skipped.values()):
    print(f'skipped {", ".join(a for a in skipped if skipped[a] == why)}: {why}')
  if fp32_free:
    print(f'AQ-SGD codec work (in process, min of 30): {work * 1e3:.1f} ms per step = '
          f'{100 * work / fp32_free["min_step_s"]:.1f}% of the fastest unshaped fp32 step '
          f'({fp32_free["min_step_s"]:.3f} s): the overhead to expect on a free link')
  print('machine load (uptime) at start and after each link:')
  for l in loads:
    print(f'  {l}')
  print(f'\nspeed-up = median fp32 step time / median step time, steps {first + 1}..'
        f'{first + FLAGS.timed_steps} (after the warm-up epoch and {COMPILE_STEPS} compile steps); '
        'goals (paper): >= 4.3x at 100 Mbit/s, <= 5% overhead unshaped')
  print_table(rows, columns=['link', 'arm', 'median_step_s', 'speedup_vs_fp32', 'min_step_s',
                             'speedup_of_min', 'bytes_per_step', 'bytes_ratio_vs_fp32'])


def plot(rows, path):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  links = list(dict.fromkeys(r['link'] for r in rows))
  arms = list(dict.fromkeys(r['arm'] for r in rows))
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  width = 0.8 / len(arms)
  x = np.arange(len(links))
  for i, arm in enumerate(arms):
    get = lambda k: [next((r[k] for r in rows if r['link'] == l and r['arm'] == arm), np.nan)
                     for l in links]
    axes[0].bar(x + i * width, get('median_step_s'), width, label=arm)
    axes[1].bar(x + i * width, get('speedup_vs_fp32'), width, label=arm)
  for ax, label in zip(axes, ('median step time (s)', 'speed-up over fp32 (same replicas)')):
    ax.set_xticks(x + 0.4 - width / 2, links)
    ax.set_ylabel(label)
  axes[1].axhline(4.3, color='gray', ls='--', lw=0.8, label='paper: 4.3x at 100 Mbit/s')
  axes[1].axhline(0.95, color='gray', ls=':', lw=0.8, label='paper: <= 5% overhead')
  axes[1].legend(fontsize=7)
  axes[0].set_title('AQ-SGD fw4/bw8 vs fp32, 2 processes, 1 core each')
  save_figure(fig, path, dpi=100)


if __name__ == '__main__':
  app.run(main)
