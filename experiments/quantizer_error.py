"""Relative error of the kernels' quantization schemes at 2/3/4/8 bits (issue 11's quantizer study).

Reproduces: no paper table (AQ-SGD paper Sec. 4 motivates the bit widths).
Not a paper table: it picks the defaults for activations, AQ-SGD deltas and DP gradients
(kernels/README.md "Choosing a scheme"). Schemes, each with group-wise (64 or 512 values: a
bucket of flattened gradients) and per-channel scales (one per hidden channel over the whole
micro-batch, as in AQ-SGD's code):
  asym     scale + zero point, all 2^b levels   (symmetric=False)
  sym      c*scale, c in [-(2^(b-1)-1), 2^(b-1)-1]: one code unused (symmetric=True)
  midrise  (c + 1/2)*scale, all 2^b codes, no zero level, no zero point (symmetric='midrise')
Data: `gaussian` (iid N(0,1)) and `channels` (N(0,1) times a log-normal scale per hidden channel,
as in transformer activations, whose channels differ in magnitude). Error = ||x - deQ(Q(x))|| /
||x|| over a (rows, hidden) tensor; bits/value counts scales and zero points.

  python experiments/quantizer_error.py --out runs/quantizer_error
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from common import print_table, write_csv
import kernels as K

flags.DEFINE_string('out', 'runs/quantizer_error/', 'Output folder (results.csv, quantizer_error.png).')
flags.DEFINE_integer('rows', 512, 'Rows (tokens of one micro-batch).')
flags.DEFINE_integer('hidden', 1024, 'Hidden channels (a multiple of 512, so no group is padded).')
flags.DEFINE_integer('seed', 0, 'Data seed.')
FLAGS = flags.FLAGS

SCHEMES = {'asym': False, 'sym': True, 'midrise': 'midrise'}
GROUPINGS = {'g64': 64, 'g512': 512, 'channel': None}


def data(kind, rows, hidden, seed):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(rows, hidden))
  if kind == 'channels':
    x = x * np.exp(rng.normal(size=(1, hidden)))
  return jnp.asarray(x, jnp.float32)


def main(_):
  os.makedirs(FLAGS.out, exist_ok=True)
  rows = []
  for kind in ('gaussian', 'channels'):
    x = data(kind, FLAGS.rows, FLAGS.hidden, FLAGS.seed)
    for grouping, gs in GROUPINGS.items():
      for scheme, sym in SCHEMES.items():
        for bits in (2, 3, 4, 8):
          q = K.quantize(x, bits, gs, symmetric=sym, impl='reference')
          err = float(jnp.linalg.norm(K.dequantize(q) - x) / jnp.linalg.norm(x))
          rows.append({'data': kind, 'scales': grouping, 'scheme': scheme, 'bits': bits,
                       'bits_per_value': q.nbytes * 8 / x.size, 'rel_error': err})
  write_csv(os.path.join(FLAGS.out, 'results.csv'), rows)
  plot(rows, os.path.join(FLAGS.out, 'quantizer_error.png'))
  # the table: one line per (data, scales, scheme), errors at each width
  table = []
  for kind in ('gaussian', 'channels'):
    for grouping in GROUPINGS:
      for scheme in SCHEMES:
        sel = [r for r in rows if (r['data'], r['scales'], r['scheme']) == (kind, grouping, scheme)]
        line = {'data': kind, 'scales': grouping, 'scheme': scheme}
        line.update({f'{r["bits"]}b': r['rel_error'] for r in sel})
        line['bits/val@2'] = sel[0]['bits_per_value']
        table.append(line)
  print_table(table, width=10, precision='.4f')


def plot(rows, path):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
  for ax, kind in zip(axes, ('gaussian', 'channels')):
    for grouping in GROUPINGS:
      for scheme in SCHEMES:
        sel = [r for r in rows if (r['data'], r['scales'], r['scheme']) == (kind, grouping, scheme)]
        ax.plot([r['bits_per_value'] for r in sel], [r['rel_error'] for r in sel], {'g64': 'o-', 'g512': '^:', 'channel': 's--'}[grouping],
                label=f'{scheme} {grouping}')
    ax.set_yscale('log')
    ax.set_xlabel('bits per value (with scales)')
    ax.set_title(f'{kind} data')
    ax.grid(True, alpha=0.3)
  axes[0].set_ylabel('relative error ||x - deQ(Q(x))|| / ||x||')
  axes[1].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


if __name__ == '__main__':
  app.run(main)
