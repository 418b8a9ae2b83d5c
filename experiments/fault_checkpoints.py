"""Faults around checkpoints, measured as a user meets them (issue 14).

Reproduces: no paper table; the reliability figures of issue 14.

python experiments/fault_checkpoints.py [--out=runs/fault_checkpoints/] [--kills=4] [--format=npz]

--format picks the checkpoint format under test: 'npz' (a multi-controller run: 2 processes joined
by hetjax.launch, a 2-stage plan, each process writing its stage to <step>/<item>.npz plus
<step>/meta.json) or 'orbax' (a one-process run: orbax items <step>/meta/ and <step>/stage*/).

1. Corruption: a 30-step run saves steps 10, 20, 30; step 30 is removed (as if the run was stopped
   after its step-20 checkpoint) and the step-20 checkpoint is damaged one way per
   variant and the run is restarted to step 30. Outcome per variant: the exit code, whether the
   output names the damage in one line, the step it resumed from, and whether its losses equal an
   uninterrupted 30-step run's (exact resume). Also: every step damaged (must end in one error).
2. Kill and resume (one-process runs only): a 60-step run (checkpoints every 20) is SIGKILLed once its metrics.jsonl holds
   a random number of rows (1-59: before and after the first checkpoint), then rerun; the resumed
   metrics.jsonl must equal the uninterrupted run's, row for row.
Writes corruption.csv, kills.csv and fault_checkpoints.png; prints both tables last.
"""

import glob
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from experiments.common import print_table, write_csv  # noqa: E402

flags.DEFINE_string('out', 'runs/fault_checkpoints/', 'output folder')
flags.DEFINE_integer('kills', 4, 'kill-and-resume tries')
flags.DEFINE_integer('seed', 0, 'seed for kill times and random bytes')
flags.DEFINE_bool('corruption', True, 'run the corruption variants (part 1)')
flags.DEFINE_list('variants', [], 'run only these corruption variants (names as in the table)')
flags.DEFINE_enum('format', 'npz', ['npz', 'orbax'],
                  "checkpoint format: 'npz' (2 processes, per-process files) or 'orbax' (1 process)")
FLAGS = flags.FLAGS
PROCESS_PREFIX = re.compile(r'^\[p\d+\] ')  # the launcher's prefix on each process's lines


def plan_path():
  """The 2-stage plan of the npz runs (one stage per process), written once into --out."""
  from hetjax.plan import Plan, Replica, Stage
  path = os.path.abspath(os.path.join(FLAGS.out, 'plan.json'))
  if not os.path.exists(path):
    Plan([Replica([Stage(0, 1, [0]), Stage(1, 2, [1])])], num_layers=2, micro_batches=2,
         micro_batch_size=2).save(path)
  return path


def train_cmd(workdir, steps, every):
  cmd = []
  if FLAGS.format == 'npz':
    cmd = [sys.executable, '-m', 'hetjax.launch', '-n', '2', '--devices=1', '--grace=5',
           '--timeout=300', '--']
  return cmd + [sys.executable, 'run.py', '--config=configs/train.py', f'--config.workdir={workdir}',
          '--config.model_overrides.num_layers=2', '--config.model_overrides.hidden=32',
          f'--config.train.steps={steps}', '--config.train.batch_size=4',
          '--config.train.seq_len=32', '--config.train.warmup_steps=5',
          '--config.train.log_every=1', '--config.train.eval_every=0',
          f'--config.ckpt.every={every}', '--config.ckpt.keep=3'] + (
              [f'--config.pipeline.plan={plan_path()}'] if FLAGS.format == 'npz' else [])


def run(workdir, steps, every=10):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  p = subprocess.run(train_cmd(workdir, steps, every), cwd=ROOT, capture_output=True, text=True,
                     timeout=600, env=env)
  text = p.stdout + p.stderr
  return p.returncode, '\n'.join(PROCESS_PREFIX.sub('', l) for l in text.splitlines())


def losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return {r['step']: r['loss'] for r in map(json.loads, f) if 'loss' in r}


def data_files(step_dir):
  """The step's tensor files, smallest first."""
  if FLAGS.format == 'npz':
    return sorted(glob.glob(os.path.join(step_dir, '*.npz')), key=os.path.getsize)
  found = []
  for root, _, files in os.walk(step_dir):
    found += [os.path.join(root, f) for f in files if os.sep + 'd' + os.sep in os.path.join(root, f) + os.sep
              and os.path.basename(root) == 'd']
  return sorted(found, key=os.path.getsize)


def overwrite(path, data, offset=None):
  size = os.path.getsize(path)
  offset = size // 2 - len(data) // 2 if offset is None else offset
  with open(path, 'r+b') as f:
    f.seek(max(offset, 0))
    f.write(data[:size])


def stage_dir(step_dir):
  return next(os.path.join(step_dir, d) for d in os.listdir(step_dir) if d.startswith('stage'))


def variants(rng):
  big = lambda d: data_files(d)[-1]
  if FLAGS.format == 'npz':
    meta = lambda d: os.path.join(d, 'meta.json')
    p1 = lambda d: glob.glob(os.path.join(d, 'p1_*.npz'))[0]  # process 0 reads its own file intact
    return {
        'truncated stage file': lambda d: os.truncate(big(d), os.path.getsize(big(d)) // 2),
        'truncated file of process 1': lambda d: os.truncate(p1(d), os.path.getsize(p1(d)) // 2),
        'emptied stage file': lambda d: os.truncate(big(d), 0),
        'random bytes in stage file': lambda d: overwrite(big(d), rng.randbytes(256)),
        'NaN bytes in stage file': lambda d: overwrite(big(d), b'\xff' * 256),
        'deleted stage file': lambda d: os.remove(big(d)),
        'deleted all stage files': lambda d: [os.remove(f) for f in data_files(d)],
        'garbage meta.json': lambda d: overwrite(meta(d), b'{{garbage', 0),
        'truncated meta.json': lambda d: os.truncate(meta(d), os.path.getsize(meta(d)) // 2),
        'meta.json of another step': lambda d: shutil.copy(meta(os.path.join(d, '..', '10')), meta(d)),
        'deleted meta.json': lambda d: os.remove(meta(d)),
        'empty step folder': lambda d: [os.remove(os.path.join(d, x)) for x in os.listdir(d)],
    }
  return {
      'truncated data file': lambda d: os.truncate(big(d), os.path.getsize(big(d)) // 2),
      'emptied data file': lambda d: os.truncate(big(d), 0),
      'random bytes in data file': lambda d: overwrite(big(d), rng.randbytes(256)),
      'NaN bytes in data file': lambda d: overwrite(big(d), b'\xff' * 256),
      'deleted meta/metadata': lambda d: os.remove(os.path.join(d, 'meta', 'metadata')),
      'garbage meta/metadata': lambda d: overwrite(os.path.join(d, 'meta', 'metadata'), b'{{garbage', 0),
      'garbage _CHECKPOINT_METADATA': lambda d: overwrite(os.path.join(d, '_CHECKPOINT_METADATA'), b'{{x', 0),
      'garbage stage _METADATA': lambda d: overwrite(os.path.join(stage_dir(d), '_METADATA'), b'{{x', 0),
      'deleted manifest.ocdbt': lambda d: os.remove(os.path.join(stage_dir(d), 'manifest.ocdbt')),
      'deleted process manifest': lambda d: os.remove(
          os.path.join(stage_dir(d), 'ocdbt.process_0', 'manifest.ocdbt')),
      'deleted stage item': lambda d: shutil.rmtree(stage_dir(d)),
      'deleted data files': lambda d: [os.remove(f) for f in data_files(d)],
      'empty step folder': lambda d: [shutil.rmtree(os.path.join(d, x)) if os.path.isdir(os.path.join(d, x))
                                      else os.remove(os.path.join(d, x)) for x in os.listdir(d)],
  }


def traceback_in(text):
  return 'Traceback (most recent call last)' in text


def corruption(out, rng):
  ref = os.path.join(out, 'reference')
  shutil.rmtree(ref, ignore_errors=True)
  rc, text = run(ref, 30)
  assert rc == 0, text[-3000:]
  want = losses(ref)
  base = os.path.join(out, 'base')  # the same run as if stopped after its step-20 checkpoint
  shutil.rmtree(base, ignore_errors=True)
  shutil.copytree(ref, base)
  shutil.rmtree(os.path.join(base, 'checkpoints', '30'))
  rows = []
  cases = list(variants(rng).items()) + [('every step damaged', None)]
  if FLAGS.variants:
    cases = [(name, damage) for name, damage in cases if name in FLAGS.variants]
  for name, damage in cases:
    print(f'corruption: {name} ...', flush=True)
    wd = os.path.join(out, 'case')
    shutil.rmtree(wd, ignore_errors=True)
    shutil.copytree(base, wd)
    if damage is None:
      for step in ('10', '20'):
        os.truncate(data_files(os.path.join(wd, 'checkpoints', step))[-1], 0)
    else:
      damage(os.path.join(wd, 'checkpoints', '20'))
    rc, text = run(wd, 30)
    lines = [l for l in text.splitlines() if 'checkpoint' in l and ('warning' in l or 'error' in l)]
    resumed = next((int(l.split()[-1]) for l in text.splitlines() if l.startswith('resumed from')), None)
    exact = rc == 0 and all(losses(wd).get(s) == want[s] for s in want)
    rows.append({'variant': name, 'exit_code': rc, 'traceback': traceback_in(text),
                 'reported': len(lines) > 0, 'resumed_from': resumed if resumed is not None else '-',
                 'fell_back': resumed == 10,
                 'exact': exact, 'message': (lines[0] if lines else text.strip().splitlines()[-1])[:160]})
  return rows


def kills(out, rng, tries):
  ref = os.path.join(out, 'kill_reference')
  shutil.rmtree(ref, ignore_errors=True)
  assert run(ref, 60, every=20)[0] == 0
  want = open(os.path.join(ref, 'metrics.jsonl')).read().splitlines()
  want_loss = [json.loads(l)['loss'] for l in want]
  rng = random.Random(FLAGS.seed)
  rows = []
  for k in range(tries):
    wd = os.path.join(out, f'kill{k}')
    shutil.rmtree(wd, ignore_errors=True)
    at_rows = rng.randint(1, 59)
    print(f'kill {k}: SIGKILL once {at_rows} rows are logged ...', flush=True)
    p = subprocess.Popen(train_cmd(wd, 60, 20), cwd=ROOT, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    path = os.path.join(wd, 'metrics.jsonl')
    while p.poll() is None and not (os.path.exists(path) and
                                    open(path).read().count('\n') >= at_rows):
      time.sleep(0.002)
    p.send_signal(signal.SIGKILL)
    killed_rc = p.wait()
    logged = len(open(os.path.join(wd, 'metrics.jsonl')).read().splitlines()) \
        if os.path.exists(os.path.join(wd, 'metrics.jsonl')) else 0
    ckpts = sorted(int(s) for s in os.listdir(os.path.join(wd, 'checkpoints')) if s.isdigit()) \
        if os.path.isdir(os.path.join(wd, 'checkpoints')) else []
    rc, text = run(wd, 60, every=20)
    got = open(os.path.join(wd, 'metrics.jsonl')).read().splitlines() if rc == 0 else []
    got_loss = [json.loads(l)['loss'] for l in got]
    rows.append({'try': k, 'kill_at_row': at_rows, 'killed_rc': killed_rc,
                 'rows_before': logged, 'ckpt_before': ckpts[-1] if ckpts else '-', 'exit_code': rc,
                 'rows_after': len(got), 'exact': got_loss == want_loss})
  return rows


def draw(rows, path):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1))
  colour = {True: 'tab:green', False: 'tab:red'}
  for i, r in enumerate(rows):
    ok = r['exact'] or (r['variant'] == 'every step damaged' and r['exit_code'] == 2
                        and not r['traceback'])
    ax.barh(i, 1, color=colour[ok])
    ax.text(0.02, i, f"{r['variant']}: rc={r['exit_code']} resumed={r['resumed_from']}", va='center')
  ax.set_yticks([])
  ax.set_xticks([])
  ax.set_title('damaged latest checkpoint -> outcome (green: exact resume, or one error if none intact)')
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def main(argv):
  del argv
  out = FLAGS.out
  os.makedirs(out, exist_ok=True)
  rng = random.Random(FLAGS.seed)
  c_rows = corruption(out, rng) if FLAGS.corruption else []
  if c_rows:
    write_csv(os.path.join(out, 'corruption.csv'), c_rows)
    draw(c_rows, os.path.join(out, 'fault_checkpoints.png'))
  k_rows = kills(out, rng, FLAGS.kills) if FLAGS.kills and FLAGS.format == 'orbax' else []
  if k_rows:
    write_csv(os.path.join(out, 'kills.csv'), k_rows)
  if c_rows:
    print_table([{k: v for k, v in r.items() if k != 'message'} for r in c_rows])
    for r in c_rows:
      print(f"  {r['variant']}: {r['message']}")
  if k_rows:
    print_table(k_rows)


if __name__ == '__main__':
  app.run(main)
