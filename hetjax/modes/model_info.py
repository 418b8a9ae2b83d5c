"""mode=model_info: parameter counts, memory and FLOPs of a model preset, computed analytically
(no JAX device set-up, no allocation: llama2_70b prints at once); writes model_info.json only when
--config.workdir is given. tests/test_models.py checks the analytic count against the built model."""

import os

from hetjax.metrics import write_json
from hetjax.models.config import model_config_from

GB = 1024 ** 3


def run(cfg, workdir: str | None) -> None:
  mcfg = model_config_from(cfg)
  params = mcfg.num_params()
  info = {
      'model': cfg.model, 'family': mcfg.family, 'layers': mcfg.num_layers, 'hidden': mcfg.hidden,
      'heads': mcfg.num_heads, 'kv_heads': mcfg.num_kv_heads, 'ffn': mcfg.ffn, 'vocab': mcfg.vocab_size,
      'params': params, 'params_per_block': mcfg.block_params(),
      'weights_gb_fp32': params * 4 / GB, 'weights_gb_bf16': params * 2 / GB,
      'adam_train_state_gb_fp32': params * 16 / GB,  # params + grads + two moments
      'kv_cache_mb_per_token_bf16': mcfg.num_layers * mcfg.kv_bytes_per_token(2) / 1024 ** 2,
      'forward_gflops_per_token_at_max_len': mcfg.num_layers * mcfg.block_flops_per_token(mcfg.max_len) / 1e9,
  }
  width = max(map(len, info))
  for k, v in info.items():
    shown = f'{v:,.3f}' if isinstance(v, float) else f'{v:,}' if isinstance(v, int) else v
    print(f'{k:<{width}}  {shown}')
  if workdir:
    write_json(os.path.join(workdir, 'model_info.json'), info)
