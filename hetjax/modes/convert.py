"""mode=convert: a Hugging Face folder -> a hetjax checkpoint, or a hetjax checkpoint -> a Hugging
Face folder; the direction follows from what `src` is."""

import dataclasses
import os
import time

from hetjax.checkpoint import hf
from hetjax.checkpoint.manager import is_checkpoint, resolve
from hetjax.errors import HetjaxError
from hetjax.metrics import write_json


def run(cfg, workdir: str) -> None:
  if not cfg.src or not cfg.dst:
    raise HetjaxError('give both --config.src=PATH and --config.dst=PATH')
  if not os.path.exists(cfg.src):
    raise HetjaxError(f'source {cfg.src} does not exist')
  if os.path.abspath(cfg.src) == os.path.abspath(cfg.dst):
    raise HetjaxError('src and dst are the same path')
  t0 = time.perf_counter()
  if hf.is_hf_dir(cfg.src):
    direction = 'import'
    mcfg = hf.import_hf(cfg.src, cfg.dst, cfg.dtype, cfg.overwrite)
  elif is_checkpoint(resolve(cfg.src)):
    direction = 'export'
    mcfg = hf.export_hf(cfg.src, cfg.dst, cfg.dtype, cfg.overwrite)
  else:
    raise HetjaxError(f'{cfg.src} is neither a Hugging Face folder (config.json with model_type) '
                      f'nor a hetjax checkpoint')
  seconds = time.perf_counter() - t0
  print(f'{direction}ed {mcfg.family} ({mcfg.num_params():,} parameters) to {cfg.dst} in {seconds:.1f}s')
  write_json(os.path.join(workdir, 'convert.json'),
             {'direction': direction, 'src': cfg.src, 'dst': cfg.dst, 'seconds': seconds,
              'model': dataclasses.asdict(mcfg)})
