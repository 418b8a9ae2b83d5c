"""Fields every job shares. Other configs start from `get_config()` and add their own."""

import ml_collections
from ml_collections import config_dict


def model_overrides() -> ml_collections.ConfigDict:
  """Optional per-field overrides of the model preset (None = keep the preset's value)."""
  fields = {'num_layers': int, 'hidden': int, 'num_heads': int, 'num_kv_heads': int, 'ffn': int,
            'vocab_size': int, 'max_len': int, 'rope_theta': float, 'norm_eps': float,
            'tie_embeddings': bool, 'dtype': str, 'param_dtype': str}
  return ml_collections.ConfigDict({k: config_dict.placeholder(t) for k, t in fields.items()})


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.mode = 'train'
  c.model = 'tiny_gpt'            # a preset name from hetjax/models/config.py
  c.model_overrides = model_overrides()
  c.workdir = ''                  # default: a fresh folder under runs/
  c.seed = 0
  return c


def add_training_data_fields(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """What training jobs add: data, fine-tuning start, AQ-SGD and DP compression settings."""
  c.data = ml_collections.ConfigDict(dict(path=''))  # '': shipped corpus; a text file, folder or .npy
  c.init_from = ''                # fine-tune from a converted HF checkpoint or a training workdir
  c.aqsgd = aqsgd_fields()
  c.dp = ml_collections.ConfigDict(dict(grad_bits=0))  # 0: fp32 DP all-reduce; 2/4/8: compressed
  return c


def aqsgd_fields() -> ml_collections.ConfigDict:
  """AQ-SGD (--config.pipeline.codec=aqsgd<fw bits>): full precision for `warmup_epochs`, buffers
  on device|host|disk in buffer_dtype, rounding nearest|stochastic, scales per channel or in groups
  of group_size (0: per channel), buffer_budget_gb: refuse stores larger than this (0: no limit)."""
  return ml_collections.ConfigDict(dict(
      warmup_epochs=1, buffers='host', buffer_dtype='float16', rounding='nearest', group_size=0,
      buffer_budget_gb=0.0))


def train_fields() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      steps=300, batch_size=16, seq_len=128, lr=3e-3, warmup_steps=30, min_lr_ratio=0.1,
      weight_decay=0.1, clip_norm=1.0, log_every=25, eval_every=100, eval_batches=4,
      max_bad_steps=0))  # steps with a non-finite loss/grad norm to skip before stopping


def generate_fields() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      prompt='', prompt_ids='', max_new_tokens=64, temperature=0.0, top_k=0, top_p=1.0,
      stop_at_eos=True))


def checkpoint_fields() -> ml_collections.ConfigDict:
  """Train checkpoints in <workdir>/checkpoints: every N steps (0: only the last step), keep the
  last K (0: all), written in the background."""
  return ml_collections.ConfigDict(dict(every=0, keep=3, async_save=True))


def pipeline_fields() -> ml_collections.ConfigDict:
  """Training through the pipeline runtime. plan: '' trains on one device; 'search' plans over
  `cluster` now (with calibrate=true: over this run's devices measured first, mode=calibrate's
  method); any other value is a plan.json path. The batch is micro-batches x replicas x
  micro_batch_size sequences (train.batch_size must match a loaded plan's)."""
  return ml_collections.ConfigDict(dict(
      plan='', cluster='local_hetero', schedule='1f1b', micro_batch_size=4,
      codec='fp32', grad_codec='fp32', transport='auto', search_evaluations=300,
      profile_every=0, calibrate=False))
