"""FlexGen's policy table: OPT-6.7B/30B/175B on the T4 node (16 GB GPU, 208 GB DRAM, 1.5 TB NVMe),
with and without 4-bit compression, prompt 512 and 1024, 32 generated tokens. For each, the LP policy
search picks the block shape and placement; the table gives the chosen policy and predicted throughput.
A last row plans a small model on this machine (probed) with a small device budget, the kind of policy
a local engine can run. Writes CSV + PNG, prints the table last.

  python experiments/flexgen_policy.py            # ~30 s
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import print_table, write_csv

from hetjax.costmodel import offload as om
from hetjax.models.config import get_model_config
from hetjax.search import policy_lp as lp

MODELS = ('opt_6.7b', 'opt_30b', 'opt_175b')


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--prompts', default='512,1024')
  ap.add_argument('--gen_len', type=int, default=32)
  ap.add_argument('--local_model', default='gpt2_small')
  ap.add_argument('--local_gpu_gb', type=float, default=0.2, help='device budget for the local row (0: skip)')
  ap.add_argument('--out', default='runs/flexgen_policy')
  a = ap.parse_args()
  os.makedirs(a.out, exist_ok=True)
  t4 = om.load_hardware('t4_node')
  runs = [(m, t4, int(p), c) for p in a.prompts.split(',') for m in MODELS for c in (False, True)]
  if a.local_gpu_gb > 0:
    runs.append((a.local_model, om.local_hardware(gpu_mem_gb=a.local_gpu_gb), 128, False))
  rows = []
  for name, hw, prompt, compress in runs:
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
  print(f'wrote {a.out}/flexgen_policy.csv and flexgen_policy.png')
  print('fractions are GPU/CPU/disk; throughput = generated tokens / (prefill + decode) of one block')
  print_table(rows, 10, '.3g')


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
  fig.tight_layout()
  fig.savefig(path, dpi=110)


if __name__ == '__main__':
  t0 = time.time()
  main()
  print(f'total {time.time() - t0:.0f} s')
