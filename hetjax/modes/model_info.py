"""mode=model_info: parameter counts and memory of a model preset, without allocating it."""

from hetjax.metrics import write_json
from hetjax.models.config import model_config_from
from hetjax.models.model import abstract_model, count_params

import os

GB = 1024 ** 3


def run(cfg, workdir: str) -> None:
  mcfg = model_config_from(cfg)
  counted = count_params(abstract_model(mcfg))
  info = {
      'model': cfg.model, 'family': mcfg.family, 'layers': mcfg.num_layers, 'hidden': mcfg.hidden,
      'heads': mcfg.num_heads, 'kv_heads': mcfg.num_kv_heads, 'ffn': mcfg.ffn, 'vocab': mcfg.vocab_size,
      'params': counted, 'params_per_block': mcfg.block_params(),
      'weights_gb_fp32': counted * 4 / GB, 'weights_gb_bf16': counted * 2 / GB,
      'adam_train_state_gb_fp32': counted * 16 / GB,  # params + grads + two moments
      'kv_cache_mb_per_token_bf16': mcfg.num_layers * mcfg.kv_bytes_per_token(2) / 1024 ** 2,
      'forward_gflops_per_token_at_max_len': mcfg.num_layers * mcfg.block_flops_per_token(mcfg.max_len) / 1e9,
  }
  width = max(map(len, info))
  for k, v in info.items():
    print(f'{k:<{width}}  {v:,.3f}' if isinstance(v, float) else f'{k:<{width}}  {v:,}' if isinstance(v, int) else f'{k:<{width}}  {v}')
  write_json(os.path.join(workdir, 'model_info.json'), info)
