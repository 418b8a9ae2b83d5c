"""HF conversion and orbax save/restore: time, peak memory and disk per phase (GPT-2-XL by default).

Reproduces: no paper table; hetjax's checkpoint path (the import/export and orbax re-partitioning
that the runtime relies on), measured on this machine.

  python experiments/bench_checkpoint.py                      # gpt2_xl: ~6 GB of fp32 files, minutes
  python experiments/bench_checkpoint.py --model=tiny_gpt     # seconds

Each phase runs in a fresh process, so its peak resident memory (ru_maxrss, which includes the
~0.4 GB of an idle Python + JAX process) is its own:
  make     a random Hugging Face folder (safetensors shards), not timed
  import   HF folder -> hetjax orbax checkpoint
  export   hetjax checkpoint -> HF folder
  save     the parameters as device arrays -> Checkpointer.save (synchronous; and the time an
           asynchronous save blocks the caller)
  restore  Checkpointer.restore onto the device (the model's abstract state with a sharding)
Writes results.csv (one row per phase) and phases.png into --out; scratch files go to --dir and
are deleted unless --keep. Prints the table last.
"""

import json
import os
import resource
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import print_table, save_figure, wrote, write_csv  # noqa: E402  (sets sys.path)

from absl import app, flags  # noqa: E402

flags.DEFINE_string('out', 'runs/bench_checkpoint/', 'Output folder (results.csv, phases.png).')
flags.DEFINE_string('model', 'gpt2_xl', 'Model preset to convert, save and restore.')
flags.DEFINE_string('dir', '/tmp/hetjax_bench', 'Scratch folder for the checkpoints (deleted after).')
flags.DEFINE_string('phase', '', 'Internal: run one phase in this process and print its JSON.')
flags.DEFINE_bool('keep', False, 'Keep the scratch files afterwards.')
FLAGS = flags.FLAGS
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


def main(argv):
  del argv
  from hetjax.models.config import get_model_config
  mcfg = get_model_config(FLAGS.model)
  if FLAGS.phase:
    print(json.dumps(PHASES[FLAGS.phase](mcfg, dirs(FLAGS.dir))))
    return
  shutil.rmtree(FLAGS.dir, ignore_errors=True)
  results = {}
  for phase in PHASES:
    print(f'{phase} ...', flush=True)
    out = subprocess.run([sys.executable, __file__, f'--model={FLAGS.model}', f'--dir={FLAGS.dir}',
                          f'--phase={phase}'], capture_output=True, text=True)
    if out.returncode:
      sys.exit(f'phase {phase} failed:\n{out.stderr[-3000:]}')
    results.update(json.loads(out.stdout.strip().splitlines()[-1]))
  disk = {k: du_gb(v) for k, v in dirs(FLAGS.dir).items()}
  if not FLAGS.keep:
    shutil.rmtree(FLAGS.dir, ignore_errors=True)
  written = {'import': 'ckpt', 'export': 'export', 'save': 'save'}
  rows = [{'model': FLAGS.model, 'params': mcfg.num_params(), 'phase': p,
           'seconds': results.get(f'{p}_s', float('nan')),
           'async_blocking_s': results.get('async_save_blocking_s', float('nan')) if p == 'save' else float('nan'),
           'peak_rss_gb': results.get(f'{p}_peak_rss_gb', float('nan')),
           'written_gb': disk.get(written.get(p, ''), float('nan'))}
          for p in ('import', 'export', 'save', 'restore')]
  write_csv(os.path.join(FLAGS.out, 'results.csv'), rows)
  plot(rows, os.path.join(FLAGS.out, 'phases.png'))
  wrote(FLAGS.out, 'results.csv', 'phases.png')
  print(f'\n{FLAGS.model}: {mcfg.num_params():,} parameters, {mcfg.num_params() * 4 / GB:.2f} GB in fp32; '
        f'{os.cpu_count()} CPUs')
  print_table(rows)


def plot(rows, path):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  names = [r['phase'] for r in rows]
  fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3))
  a.bar(names, [r['seconds'] for r in rows])
  a.set(ylabel='seconds', title=f'{rows[0]["model"]}: time per phase')
  b.bar(names, [r['peak_rss_gb'] for r in rows], color='#dd8452')
  b.set(ylabel='GB', title='peak resident memory')
  save_figure(fig, path)


if __name__ == '__main__':
  app.run(main)
