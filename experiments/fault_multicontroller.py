"""A lost process in a multi-controller run: detection time and whether the launcher names it.

Reproduces: no paper table; the launcher figures of issue 14.

python experiments/fault_multicontroller.py [--out=runs/fault_multicontroller/] [--tries=2]

A 3-process pipeline run (one stage per process, gloo) is started through hetjax.launch; once
training is under way, process k (cycling 0..2) gets SIGKILL or SIGSTOP. Per try: the signal, the
victim, seconds from the signal to the launcher's exit, the process the launcher named, whether that
is the victim, and how many stderr lines the launcher printed. Writes faults.csv and
fault_multicontroller.png; prints the table last.
"""

import os
import re
import signal
import subprocess
import sys
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from experiments.common import print_table, write_csv  # noqa: E402
from hetjax.plan import Plan, Replica, Stage  # noqa: E402

flags.DEFINE_string('out', 'runs/fault_multicontroller/', 'output folder')
flags.DEFINE_integer('tries', 2, 'tries per signal (SIGKILL, SIGSTOP)')
flags.DEFINE_float('stall', 10.0, "the launcher's --stall (seconds a frozen process may stay frozen)")
FLAGS = flags.FLAGS


def launch_cmd(plan_path, workdir):
  return [sys.executable, '-m', 'hetjax.launch', '-n', '3', '--devices=1', '--timeout=400',
          f'--stall={FLAGS.stall}', '--', sys.executable, 'run.py', '--config=configs/train.py',
          f'--config.pipeline.plan={plan_path}', '--config.model_overrides.num_layers=6',
          '--config.train.steps=100000', '--config.train.batch_size=8', '--config.train.seq_len=32',
          '--config.train.eval_every=0', '--config.train.log_every=1', f'--config.workdir={workdir}']


def member_pid(launcher_pid, index):
  for entry in os.listdir('/proc'):
    if not entry.isdigit():
      continue
    try:
      with open(f'/proc/{entry}/stat') as f:
        parent = int(f.read().rsplit(')', 1)[1].split()[1])
      environ = open(f'/proc/{entry}/environ', 'rb').read()
    except (OSError, IndexError, ValueError):
      continue
    if parent == launcher_pid and f'HETJAX_PROCESS_ID={index}\0'.encode() in environ:
      return int(entry)
  raise RuntimeError(f'process {index} not found')


def one_try(out, k, sig, victim):
  plan_path = os.path.join(out, 'plan.json')
  Plan([Replica([Stage(0, 2, [0]), Stage(2, 4, [1]), Stage(4, 6, [2])])], num_layers=6,
       micro_batches=4, micro_batch_size=2).save(plan_path)
  workdir = os.path.join(out, f'try{k}')
  env = {key: v for key, v in os.environ.items() if key != 'XLA_FLAGS'}
  proc = subprocess.Popen(launch_cmd(plan_path, workdir), cwd=ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  metrics = os.path.join(workdir, 'metrics.jsonl')
  while not (os.path.exists(metrics) and os.path.getsize(metrics) > 0):
    if proc.poll() is not None:
      raise RuntimeError(f'the run ended before training: {proc.stderr.read()[-2000:]}')
    time.sleep(0.5)
  time.sleep(2)
  os.kill(member_pid(proc.pid, victim), sig)
  t0 = time.monotonic()
  _, stderr = proc.communicate(timeout=600)
  seconds = time.monotonic() - t0
  with open(os.path.join(workdir, 'launcher_stderr.txt'), 'w') as f:
    f.write(stderr)
  named = re.search(r'^error: process (\d+) ', stderr, re.M)
  named = int(named.group(1)) if named else -1
  return {'signal': signal.Signals(sig).name, 'victim': victim, 'detect_s': round(seconds, 1),
          'named': named, 'right': named == victim, 'stderr_lines': len(stderr.splitlines()),
          'exit_code': proc.returncode}


def draw(rows, path):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 3))
  for name, colour in (('SIGKILL', 'tab:red'), ('SIGSTOP', 'tab:blue')):
    xs = [i for i, r in enumerate(rows) if r['signal'] == name]
    ax.bar(xs, [rows[i]['detect_s'] for i in xs], color=colour, label=name)
  ax.set_xticks(range(len(rows)), [f"p{r['victim']}{'' if r['right'] else ' (wrong)'}" for r in rows])
  ax.set_ylabel('signal -> launcher exit (s)')
  ax.set_title('lost process in a 3-process run: detection time')
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def main(argv):
  del argv
  os.makedirs(FLAGS.out, exist_ok=True)
  rows = []
  for sig in (signal.SIGKILL, signal.SIGSTOP):
    for t in range(FLAGS.tries):
      victim = (t + (1 if sig == signal.SIGSTOP else 0)) % 3
      print(f'{signal.Signals(sig).name} process {victim} ...', flush=True)
      rows.append(one_try(FLAGS.out, len(rows), sig, victim))
      print(rows[-1], flush=True)
  write_csv(os.path.join(FLAGS.out, 'faults.csv'), rows)
  draw(rows, os.path.join(FLAGS.out, 'fault_multicontroller.png'))
  print_table(rows, width=12)


if __name__ == '__main__':
  app.run(main)
