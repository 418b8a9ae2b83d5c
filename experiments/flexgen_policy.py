"""FlexGen's policy table: OPT-6.7B/30B/175B on one T4 node, with and without 4-bit compression.

Reproduces: the FlexGen paper's (ICML 2023) main throughput setting -- OPT-6.7B/30B/175B on a T4
node (16 GB GPU, 208 GB DRAM, 1.5 TB NVMe), prompt 512 and 1024, 32 generated tokens -- as
predicted by hetjax's LP policy search (see /work/shared/paper_facts/flexgen_facts.json).

For each case the LP policy search picks the block shape and placement; the table gives the chosen
policy and predicted throughput. A last row plans a small model on this machine (probed) with a
small device budget, the kind of policy a local engine can run. Writes flexgen_policy.csv and
flexgen_policy.png, prints the table last.

  python experiments/flexgen_policy.py            # ~30 s
  python experiments/flexgen_policy.py --prompts=512 --local_gpu_gb=0
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import print_table, save_figure, wrote, write_csv  # (sets sys.path)
from absl import app, flags

from hetjax.costmodel import offload as om
from hetjax.models.config import get_model_config
from hetjax.search import policy_lp as lp

MODELS = ('opt_6.7b', 'opt_30b', 'opt_175b')

flags.DEFINE_string('out', 'runs/flexgen_policy/', 'Output folder (flexgen_policy.csv, .png).')
flags.DEFINE_list('prompts', ['512', '1024'], 'Prompt lengths.')
flags.DEFINE_integer('gen_len', 32, 'Generated tokens per sequence.')
flags.DEFINE_string('local_model', 'gpt2_small', 'Model of the last row, planned for this machine.')
flags.DEFINE_float('local_gpu_gb', 0.2, 'Device budget (GB) for the local row (0: skip the row).')
FLAGS = flags.FLAGS


def main(argv):
  del argv
  a = FLAGS
  t0 = time.time()
  t4 = om.load_hardware('t4_node')
  runs = [(m, t4, int(p), c) for p in a.prompts for m in MODELS for c in (False, True)]
  if a.local_gpu_gb > 0:
    runs.append((a.local_model, om.local_hardware(gpu_mem_gb=a.local_gpu_gb), 128, False))
  rows = []
  for name, hw, prompt, compress in runs:
    print(f'{name} on {hw.name}, prompt {prompt}' + (', compressed' if compress else ''), flush=True)
    model = get_model_config(name)
    wl = om.Workload(prompt, a.gen_len)
    res = lp.search_policy(model, hw, wl, compress=compress)
    p, f = res.best, res.best.fractions
    assert not lp.check_policy(model, hw, wl, p), lp.check_policy(model, hw, wl, p)
    rows.append({'model': name, 'hardware': hw.name, 'prompt': prompt, 'gen': a.gen_len,
                 'compress': 'w4+kv4' if compress else 'none', 'gbs': p.shape.gpu_batch_size,
                 'n_gbs': p.shape.num_gpu_batches, 'block': p.shape.block,
                 'w_gcd': f"{f['wg']:.2f}/{f['wc']:.2f}/{f['wd']:.2f}", 'kv_gcd': f"{f['cg']:.2f}/{f['cc']:.2f}/{f['cd']:.2f}",
                 'act_gcd': f"{f['hg']:.2f}/{f['hc']:.2f}/{f['hd']:.2f}", 'cpu_attn': p.shape.cpu_attention,
                 'cpu_attn_kv4': p.shape.compress_kv, 'decode_bound': p.bottleneck['decode'],
                 'tok_per_s': p.throughput, 'lp_shapes': res.solved, 'search_s': res.seconds})
  rows = [{k: v for k, v in r.items() if k != 'cpu_attn_kv4'} for r in rows]
  write_csv(os.path.join(a.out, 'flexgen_policy.csv'), rows)
  plot(rows, os.path.join(a.out, 'flexgen_policy.png'))
  wrote(a.out, 'flexgen_policy.csv', 'flexgen_policy.png')
  print(f'total {time.time() - t0:.0f} s; fractions are GPU/CPU/disk; throughput = generated tokens / '
        f'(prefill + decode) of one block')
  print_table(rows)


def plot(rows, path):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  t4 = [r for r in rows if r['hardware'] == 't4_node']
  labels = [f"{r['model']}\np{r['prompt']}\n{r['compress']}" for r in t4]
  fig, ax = plt.subplots(figsize=(12, 4))
  ax.bar(range(len(t4)), [r['tok_per_s'] for r in t4],
         color=['tab:blue' if r['compress'] == 'none' else 'tab:orange' for r in t4])
  ax.set_xticks(range(len(t4)), labels, fontsize=7)
  ax.set_yscale('log')
  ax.set_ylabel('predicted tokens/s')
  ax.set_title('FlexGen LP policy on the T4 node (blue: fp16, orange: 4-bit weights + KV)')
  save_figure(fig, path)


if __name__ == '__main__':
  app.run(main)
