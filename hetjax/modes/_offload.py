"""mode=generate with offload.policy set: FlexGen-style offloaded generation (hetjax/inference/offload.py).

Deciding meets executing here: `offload.policy=search` solves the FlexGen LP (search/policy_lp.py) for
this machine with the offload.device_gb / host_gb budgets and the disk folder's free space; a JSON path
loads a policy (policy.json of mode=offload_policy, or any dict with the same fields). Prints the same
ids line as in-memory generation and writes offload_metrics.json."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import types

import jax.numpy as jnp
import numpy as np

from hetjax.errors import HetjaxError
from hetjax.inference.generate import check_prompt
from hetjax.inference.offload import (BudgetError, OffloadEngine, OffloadPolicy, check_disk_dir, model_parts,
                                      random_ends, random_layers)
from hetjax.metrics import write_json
from hetjax.models.config import ModelConfig, model_config_from

GB = 1e9
WHOLE_MODEL_LIMIT = 1e9   # random models up to this many bytes are built whole (same ids as in-memory)


def hardware_for_dtype(hw, itemsize: int):
  """The cost model counts fp16 bytes; for wider values shrink capacities and bandwidths by the same
  factor, which is exactly the cost model evaluated with `itemsize`-byte weights and cache."""
  f = itemsize / 2
  if f == 1:
    return hw
  names = ('gpu_mem_gb', 'cpu_mem_gb', 'disk_gb', 'ctog_gbs', 'gtoc_gbs', 'dtoc_gbs', 'ctod_gbs', 'gpu_mem_bw_gbs')
  return dataclasses.replace(hw, **{n: getattr(hw, n) / f for n in names})


def probe_hardware(model: ModelConfig, device_gb: float, host_gb: float, disk_dir: str):
  """This machine's FlexGen hardware numbers with the run's budgets as capacities."""
  from hetjax.costmodel.offload import local_hardware
  hw = local_hardware(gpu_mem_gb=device_gb)
  hw = dataclasses.replace(hw, cpu_mem_gb=host_gb, disk_gb=shutil.disk_usage(disk_dir).free / GB)
  return hardware_for_dtype(hw, jnp.dtype(model.param_dtype).itemsize)


def search(model: ModelConfig, name: str, ocfg, prompt_len: int, gen_len: int, disk_dir: str, cap: int,
           hw=None):
  """(policy, hardware, cost-model policy) chosen by the LP for this machine and the budgets, among
  blocks (gpu_batch_size x num_gpu_batches) of at most `cap` sequences."""
  from hetjax.costmodel.offload import Workload
  from hetjax.search.policy_lp import candidate_shapes, solve_shape
  hw = hw or probe_hardware(model, ocfg.device_gb, ocfg.host_gb, disk_dir)
  wl = Workload(prompt_len, gen_len).validate()
  best = None
  for shape in candidate_shapes(ocfg.compress):
    if shape.block > cap or (ocfg.cpu_attention and not shape.cpu_attention):
      continue
    p = solve_shape(model, hw, wl, shape)
    if p is not None and (best is None or p.throughput > best.throughput * (1 + 1e-9)):
      best = p
  if best is None:
    raise HetjaxError(f'no offloading policy with blocks of at most {cap} fits {name}: '
                      f'{model.num_layers * model.block_params() * jnp.dtype(model.param_dtype).itemsize / GB:.3g} '
                      f'GB of layer weights against offload.device_gb={ocfg.device_gb}, host_gb={ocfg.host_gb} '
                      f'and {hw.disk_gb * jnp.dtype(model.param_dtype).itemsize / 2:.4g} GB free on disk')
  best = solve_shape(model, hw, wl, best.shape, prefer_fast=True)
  return OffloadPolicy.from_dict({**best.to_plan_offload(), 'model': name}, 'searched policy'), hw, best


def load_policy(path: str) -> OffloadPolicy:
  try:
    with open(path) as f:
      d = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise HetjaxError(f'cannot read offload policy {path}: {e}') from None
  if not isinstance(d, dict):
    raise HetjaxError(f'offload policy {path} is not a JSON object')
  if isinstance(d.get('offload'), dict):   # a plan.json of mode=offload_policy
    d = {**d['offload'], 'model': d.get('model', '')}
  return OffloadPolicy.from_dict(d, f'offload policy {path}')


def check_budgets(ocfg) -> None:
  for name in ('device_gb', 'host_gb'):
    v = ocfg[name]
    if not (isinstance(v, (int, float)) and np.isfinite(v) and v > 0):
      raise HetjaxError(f'offload.{name} must be a positive number of GB, got {v!r}')


def run_offloaded(cfg, workdir: str) -> None:
  from hetjax.modes.generate import cut_at_eos, parse_prompt, print_ids
  from hetjax.tokenizer import eos_ids
  ocfg = cfg.offload
  check_budgets(ocfg)
  disk_dir = ocfg.disk_dir or workdir
  check_disk_dir(disk_dir)
  prompt = parse_prompt(cfg.generate, cfg.get('prompt_ids', ''))
  gen_len = int(cfg.generate.max_new_tokens)
  if cfg.get('checkpoint'):
    from hetjax.checkpoint.manager import load_model
    full, _ = load_model(cfg.checkpoint)
    model, name = full.cfg, 'checkpoint'
  else:
    model, name, full = model_config_from(cfg), cfg.model, None
  check_prompt(types.SimpleNamespace(cfg=model), prompt.shape[1], gen_len)
  if ocfg.policy == 'search':
    policy, hw, predicted = search(model, name, ocfg, prompt.shape[1], gen_len, disk_dir, max(1, ocfg.max_block))
  else:
    policy = load_policy(ocfg.policy)
    predicted = None
    if ocfg.compress:
      policy = dataclasses.replace(policy, compress_weight=True,
                                   compress_kv=not (ocfg.cpu_attention or policy.cpu_attention))
    if ocfg.cpu_attention:
      policy = dataclasses.replace(policy, cpu_attention=True)
    policy = policy.validate('offload policy')
  policy.check_model(model, name)
  if full is None and model.num_params() * jnp.dtype(model.param_dtype).itemsize <= WHOLE_MODEL_LIMIT:
    from hetjax.models.model import build_model
    full = build_model(model, cfg.seed)
  layers, ends = model_parts(full) if full is not None else (random_layers(model, cfg.seed),
                                                            random_ends(model, cfg.seed))
  while True:
    if predicted is not None:
      print(f'offload policy (LP search): {predicted.describe()}')
    try:
      engine = OffloadEngine(model, policy, layers, ends, prompt_len=prompt.shape[1], gen_len=gen_len,
                             device_gb=ocfg.device_gb, host_gb=ocfg.host_gb, disk_dir=disk_dir)
      break
    except BudgetError as e:   # the engine counts exact bytes; the LP's estimate can be lower
      if predicted is None or policy.block == 1:
        raise
      cap = policy.block // 2
      print(f'refused: {e}; searching again with blocks of at most {cap}')
      policy, hw, predicted = search(model, name, ocfg, prompt.shape[1], gen_len, disk_dir, cap, hw)
  try:
    g = cfg.generate
    ids, timing = engine.generate(prompt, temperature=g.temperature, top_k=g.top_k, top_p=g.top_p, seed=cfg.seed)
    metrics = engine.metrics(timing)
  finally:
    engine.close()
  if predicted is not None:
    metrics['predicted_tokens_per_s'] = predicted.throughput
  write_json(os.path.join(workdir, 'offload_metrics.json'), metrics)
  peak = metrics['peak_resident_bytes']
  print(f'offloaded generation: {metrics["tokens_per_s"]:.3g} tok/s for a block of {policy.block}; peak resident '
        f'device/host/disk {peak["device"] / GB:.3g}/{peak["host"] / GB:.3g}/{peak["disk"] / GB:.3g} GB')
  if cfg.generate.get('stop_at_eos', True):
    ids = cut_at_eos(ids, eos_ids(cfg.get('checkpoint', '')))
  print_ids(ids)
