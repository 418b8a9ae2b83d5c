"""FlexGen executed on this machine: zig-zag offloaded generation vs naive offloading, predicted vs measured.

Reproduces: FlexGen paper Table 2 / Fig. 1 (throughput of offloaded generation), scaled down.
FlexGen paper, Table 2 / Fig. 1 setting, scaled down: a model 3-4x larger than the "device" budget, weights on the host or disk tier, fp32 and 4-bit. Rows:
  zigzag   the FlexGen block schedule: block = gbs x nb, each layer's weights loaded once per token for
           the whole block, next layer / next batch's cache prefetched on threads while computing
  naive    accelerate-style offloading: batch 1, per layer load then compute, nothing overlapped (so the
           same block costs nb*gbs weight loads per layer per token)
  lp       the policy the LP (search/policy_lp.py) picks for this machine and budget, executed
For each zig-zag row: tokens/s measured (the faster of two runs after one that compiles) against the cost
model (costmodel/offload.py with hardware probed here right after each run; pred_serial: the same terms
summed, i.e. with no overlap), and weight / KV bytes read per token step against the cost model's count.
Writes CSV + PNG and prints the table last.

  python experiments/bench_offload.py                 # ~5 min on a loaded 2-core machine
"""

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags

flags.DEFINE_integer('layers', 16, 'model layers (GPT-2 blocks)')
flags.DEFINE_integer('hidden', 512, 'hidden size (heads = hidden / 64, MLP 4x)')
flags.DEFINE_integer('prompt_len', 16, 'prompt tokens')
flags.DEFINE_integer('gen_len', 8, 'generated tokens')
flags.DEFINE_integer('gbs', 4, 'GPU batch size of the zig-zag rows')
flags.DEFINE_integer('nb', 4, 'number of GPU batches of the zig-zag rows (block = gbs x nb)')
flags.DEFINE_float('device_gb', 0.06, 'device budget (GB); the model is several times larger')
flags.DEFINE_float('host_gb', 4.0, 'host budget (GB)')
flags.DEFINE_string('rows', 'host,disk,host4,lp', 'settings to run: host, disk, host4 (4-bit), disk4, lp')
flags.DEFINE_string('out', 'runs/bench_offload/', 'output folder')
FLAGS = flags.FLAGS


def model_config():
  from hetjax.models.config import get_model_config
  return get_model_config('gpt2_small', num_layers=FLAGS.layers, hidden=FLAGS.hidden, num_heads=FLAGS.hidden // 64,
                          num_kv_heads=FLAGS.hidden // 64,
                          ffn=4 * FLAGS.hidden, vocab_size=256, max_len=FLAGS.prompt_len + FLAGS.gen_len)


def run_engine(cfg, policy, disk_dir, **kw):
  """Metrics of the faster of two timed runs (a first run compiles)."""
  from hetjax.inference.offload import OffloadEngine, random_ends, random_layers
  eng = OffloadEngine(cfg, policy, random_layers(cfg), random_ends(cfg), prompt_len=FLAGS.prompt_len,
                      gen_len=FLAGS.gen_len, device_gb=FLAGS.device_gb, host_gb=FLAGS.host_gb, disk_dir=disk_dir,
                      log=lambda s: None, **kw)
  try:
    prompts = [[(7 * i + j) % 256 for j in range(FLAGS.prompt_len)] for i in range(policy.block)]
    eng.generate(prompts)
    best = None
    for _ in range(2):   # the faster of two timed runs (the machine is shared)
      eng.ledger.moved.clear()
      _, timing = eng.generate(prompts)
      if best is None or timing['total_s'] < best[0]['total_s']:
        best = timing, eng.metrics(timing)
    return best[1]
  finally:
    eng.close()


def predict(cfg, hw, policy):
  """Cost-model tokens/s and per-token-step byte counts (whole model) for an executed policy. The cost
  model counts fp16 bytes: `hw` is scaled for fp32 values (hardware_for_dtype); a 4-bit policy is
  costed on the unscaled hardware (its bytes are 4-bit whatever the source dtype)."""
  from hetjax.costmodel import offload as om
  from hetjax.modes._offload import hardware_for_dtype
  scale = 2   # fp32 bytes / fp16 bytes
  if policy.compress_weight and policy.compress_kv:
    hw, scale = hardware_for_dtype(hw, 1), 1
  shape = om.Shape(policy.gpu_batch_size, policy.num_gpu_batches, policy.cpu_attention, policy.compress_weight,
                   policy.compress_kv)
  wl = om.Workload(FLAGS.prompt_len, FLAGS.gen_len)
  x = [*policy.weights, *policy.kv, *policy.act]
  ev = om.evaluate(cfg, hw, wl, shape, x)
  t_pre, t_gen = max(ev['prefill'].values()), max(ev['decode'].values())
  W, KV = om.model_bytes(cfg, shape)
  L, b, ctx = cfg.num_layers, shape.block, FLAGS.prompt_len + FLAGS.gen_len / 2
  serial = om.total_time(cfg, wl, sum(ev['prefill'].values()), sum(ev['decode'].values()))
  return {'tok_s': shape.block * FLAGS.gen_len / om.total_time(cfg, wl, t_pre, t_gen),
          'serial_tok_s': shape.block * FLAGS.gen_len / serial,   # if nothing overlapped
          'w_bytes_step': L * (x[1] + x[2]) * W * scale,
          'kv_bytes_decode_step': 0 if policy.cpu_attention else L * (x[4] + x[5]) * b * ctx * KV * scale,
          'bound': max(ev['decode'], key=ev['decode'].get)}


def main(argv):
  del argv
  import dataclasses
  from hetjax.costmodel import offload as om
  from hetjax.inference.offload import OffloadPolicy
  from hetjax.modes._offload import probe_hardware
  from hetjax.search.policy_lp import search_policy
  from common import print_table, write_csv
  os.makedirs(FLAGS.out, exist_ok=True)
  cfg = model_config()
  model_gb = cfg.num_layers * cfg.block_params() * 4 / 1e9
  print(f'model: {cfg.num_layers} x hidden {cfg.hidden}: {model_gb:.3f} GB of fp32 layer weights, device budget '
        f'{FLAGS.device_gb} GB ({model_gb / FLAGS.device_gb:.1f}x); probing this machine...', flush=True)
  rows = []
  with tempfile.TemporaryDirectory(dir=FLAGS.out) as disk_dir:
    hw = probe_hardware(cfg, FLAGS.device_gb, FLAGS.host_gb, disk_dir)
    print(f'probed: host->device {hw.ctog_gbs * 2:.3g} GB/s, disk read {hw.dtoc_gbs * 2:.3g} GB/s (cold), '
          f'matmul {hw.gpu_tflops_decode * 1e3:.3g} GFLOP/s', flush=True)
    one = {'host': (0, 1, 0), 'disk': (0, 0, 1)}
    dev = (1, 0, 0)
    for row in FLAGS.rows.split(','):
      if row == 'lp':
        res = search_policy(cfg, hw, om.Workload(FLAGS.prompt_len, FLAGS.gen_len),
                            gpu_batch_sizes=(1, 2, 4, 8), num_gpu_batches=(1, 2, 4, 8))
        settings = [('lp', OffloadPolicy.from_dict(res.best.to_plan_offload()))]
      else:
        tier, comp = row.rstrip('4'), row.endswith('4')
        zig = OffloadPolicy(FLAGS.gbs, FLAGS.nb, one[tier], dev, dev, compress_weight=comp, compress_kv=comp)
        naive = dataclasses.replace(zig, gpu_batch_size=1, num_gpu_batches=zig.block)
        settings = [('zigzag', zig), ('naive', naive)]
      for schedule, policy in settings:
        t0 = time.time()
        kw = dict(prefetch=False, reuse_weights=False) if schedule == 'naive' else {}
        try:
          m = run_engine(cfg, policy, disk_dir, **kw)
        except Exception as e:   # e.g. an LP policy the engine's exact byte count refuses
          print(f'{row} {schedule}: {e}')
          continue
        # probe again right after the run: on a shared machine the rates drift between rows
        hw_now = probe_hardware(cfg, FLAGS.device_gb, FLAGS.host_gb, disk_dir) if schedule != 'naive' else hw
        pred = predict(cfg, hw_now, policy)
        moved = m['bytes_moved_by_kind']
        w_meas = sum(v for k, v in moved.items() if k.endswith('/weights')) / FLAGS.gen_len
        kv_meas = sum(v for k, v in moved.items() if k.startswith('from_') and k.endswith('/kv'))
        kv_meas /= max(FLAGS.gen_len - 1, 1)
        rows.append({'setting': row, 'schedule': schedule, 'gbs': policy.gpu_batch_size, 'nb': policy.num_gpu_batches,
                     'w_g/c/d': '/'.join(f'{v:.2f}' for v in policy.weights),
                     'kv_g/c/d': '/'.join(f'{v:.2f}' for v in policy.kv), 'cpu_attn': policy.cpu_attention,
                     'tok_s': m['tokens_per_s'], 'pred_tok_s': pred['tok_s'] if schedule != 'naive' else float('nan'),
                     'pred/meas': pred['tok_s'] / m['tokens_per_s'] if schedule != 'naive' else float('nan'),
                     'pred_serial': pred['serial_tok_s'] if schedule != 'naive' else float('nan'),
                     'bound': pred['bound'],
                     'w_MB_step': w_meas / 1e6, 'w_MB_model': pred['w_bytes_step'] / 1e6,
                     'kv_MB_step': kv_meas / 1e6, 'kv_MB_model': pred['kv_bytes_decode_step'] / 1e6,
                     'peak_dev_MB': m['peak_resident_bytes']['device'] / 1e6, 'budget_MB': FLAGS.device_gb * 1e3,
                     'probe_copy_GBs': hw_now.ctog_gbs * 2, 'probe_disk_GBs': hw_now.dtoc_gbs * 2,
                     'probe_GFLOPs': hw_now.gpu_tflops_decode * 1e3,
                     'prefill_s': m['prefill_s'], 'decode_s': m['decode_s']})
        print(f'{row} {schedule}: {m["tokens_per_s"]:.3g} tok/s ({time.time() - t0:.0f} s)', flush=True)
  for r in rows:
    if r['schedule'] == 'zigzag':
      naive = [n for n in rows if n['setting'] == r['setting'] and n['schedule'] == 'naive']
      r['vs_naive'] = r['tok_s'] / naive[0]['tok_s'] if naive else float('nan')
    else:
      r['vs_naive'] = float('nan')
  write_csv(os.path.join(FLAGS.out, 'bench_offload.csv'), rows)
  plot(rows, os.path.join(FLAGS.out, 'bench_offload.png'))
  print(f'wrote {FLAGS.out}/bench_offload.csv and bench_offload.png (machine shared with other jobs: ratios '
        f'are side by side in one run, absolute numbers are noisy)')
  keys = ['setting', 'schedule', 'gbs', 'nb', 'w_g/c/d', 'kv_g/c/d', 'cpu_attn', 'tok_s', 'vs_naive', 'pred_tok_s',
          'pred/meas',
          'pred_serial', 'bound', 'w_MB_step', 'w_MB_model', 'kv_MB_step', 'kv_MB_model', 'peak_dev_MB', 'budget_MB',
          'probe_copy_GBs', 'probe_GFLOPs']
  print_table([{k: r[k] for k in keys} for r in rows], 10, '.3g')


def plot(rows, path):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
  labels = [f"{r['setting']}\n{r['schedule']}" for r in rows]
  a.bar(range(len(rows)), [r['tok_s'] for r in rows],
        color=['tab:blue' if r['schedule'] != 'naive' else 'tab:gray' for r in rows])
  a.set_xticks(range(len(rows)), labels, fontsize=7)
  a.set_ylabel('measured tokens/s')
  a.set_title('zig-zag + prefetch (blue) vs naive offloading (gray)')
  pr = [r for r in rows if r['schedule'] != 'naive']
  b.scatter([r['pred_tok_s'] for r in pr], [r['tok_s'] for r in pr])
  for r in pr:
    b.annotate(r['setting'], (r['pred_tok_s'], r['tok_s']), fontsize=7)
  lim = [min(min(r['pred_tok_s'], r['tok_s']) for r in pr) / 2, max(max(r['pred_tok_s'], r['tok_s']) for r in pr) * 2]
  b.plot(lim, lim, 'k--', lw=0.8)
  b.set_xscale('log')
  b.set_yscale('log')
  b.set_xlabel('cost model tokens/s (probed hardware)')
  b.set_ylabel('measured tokens/s')
  fig.tight_layout()
  fig.savefig(path, dpi=110)


if __name__ == '__main__':
  app.run(main)
