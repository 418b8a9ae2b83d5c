"""Pipeline runtime vs single-device training on the same batches: losses and step-time ratio.

Reproduces: no paper figure; checks hetjax's pipeline runtime (the substrate of DT-FM/AQ-SGD
training) against plain training: same losses, and what the runtime costs.

  python experiments/bench_pipeline.py --steps=4

Runs the same batches through (a) hetjax.train.train_step on one device and (b) the Pipeline over
an uneven plan (layers 1/2/3 on TP 1/2/4 when 8 devices exist; on fewer devices, e.g. one GPU, the
stages are colocated with TP 1). Prints losses side by side and the step-time ratio; writes
results.csv, losses.png (losses and step times side by side), timeline.json (Chrome trace of one
profiled pipeline step) and timeline.png; prints the table last."""

import json
import os
import sys
import time

if 'XLA_FLAGS' not in os.environ and os.environ.get('JAX_PLATFORMS', 'cpu') == 'cpu':
  os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import print_table, save_figure, wrote, write_csv
from absl import app, flags
import jax
import numpy as np
from flax import nnx

from configs import base
from hetjax import data as data_lib
from hetjax.models.config import get_model_config
from hetjax.models.model import build_model
from hetjax.parallel.pipeline import Pipeline
from hetjax.parallel.timeline import draw_gantt, write_chrome_trace
from hetjax.plan import Plan, Replica, Stage
from hetjax.optim import make_optimizer
from hetjax.train import train_step

flags.DEFINE_string('out', 'runs/bench_pipeline/', 'Output folder (results.csv, losses.png, timeline.*).')
flags.DEFINE_string('model', 'tiny_gpt', 'Model preset.')
flags.DEFINE_integer('layers', 6, 'Number of layers (split 1/2/3 when 6).')
flags.DEFINE_integer('steps', 8, 'Timed steps (after 2 warm-up steps).')
flags.DEFINE_integer('micro_batches', 4, 'Micro-batches per step.')
flags.DEFINE_integer('micro_batch_size', 4, 'Sequences per micro-batch.')
flags.DEFINE_integer('seq_len', 128, 'Tokens per sequence.')
FLAGS = flags.FLAGS


def make_plan(n_layers, n_devices):
  a, b = max(1, n_layers // 6), max(2, n_layers // 2)
  if n_devices >= 8:
    stages = [Stage(0, a, [0]), Stage(a, b, [1, 2]), Stage(b, n_layers, [4, 5, 6, 7])]
  else:
    stages = [Stage(0, a, [0]), Stage(a, b, [1]), Stage(b, n_layers, [2])]
  return Plan([Replica(stages)], n_layers, schedule='1f1b', micro_batches=FLAGS.micro_batches,
              micro_batch_size=FLAGS.micro_batch_size)


def main(_):
  os.makedirs(FLAGS.out, exist_ok=True)
  cfg = get_model_config(FLAGS.model, num_layers=FLAGS.layers)
  tcfg = base.train_fields()
  tcfg.update(steps=1000, warmup_steps=2)
  batch = FLAGS.micro_batches * FLAGS.micro_batch_size
  it = data_lib.BatchIterator(data_lib.load_corpus(), batch, FLAGS.seq_len, seed=0)
  data = [next(it) for _ in range(FLAGS.steps + 2)]
  n_dev = len(jax.devices())
  plan = make_plan(FLAGS.layers, n_dev)
  pipe = Pipeline(plan, cfg, tcfg, colocate=n_dev < 8)
  graphdef, params = nnx.split(build_model(cfg, 0))
  opt = make_optimizer(tcfg)
  opt_state = opt.init(params)
  rows = []
  for i, b in enumerate(data):
    print(f'step {i + 1}/{len(data)}' + (' (compiling)' if i < 2 else ''), flush=True)
    t0 = time.perf_counter()
    params, opt_state, m = train_step(graphdef, opt, params, opt_state, b)
    ref_loss = float(m['loss'])
    t_ref = time.perf_counter() - t0
    t0 = time.perf_counter()
    pm = pipe.step(b)
    t_pipe = time.perf_counter() - t0
    if i >= 2:
      rows.append({'step': i, 'single_loss': ref_loss, 'pipeline_loss': pm['loss'],
                   'single_s': t_ref, 'pipeline_s': t_pipe, 'bytes_sent': pm['bytes_sent']})
  pipe.profile = True
  pipe.step(data[0])
  write_chrome_trace(pipe.timeline, os.path.join(FLAGS.out, 'timeline.json'))
  draw_gantt(pipe.timeline, os.path.join(FLAGS.out, 'timeline.png'))
  write_csv(os.path.join(FLAGS.out, 'results.csv'), rows)
  plot(rows, os.path.join(FLAGS.out, 'losses.png'))
  wrote(FLAGS.out, 'results.csv', 'losses.png', 'timeline.json', 'timeline.png')
  single = np.median([r['single_s'] for r in rows])
  piped = np.median([r['pipeline_s'] for r in rows])
  print(f'\ndevice: {jax.devices()[0].device_kind} x{n_dev}; model {FLAGS.model} {FLAGS.layers} layers; '
        f'plan stages {plan.layer_counts()} tp {[s.tp for s in plan.replicas[0].stages]}')
  print(f'median step: single {single:.4f} s, pipeline {piped:.4f} s, ratio {piped / single:.2f}x')
  print_table(rows, precision='.5g')


def plot(rows, path):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  steps = [r['step'] for r in rows]
  fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3))
  a.plot(steps, [r['single_loss'] for r in rows], 'o-', label='single device')
  a.plot(steps, [r['pipeline_loss'] for r in rows], 'x--', label='pipeline')
  a.set(xlabel='step', ylabel='loss', title='same batches, same losses')
  a.legend(fontsize=8)
  b.plot(steps, [r['single_s'] for r in rows], 'o-', label='single device')
  b.plot(steps, [r['pipeline_s'] for r in rows], 'x--', label='pipeline')
  b.set(xlabel='step', ylabel='seconds', title='step time')
  b.set_ylim(bottom=0)
  b.legend(fontsize=8)
  save_figure(fig, path)


if __name__ == '__main__':
  app.run(main)
