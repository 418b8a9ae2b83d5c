"""Conversion and checkpoint timings for a GPT-2-XL-shaped random checkpoint.

python experiments/bench_checkpoint.py [--model=gpt2_xl] [--dir=/tmp/hetjax_bench]

Each phase runs in a fresh process, so its peak resident memory (ru_maxrss, which includes the
~0.4 GB of an idle Python + JAX process) is its own:
  make     a random Hugging Face folder (safetensors shards), not timed
  import   HF folder -> hetjax orbax checkpoint
  export   hetjax checkpoint -> HF folder
  save     the parameters as device arrays -> Checkpointer.save (synchronous; and the time an
           asynchronous save blocks the caller)
  restore  Checkpointer.restore onto the device (the model's abstract state with a sharding)
Results: printed, and written to experiments/results/bench_checkpoint.json.
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
GB = 1024 ** 3


def peak_gb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB


def phase_make(mcfg, d):
  import numpy as np
  from hetjax.checkpoint import hf
  from hetjax.models.model import abstract_model
  from hetjax.checkpoint.repartition import flatten
  rng = np.random.default_rng(0)
  template = flatten(abstract_model(mcfg))
  os.makedirs(d['hf'])
  writer = hf._ShardWriter(d['hf'], 2 * GB)
  for group in hf.expand(mcfg, template):
    for rule in group:
      parts = [rng.random(template[n].shape, dtype=np.float32) * 0.04 - 0.02 for n in rule.ours]
      writer.add(rule.hf, np.ascontiguousarray(rule.transform.to_hf(parts)))
  writer.close()
  with open(os.path.join(d['hf'], 'config.json'), 'w') as f:
    json.dump(hf.hf_config_from(mcfg, 'float32'), f)
  return {}


def phase_import(mcfg, d):
  from hetjax.checkpoint import hf
  t0 = time.perf_counter()
  hf.import_hf(d['hf'], d['ckpt'])
  return {'import_s': time.perf_counter() - t0, 'import_peak_rss_gb': peak_gb()}


def phase_export(mcfg, d):
  from hetjax.checkpoint import hf
  t0 = time.perf_counter()
  hf.export_hf(d['ckpt'], d['export'])
  return {'export_s': time.perf_counter() - t0, 'export_peak_rss_gb': peak_gb()}


def phase_save(mcfg, d):
  import jax
  from hetjax.checkpoint.manager import Checkpointer, StageSpec, load_model
  from flax import nnx
  model, _ = load_model(d['ckpt'])
  params = {'params': nnx.state(model, nnx.Param)}
  jax.block_until_ready(params)
  spec = StageSpec(0, mcfg.num_layers, True, True)
  base_rss = peak_gb()
  ckpt = Checkpointer(d['save'])
  t0 = time.perf_counter()
  ckpt.save(1, [(spec, params)], {'model': {}})
  ckpt.wait()
  save_s = time.perf_counter() - t0
  ckpt.close()
  ckpt = Checkpointer(d['save'], async_save=True)
  t0 = time.perf_counter()
  ckpt.save(2, [(spec, params)], {'model': {}})
  blocked_s = time.perf_counter() - t0
  ckpt.close()
  return {'save_s': save_s, 'async_save_blocking_s': blocked_s,
          'async_save_total_s': time.perf_counter() - t0,
          'save_peak_rss_gb': peak_gb(), 'save_rss_before_gb': base_rss}


def phase_restore(mcfg, d):
  import jax
  from hetjax.checkpoint.manager import Checkpointer
  from hetjax.models.model import abstract_model
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  template = {'params': jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                                     abstract_model(mcfg))}
  ckpt = Checkpointer(d['save'], read_only=True)
  t0 = time.perf_counter()
  (tree,), _ = ckpt.restore([template], step=1)  # straight onto the device, as training does
  jax.block_until_ready(tree)
  return {'restore_s': time.perf_counter() - t0, 'restore_peak_rss_gb': peak_gb()}


PHASES = {'make': phase_make, 'import': phase_import, 'export': phase_export, 'save': phase_save,
          'restore': phase_restore}


def dirs(root):
  return {k: os.path.join(root, k) for k in ('hf', 'ckpt', 'export', 'save')}


def du_gb(path):
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs) / GB


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--model', default='gpt2_xl')
  p.add_argument('--dir', default='/tmp/hetjax_bench')
  p.add_argument('--phase', default='')
  p.add_argument('--keep', action='store_true', help='keep the files afterwards')
  args = p.parse_args()
  from hetjax.models.config import get_model_config
  mcfg = get_model_config(args.model)
  if args.phase:
    print(json.dumps(PHASES[args.phase](mcfg, dirs(args.dir))))
    return
  shutil.rmtree(args.dir, ignore_errors=True)
  results = {'model': args.model, 'params': mcfg.num_params(),
             'fp32_gb': mcfg.num_params() * 4 / GB, 'cpu_count': os.cpu_count()}
  for phase in PHASES:
    out = subprocess.run([sys.executable, __file__, f'--model={args.model}', f'--dir={args.dir}',
                          f'--phase={phase}'], capture_output=True, text=True)
    if out.returncode:
      sys.exit(f'phase {phase} failed:\n{out.stderr[-3000:]}')
    results.update(json.loads(out.stdout.strip().splitlines()[-1]))
    print(phase, 'done', flush=True)
  results.update({f'{k}_disk_gb': du_gb(v) for k, v in dirs(args.dir).items()})
  if not args.keep:
    shutil.rmtree(args.dir, ignore_errors=True)
  print(json.dumps(results, indent=2))
  os.makedirs(os.path.join(ROOT, 'experiments', 'results'), exist_ok=True)
  with open(os.path.join(ROOT, 'experiments', 'results', f'bench_checkpoint_{args.model}.json'), 'w') as f:
    json.dump(results, f, indent=2)


if __name__ == '__main__':
  main()
