"""AQ-SGD against fp32 and direct quantization through the pipeline runtime (2 stages, real exchange).

Reproduces: AQ-SGD paper, Fig. 3 (training loss vs steps, fp32 / direct / AQ-SGD), scaled down to a
small GPT on the shipped corpus and CPU devices.

The model is cut into --stages stages over a Plan (one CPU device per stage); each step runs the
training schedule through hetjax.parallel.pipeline.Pipeline, so the boundary activations go through
the exchange and its codec: fp32, direct quantization (codecs.Quantize at F bits) or AQ-SGD at F bits
with host BufferStores keyed by sample id (full precision for --warmup_epochs, deltas after). The
activation gradients go back at --bw bits (codecs.Quantize). All methods start from the same
parameters and see the same batches (--samples fixed windows, so epochs come around).

A method with a "+dp<G>" suffix (e.g. aqsgd2+dp4) also compresses the data-parallel gradient
reduction to G bits with error feedback (--config.dp.grad_bits; needs --dp 2 or more replicas);
dp_bytes_per_step is what the replicas send each other per step (fp32: an all-reduce per
micro-batch).

  python experiments/aqsgd_convergence.py --out runs/aqsgd_convergence
  python experiments/aqsgd_convergence.py --dp 2 --methods fp32,aqsgd2,aqsgd2+dp8,aqsgd2+dp4,aqsgd2+dp2
Writes results.csv (final loss, bytes), curves.csv, aqsgd_convergence.png.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')

from absl import app, flags
import numpy as np

from common import print_table, save_figure, write_csv, wrote
from configs import base
from hetjax import data as data_lib
from hetjax.compression.aqsgd import AQSGD
from hetjax.compression.buffers import BufferStore
from hetjax.compression.codecs import make_codec
from hetjax.models.config import get_model_config
from hetjax.parallel.pipeline import Pipeline
from hetjax.plan import Plan, Replica, Stage

flags.DEFINE_string('out', 'runs/aqsgd_convergence/', 'Output folder.')
flags.DEFINE_integer('steps', 300, 'Training steps per method.')
flags.DEFINE_integer('samples', 64, 'Training windows (fixed; an epoch is samples / batch steps).')
flags.DEFINE_integer('batch', 4, 'Sequences per step (2 micro-batches).')
flags.DEFINE_integer('seq_len', 32, 'Tokens per window.')
flags.DEFINE_integer('stages', 2, 'Pipeline stages (the 4 layers split evenly).')
flags.DEFINE_integer('hidden', 64, 'Model width.')
flags.DEFINE_integer('bw', 8, 'Bits of the backward activation gradients (32: fp32).')
flags.DEFINE_integer('warmup_epochs', 1, 'AQ-SGD epochs in full precision.')
flags.DEFINE_list('methods', ['fp32', 'direct2', 'aqsgd2', 'direct4', 'aqsgd4'],
                  'Runs: fp32, direct<F bits>, aqsgd<F bits>, each optionally +dp<G bits> '
                  '(compressed DP gradients, needs --dp >= 2).')
flags.DEFINE_integer('dp', 1, 'Data-parallel replicas of the pipeline (the batch splits over them).')
flags.DEFINE_integer('seed', 0, 'Seed of the model and the data order.')
FLAGS = flags.FLAGS


def run_method(method, cfg, plan, tcfg):
  method, _, dp_bits = method.partition('+dp')
  grad_bits = int(dp_bits) if dp_bits else 0
  if grad_bits and FLAGS.dp < 2:
    raise app.UsageError(f'+dp{grad_bits} needs --dp 2 or more')
  bw = None if FLAGS.bw == 32 else make_codec(FLAGS.bw)
  store, codec = None, None
  if method.startswith('aqsgd'):
    codec = AQSGD(int(method[5:]))
    store = BufferStore(FLAGS.samples, 'host', 'float16', say=lambda *a: None)
  elif method.startswith('direct'):
    codec = make_codec(int(method[6:]))
  pipe = Pipeline(plan, cfg, tcfg, seed=FLAGS.seed, codec=codec, grad_codec=bw, buffers=store,
                  warmup_epochs=FLAGS.warmup_epochs, grad_bits=grad_bits)
  tokens = data_lib.load_corpus()[:FLAGS.samples * FLAGS.seq_len + 1]
  it = data_lib.BatchIterator(tokens, FLAGS.batch, FLAGS.seq_len, seed=FLAGS.seed)
  out = [pipe.step(next(it)) for _ in range(FLAGS.steps)]
  return (np.array([m['loss'] for m in out]), np.array([m['bytes_sent'] for m in out]),
          np.array([m['dp_bytes_sent'] for m in out]))


def main(_):
  cfg = get_model_config('tiny_gpt')
  cfg = type(cfg)(**{**cfg.__dict__, 'hidden': FLAGS.hidden, 'num_heads': 4, 'num_kv_heads': 4,
                     'ffn': 4 * FLAGS.hidden})
  per = cfg.num_layers // FLAGS.stages
  cuts = [(i * per, cfg.num_layers if i == FLAGS.stages - 1 else (i + 1) * per)
          for i in range(FLAGS.stages)]
  plan = Plan([Replica([Stage(a, b, [r * FLAGS.stages + i]) for i, (a, b) in enumerate(cuts)])
               for r in range(FLAGS.dp)],
              num_layers=cfg.num_layers, micro_batches=2,
              micro_batch_size=max(FLAGS.batch // 2 // FLAGS.dp, 1))
  tcfg = base.train_fields()
  tcfg.update(steps=FLAGS.steps, warmup_steps=10, lr=3e-3, seq_len=FLAGS.seq_len)
  curves, rows = {}, []
  for method in FLAGS.methods:
    t0 = time.perf_counter()
    print(f'{method}: {FLAGS.steps} steps ...', flush=True)
    curves[method] = run_method(method, cfg, plan, tcfg)
    print(f'  {time.perf_counter() - t0:.0f} s', flush=True)
  ref = curves[FLAGS.methods[0]][0][-20:].mean()
  for method, (loss, sent, dp_sent) in curves.items():
    final = float(loss[-20:].mean())
    rows.append({'method': method, 'final_loss': round(final, 4),
                 'vs_first': round(final - ref, 4), 'MiB_sent': round(sent.sum() / 2**20, 2),
                 'bytes_per_step_last': int(sent[-1]), 'dp_bytes_per_step': int(dp_sent[-1])})
  os.makedirs(FLAGS.out, exist_ok=True)
  write_csv(os.path.join(FLAGS.out, 'results.csv'), rows)
  write_csv(os.path.join(FLAGS.out, 'curves.csv'),
            [{'step': s + 1, **{m: float(c[0][s]) for m, c in curves.items()}}
             for s in range(FLAGS.steps)])
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for method, (loss, *_) in curves.items():
    smooth = np.convolve(loss, np.ones(10) / 10, mode='valid')
    ax.plot(np.arange(len(smooth)) + 10, smooth, label=method)
  ax.set_xlabel('step')
  ax.set_ylabel('training loss (10-step mean)')
  ax.set_title(f'{FLAGS.stages} pipeline stages x {FLAGS.dp} replicas, bw {FLAGS.bw} bits')
  ax.legend()
  save_figure(fig, os.path.join(FLAGS.out, 'aqsgd_convergence.png'))
  wrote(FLAGS.out, 'results.csv', 'curves.csv', 'aqsgd_convergence.png')
  print_table(rows)


if __name__ == '__main__':
  app.run(main)
