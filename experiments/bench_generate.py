"""Prefill and decode throughput (tokens/s) of single-device generation on this machine.

Reproduces: no paper table; the single-device baseline of hetjax's KV-cached generation that the
HexGen/FlexGen cost models are calibrated against.

  python experiments/bench_generate.py --models=tiny_gpt,tiny_llama --batches=1 --new_tokens=8

Writes results.csv and throughput.png, prints the table last. Timings exclude compilation (one
warm-up run per shape)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import print_table, save_figure, wrote, write_csv  # (sets sys.path)
from absl import app, flags

from hetjax.inference.generate import generate
from hetjax.models.config import get_model_config
from hetjax.models.model import build_model
import numpy as np

flags.DEFINE_string('out', 'runs/bench_generate/', 'Output folder (results.csv, throughput.png).')
flags.DEFINE_list('models', ['tiny_gpt', 'tiny_llama', 'gpt2_small'], 'Model presets.')
flags.DEFINE_list('batches', ['1', '16'], 'Batch sizes.')
flags.DEFINE_integer('prompt_len', 128, 'Prompt tokens.')
flags.DEFINE_integer('new_tokens', 32, 'Generated tokens per sequence.')
flags.DEFINE_integer('repeats', 2, 'Timed runs per point (the best is kept).')
FLAGS = flags.FLAGS


def measure(model, batch, prompt_len, new_tokens, repeats):
  prompt = np.random.default_rng(0).integers(0, model.cfg.vocab_size, (batch, prompt_len))
  generate(model, prompt, new_tokens)  # compile
  best = None
  for _ in range(repeats):
    _, t = generate(model, prompt, new_tokens, return_timing=True)
    best = t if best is None else {k: min(best[k], t[k]) for k in t}
  return {'prefill_tok_s': batch * prompt_len / best['prefill_s'],
          'decode_tok_s': batch * (new_tokens - 1) / best['decode_s'],
          'decode_ms_per_step': 1000 * best['decode_s'] / (new_tokens - 1)}


def main(_):
  os.makedirs(FLAGS.out, exist_ok=True)
  rows = []
  for name in FLAGS.models:
    cfg = get_model_config(name)
    model = build_model(cfg)
    for batch in map(int, FLAGS.batches):
      r = measure(model, batch, FLAGS.prompt_len, FLAGS.new_tokens, FLAGS.repeats)
      rows.append({'model': name, 'params_M': cfg.num_params() / 1e6, 'batch': batch, **r})
      print(f'{name} batch {batch}: prefill {r["prefill_tok_s"]:,.0f} tok/s, '
            f'decode {r["decode_tok_s"]:,.0f} tok/s', flush=True)
  write_csv(os.path.join(FLAGS.out, 'results.csv'), rows)
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  labels = [f'{r["model"]}\nb={r["batch"]}' for r in rows]
  for ax, key in zip(axes, ['prefill_tok_s', 'decode_tok_s']):
    ax.bar(labels, [r[key] for r in rows])
    ax.set_yscale('log')
    ax.set_title(key.replace('_tok_s', ' tokens/s (CPU)'))
    ax.tick_params(axis='x', labelsize=7)
  save_figure(fig, os.path.join(FLAGS.out, 'throughput.png'), dpi=100)
  wrote(FLAGS.out, 'results.csv', 'throughput.png')
  print_table(rows, precision='.4g')


if __name__ == '__main__':
  app.run(main)
