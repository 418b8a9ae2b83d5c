"""mode=offload_policy: FlexGen policy (placement fractions, block shape, CPU attention, compression)
for a model on one GPU of a described machine; prints it and writes policy.json + plan.json."""

from __future__ import annotations

import os

from hetjax.costmodel.offload import Workload, load_hardware
from hetjax.metrics import write_json
from hetjax.models.config import model_config_from
from hetjax.plan import Plan, Replica, Stage


def run(cfg, workdir: str) -> None:
  from hetjax.search.policy_lp import check_policy, search_policy

  model = model_config_from(cfg)
  if cfg.hardware == 'local' and cfg.gpu_mem_gb:
    from hetjax.costmodel.offload import local_hardware
    import dataclasses
    hw = dataclasses.replace(local_hardware(gpu_mem_gb=cfg.gpu_mem_gb), **({'cpu_mem_gb': cfg.cpu_mem_gb} if cfg.cpu_mem_gb else {}))
  else:
    hw = load_hardware(cfg.hardware, gpu_mem_gb=cfg.gpu_mem_gb, cpu_mem_gb=cfg.cpu_mem_gb)
  wl = Workload(cfg.prompt_len, cfg.gen_len).validate()
  print(f'hardware {hw.name}: GPU {hw.gpu_mem_gb:.3g} GB, CPU {hw.cpu_mem_gb:.3g} GB, disk {hw.disk_gb:.4g} GB, '
        f'CPU<->GPU {hw.ctog_gbs:.3g} GB/s, disk {hw.dtoc_gbs:.3g} GB/s, GPU {hw.gpu_tflops_prefill:.3g}/'
        f'{hw.gpu_tflops_decode:.3g} TFLOP/s (prefill/decode), CPU {hw.cpu_tflops:.3g} TFLOP/s')
  res = search_policy(model, hw, wl, compress=cfg.compress)
  p = res.best
  problems = check_policy(model, hw, wl, p)
  print(f'{cfg.model} prompt {wl.prompt_len} gen {wl.gen_len}: {p.describe()}')
  print(f'per layer: prefill {p.t_prefill * 1e3:.2f} ms ({p.bottleneck["prefill"]}-bound), decode step '
        f'{p.t_decode * 1e3:.2f} ms ({p.bottleneck["decode"]}-bound); block of {p.shape.block} sequences in '
        f'{p.total_s:.1f} s')
  print(f'LP search: {res.solved} shapes, {res.feasible} feasible, {res.seconds:.2f} s'
        + ('' if not problems else f'; VIOLATIONS: {problems}'))
  off = p.to_plan_offload()
  plan = Plan(replicas=[Replica([Stage(0, model.num_layers, [0])], max_batch=p.shape.block)],
              num_layers=model.num_layers, kind='serve', model=cfg.model, cluster=hw.name,
              seq_len=wl.prompt_len, gen_len=wl.gen_len, offload=off,
              prediction={'throughput_tok_s': p.throughput, 'block_seconds': p.total_s},
              search={'method': 'flexgen_lp', 'shapes': res.solved, 'seconds': res.seconds})
  plan.validate(model=model)
  plan.save(os.path.join(workdir, 'plan.json'))
  write_json(os.path.join(workdir, 'policy.json'), {**off, 'hardware': hw.__dict__, 'model': cfg.model,
                                                   'prompt_len': wl.prompt_len, 'gen_len': wl.gen_len})
  print(f'wrote {os.path.join(workdir, "policy.json")} and plan.json')
