"""Checks every field of a job config (configs/*.py after --config.a.b=v overrides) before it runs:
type, range and finiteness, with bounds on sizes that would otherwise run for hours or exhaust
memory. One HetjaxError names the first bad field."""

from __future__ import annotations

import math

from hetjax import checks
from hetjax.errors import HetjaxError

BIG = 10 ** 9          # steps, batch sizes and other counts that merely have to fit in memory
MAX_DEVICES = 1024     # as cluster.MAX_DEVICES
MAX_POPULATION = 10_000
MAX_EVALUATIONS = 1_000_000
MAX_LEN = 1_000_000    # sequence, prompt and generation lengths

# Field (dotted path, as on the command line) -> check. ('int', lo, hi), ('real', lo, hi[, open]):
# a finite number in [lo, hi] ((lo, hi] when open), ('str', choices or None), ('bool',);
# a leading '?' allows None.
RULES = {
    'mode': ('str', None), 'model': ('str', None), 'workdir': ('str', None),
    'seed': ('int', 0, 2 ** 32 - 1), 'resume': ('?bool',),
    'model_overrides.num_layers': ('?int', 1, 100_000),
    'model_overrides.hidden': ('?int', 1, 1 << 20),
    'model_overrides.num_heads': ('?int', 1, 1 << 16),
    'model_overrides.num_kv_heads': ('?int', 1, 1 << 16),
    'model_overrides.ffn': ('?int', 1, 1 << 22),
    'model_overrides.vocab_size': ('?int', 1, 1 << 24),
    'model_overrides.max_len': ('?int', 1, MAX_LEN),
    'model_overrides.rope_theta': ('?real', 0, 1e12, True),
    'model_overrides.norm_eps': ('?real', 0, 1, True),
    'model_overrides.tie_embeddings': ('?bool',),
    'model_overrides.dtype': ('?str', ('float32', 'bfloat16')),
    'model_overrides.param_dtype': ('?str', ('float32', 'bfloat16')),
    # training (mode=train)
    'train.steps': ('int', 1, BIG), 'train.batch_size': ('int', 1, BIG),
    'train.seq_len': ('int', 0, MAX_LEN), 'train.lr': ('real', 0, 1e6, True),
    'train.warmup_steps': ('int', 0, BIG), 'train.min_lr_ratio': ('real', 0, 1),
    'train.weight_decay': ('real', 0, 1e6), 'train.clip_norm': ('real', 0, 1e12, True),
    'train.log_every': ('int', 1, BIG), 'train.eval_every': ('int', 0, BIG),
    'train.eval_batches': ('int', 1, 100_000), 'train.max_bad_steps': ('int', 0, BIG),
    'ckpt.every': ('int', 0, BIG), 'ckpt.keep': ('int', 0, 1_000_000), 'ckpt.async_save': ('bool',),
    'pipeline.plan': ('str', None), 'pipeline.cluster': ('str', None),
    'pipeline.schedule': ('str', ('gpipe', '1f1b')), 'pipeline.micro_batch_size': ('int', 1, BIG),
    'pipeline.codec': ('str', None), 'pipeline.grad_codec': ('str', None),
    'pipeline.transport': ('str', ('auto', 'device_put', 'pair', 'socket')),
    'pipeline.search_evaluations': ('int', 1, MAX_EVALUATIONS),
    'pipeline.profile_every': ('int', 0, BIG), 'pipeline.calibrate': ('bool',),
    # generation
    'generate.prompt': ('str', None), 'generate.prompt_ids': ('str', None),
    'generate.max_new_tokens': ('int', 0, MAX_LEN), 'generate.temperature': ('real', 0, 1e6),
    'generate.top_k': ('int', 0, 1 << 24), 'generate.top_p': ('real', 0, 1, True),
    'prompt_ids': ('str', None), 'checkpoint': ('str', None),
    # planning (mode=plan)
    'cluster': ('str', None), 'num_devices': ('int', 0, MAX_DEVICES),
    'train.global_batch': ('int', 1, BIG), 'train.micro_batch_size': ('int', 1, BIG),
    'train.schedule': ('str', ('gpipe', '1f1b')), 'train.efficiency': ('real', 0, 1),  # 0: auto
    'train.activation_bits': ('int', 1, 32), 'train.recompute': ('bool',),
    'search.method': ('str', None), 'search.d_pp': ('int', 0, MAX_DEVICES),
    'search.tp': ('int', 0, MAX_DEVICES), 'search.population': ('int', 2, MAX_POPULATION),
    'search.evaluations': ('int', 1, MAX_EVALUATIONS),
    'search.screen_evaluations': ('int', 0, MAX_EVALUATIONS),
    'search.finalists': ('int', 1, 1000), 'search.uneven_layers': ('bool',),
    'search.time_limit': ('real', 0, 1e7), 'draw': ('bool',),
    # inference planning (mode=plan_inference)
    'method': ('str', None), 'objective': ('str', None),  # the mode names the choices
    'prompt_len': ('int', 1, MAX_LEN), 'gen_len': ('int', 1, MAX_LEN),
    'deadline': ('real', 0, 1e7), 'slo_scale': ('real', 0, 1e6, True),
    'reference_cluster': ('str', None), 'slo_margin': ('real', 0, 1, True),
    'rate': ('real', 0, 1e9, True), 'max_batch': ('int', 1, 1_000_000),
    'population': ('int', 2, MAX_POPULATION), 'evaluations': ('int', 1, MAX_EVALUATIONS),
    'time_limit': ('real', 0, 1e7), 'dispatch': ('str', ('shortest_completion', 'round_robin')),
    'num_requests': ('int', 1, 10_000_000),
    # offload policy / conversion
    'hardware': ('str', None), 'gpu_mem_gb': ('real', 0, 1e7), 'cpu_mem_gb': ('real', 0, 1e7),
    'compress': ('bool',), 'src': ('str', None), 'dst': ('str', None),
    'dtype': ('str', ('', 'float32', 'bfloat16')), 'overwrite': ('bool',),
}


def _leaves(d: dict, prefix: str = ''):
  for key, value in d.items():
    path = f'{prefix}{key}'
    if isinstance(value, dict):
      yield from _leaves(value, path + '.')
    else:
      yield path, value


def check_value(path: str, value, rule) -> None:
  kind, *args = rule
  if kind.startswith('?'):
    if value is None:
      return
    kind = kind[1:]
  what = f'--config.{path}'
  if kind == 'int':
    checks.integer(value, what, *args)
  elif kind == 'real':
    lo, hi, *lo_open = args
    checks.real(value, what, lo, hi, lo_open=bool(lo_open and lo_open[0]))
  elif kind == 'str':
    checks.text(value, what, args[0])
  else:
    checks.flag(value, what)


def check_config(cfg) -> None:
  """Raise HetjaxError for the first field that breaks its rule; fields without a rule must at
  least not be non-finite numbers."""
  try:
    fields = dict(_leaves(cfg.to_dict() if hasattr(cfg, 'to_dict') else dict(cfg)))
  except (TypeError, ValueError) as e:
    raise HetjaxError(f'bad config: {e}') from None
  for path, value in fields.items():
    rule = RULES.get(path)
    if rule is not None:
      check_value(path, value, rule)
    elif isinstance(value, float) and not math.isfinite(value):
      raise HetjaxError(f'--config.{path} must be finite, got {value!r}')
