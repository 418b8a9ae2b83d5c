"""AQ-SGD against fp32 and direct quantization when fine-tuning: the codec path, two stages in one process.

Reproduces: AQ-SGD paper, Fig. 3 / Table 2 setting, scaled down (the codec path only, without the
pipeline runtime).

A small GPT is pre-trained in fp32 on the first part of the shipped corpus, then fine-tuned for
--epochs over a fixed set of windows it did not see, from the same parameters and seeds with each
method. The model is cut into two stages (hetjax.models.build_stages) run in one process; the
boundary activation goes through the codec exactly as the exchange will send it: AQ-SGD with a
sender and a receiver BufferStore keyed by sample id (full precision in the first epoch, deltas
after), direct quantization (codecs.Quantize) or fp32; the activation gradient goes back through
Quantize at bw bits. "+dp" adds hetjax.compression.grad.error_feedback at --dp_bits on the
gradients of one worker (the compression noise of DP, without a second worker).
The real multi-stage run over the runtime is issue 11's experiments/aqsgd_convergence.py.

  python experiments/aqsgd_codec_convergence.py --out runs/aqsgd_codec_convergence
Writes results.csv (final losses, bytes per step), curves.csv, aqsgd_codec_convergence.png.
Losses are measured in fp32 without compression: on all fine-tuning windows (what fine-tuning
fits; the AQ-SGD paper plots training loss) and on validation text from the corpus' last 5%.
"""
import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from common import print_table, write_csv
from configs import base
from hetjax import data as data_lib
from hetjax.compression import grad as gradc
from hetjax.compression.aqsgd import AQSGD
from hetjax.compression.buffers import BufferStore
from hetjax.compression.codecs import Identity, Quantize
from hetjax.models.config import get_model_config
from hetjax.models.model import build_stages
from hetjax.train import cross_entropy, make_optimizer

flags.DEFINE_string('out', 'runs/aqsgd_codec_convergence/', 'Output folder.')
flags.DEFINE_integer('pretrain_steps', 300, 'fp32 pre-training steps on the first 80% of the corpus.')
flags.DEFINE_integer('windows', 128, 'Fine-tuning set: fixed windows from the unseen 80-95% part.')
flags.DEFINE_integer('epochs', 6, 'Fine-tuning epochs (the first is AQ-SGD\'s warm-up).')
flags.DEFINE_integer('batch', 8, 'Sequences per step (one micro-batch).')
flags.DEFINE_integer('seq_len', 64, 'Tokens per window.')
flags.DEFINE_integer('layers', 4, 'Layers (cut in half into two stages).')
flags.DEFINE_integer('hidden', 128, 'Model width.')
flags.DEFINE_float('lr', 1e-3, 'Fine-tuning peak learning rate.')
flags.DEFINE_integer('dp_bits', 4, 'Gradient bits of the "+dp" run.')
flags.DEFINE_list('methods', ['fp32', 'direct2/4', 'aqsgd2/4', 'direct3/8', 'aqsgd3/8', 'direct4/8',
                              'aqsgd4/8', 'aqsgd2/4+dp'], 'Runs: fp32, directF/B, aqsgdF/B[+dp].')
flags.DEFINE_integer('seed', 0, 'Seed of the model and the data order.')
FLAGS = flags.FLAGS
KEY = ('b0', 'fwd', 0)


def parse(method):
  """'aqsgd2/4+dp' -> (forward codec, backward codec, dp bits)."""
  dp = FLAGS.dp_bits if method.endswith('+dp') else 0
  name = method.removesuffix('+dp')
  if name == 'fp32':
    return Identity(), Identity(), dp
  kind, bits = name[:5], name[5:] if name.startswith('aqsgd') else name[6:]
  fw, bw = (int(b) for b in bits.split('/'))
  return (AQSGD(fw) if kind == 'aqsgd' else Quantize(fw)), Quantize(bw), dp


def nbytes(tree):
  return sum(l.size * l.dtype.itemsize for l in jax.tree.leaves(tree))


class TwoStages:
  """Stage 0 (embed + first half) and stage 1 (second half + head) with their parameters."""

  def __init__(self, mcfg, seed):
    s0, s1 = build_stages(mcfg, [0, mcfg.num_layers // 2, mcfg.num_layers], seed)
    (self.g0, p0), (self.g1, p1) = nnx.split(s0), nnx.split(s1)
    self.params = (p0, p1)

  @functools.partial(jax.jit, static_argnums=0)
  def front(self, p0, x):
    return nnx.merge(self.g0, p0)(x)[0]

  @functools.partial(jax.jit, static_argnums=0)
  def back(self, p1, h, targets):
    def loss(p1, h):
      return cross_entropy(nnx.merge(self.g1, p1)(h)[0], targets)
    return jax.value_and_grad(loss, argnums=(0, 1))(p1, h)

  @functools.partial(jax.jit, static_argnums=0)
  def front_grad(self, p0, x, g_h):
    _, vjp = jax.vjp(lambda p: nnx.merge(self.g0, p)(x)[0], p0)
    return vjp(g_h)[0]

  @functools.partial(jax.jit, static_argnums=0)
  def loss(self, params, x, targets):
    return cross_entropy(nnx.merge(self.g1, params[1])(nnx.merge(self.g0, params[0])(x)[0])[0], targets)

  def __hash__(self):
    return id(self)


@functools.lru_cache(maxsize=None)
def coders(codec):
  return jax.jit(codec.encode), jax.jit(codec.decode, static_argnames='dtype')


def roundtrip(codec, x, sender=None, receiver=None, ids=None):
  """x through encode/decode (with per-sample state for stateful codecs); (x_hat, wire bytes)."""
  enc, dec = coders(codec)
  if not getattr(codec, 'stateful', False):
    wire, _ = enc(x, None)
    return dec(wire, None, dtype=x.dtype)[0], nbytes(wire)
  wire, s = enc(x, sender.gather(KEY, ids))
  sender.scatter(KEY, ids, s)
  x_hat, r = dec(wire, receiver.gather(KEY, ids), dtype=x.dtype)
  receiver.scatter(KEY, ids, r)
  return x_hat, nbytes(wire)


def pretrain(model, tokens, steps, seed):
  tcfg = base.train_fields()
  tcfg.update(steps=steps, lr=3e-3, warmup_steps=min(30, steps // 10))
  opt = make_optimizer(tcfg)
  state = opt.init(model.params)
  it = data_lib.BatchIterator(tokens, FLAGS.batch, FLAGS.seq_len, seed)

  @jax.jit
  def step(params, state, x, y):
    loss, g = jax.value_and_grad(model.loss)(params, x, y)
    upd, state = opt.update(g, state, params)
    return optax.apply_updates(params, upd), state, loss
  params = model.params
  for i in range(steps):
    b = next(it)
    params, state, loss = step(params, state, b['inputs'], b['targets'])
    if (i + 1) % 100 == 0:
      print(f'  pre-train step {i + 1}/{steps} loss {float(loss):.3f}', flush=True)
  return params


def finetune(model, params0, tokens, val, method):
  fw, bw, dp_bits = parse(method)
  it = data_lib.BatchIterator(tokens, FLAGS.batch, FLAGS.seq_len, FLAGS.seed + 1)
  steps = FLAGS.epochs * it.num_samples // FLAGS.batch
  tcfg = base.train_fields()
  tcfg.update(steps=steps, lr=FLAGS.lr, warmup_steps=steps // 10)
  opt = make_optimizer(tcfg)
  if dp_bits:
    opt = optax.chain(gradc.error_feedback(dp_bits, 512), opt)
  update = jax.jit(opt.update)
  stores = [BufferStore(it.num_samples, 'host', say=lambda *a: None) for _ in range(2)]
  params, state = params0, opt.init(params0)
  curve, sent_total = [], 0
  train_set = [it.batch(k) for k in range(it.num_samples // FLAGS.batch)]  # epoch 0: every window
  mean_loss = lambda p, bs: float(np.mean([float(model.loss(p, b['inputs'], b['targets'])) for b in bs]))
  point = lambda step: {'method': method, 'step': step, 'bytes': sent_total,
                        'train_loss': mean_loss(params, train_set), 'val_loss': mean_loss(params, val)}
  curve.append(point(0))
  per_step = []
  for i in range(steps):
    b = next(it)
    h = model.front(params[0], b['inputs'])
    h_hat, fw_bytes = roundtrip(fw, h, *stores, b['ids'])
    loss, (g1, g_h) = model.back(params[1], h_hat, b['targets'])
    g_h_hat, bw_bytes = roundtrip(bw, g_h)
    g0 = model.front_grad(params[0], b['inputs'], g_h_hat)
    upd, state = update((g0, g1), state, params)
    params = optax.apply_updates(params, upd)
    sent_total += fw_bytes + bw_bytes
    per_step.append(fw_bytes + bw_bytes)
    if (i + 1) % (steps // FLAGS.epochs) == 0:
      curve.append(point(i + 1))
  warm = per_step[steps // FLAGS.epochs:]  # after AQ-SGD's warm-up epoch
  return curve, {'method': method, 'train_set_loss': curve[-1]['train_loss'],
                 'val_loss': curve[-1]['val_loss'], 'MiB_sent': sent_total / 2**20,
                 'bytes_per_step_after_warmup': float(np.mean(warm)),
                 'bytes_per_step_fp32': 2 * 4 * h.size}


def main(_):
  os.makedirs(FLAGS.out, exist_ok=True)
  tokens = data_lib.load_corpus()
  n = len(tokens)
  pre, fine, val_tokens = tokens[:int(0.8 * n)], tokens[int(0.8 * n):int(0.95 * n)], tokens[int(0.95 * n):]
  fine = fine[:FLAGS.windows * FLAGS.seq_len + 1]  # a fixed set of windows, unseen in pre-training
  val = data_lib.eval_batches(val_tokens, FLAGS.batch, FLAGS.seq_len, 8)
  mcfg = get_model_config('tiny_gpt', num_layers=FLAGS.layers, hidden=FLAGS.hidden, num_heads=4,
                          tie_embeddings=False)
  model = TwoStages(mcfg, FLAGS.seed)
  t0 = time.perf_counter()
  print(f'pre-training {FLAGS.pretrain_steps} steps (fp32)', flush=True)
  params0 = pretrain(model, pre, FLAGS.pretrain_steps, FLAGS.seed)
  curves, rows = [], []
  for method in FLAGS.methods:
    print(f'fine-tuning: {method} ({time.perf_counter() - t0:.0f} s so far)', flush=True)
    curve, row = finetune(model, params0, fine, val, method)
    curves += curve
    rows.append(row)
  write_csv(os.path.join(FLAGS.out, 'curves.csv'), curves)
  write_csv(os.path.join(FLAGS.out, 'results.csv'), rows)
  plot(curves, os.path.join(FLAGS.out, 'aqsgd_codec_convergence.png'))
  print_table(rows, width=14, precision='.5g')


def plot(curves, path):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharey='row')
  for method in dict.fromkeys(c['method'] for c in curves):
    sel = [c for c in curves if c['method'] == method]
    style = '-' if method.startswith('aqsgd') else '--' if method.startswith('direct') else 'k-'
    for row, what in enumerate(('train_loss', 'val_loss')):
      axes[row, 0].plot([c['step'] for c in sel], [c[what] for c in sel], style, label=method)
      axes[row, 1].plot([c['bytes'] / 2**20 for c in sel], [c[what] for c in sel], style, label=method)
  for row, what in enumerate(('loss on the fine-tuning windows', 'validation loss (unseen text)')):
    axes[row, 0].set_ylabel(what)
    axes[row, 0].set_xlabel('fine-tuning step')
    axes[row, 1].set_xlabel('MiB sent across the stage boundary (both directions)')
    axes[row, 1].set_xscale('symlog')
  axes[0, 0].legend(fontsize=8)
  for ax in axes.flat:
    ax.grid(True, alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


if __name__ == '__main__':
  app.run(main)
