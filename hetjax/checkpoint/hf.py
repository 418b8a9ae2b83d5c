"""Hugging Face GPT-2 / Llama <-> hetjax checkpoints, one declarative name map per family.

A map is a list of `Rule(hf name, hetjax names, transform)`; `{i}` stands for the layer index. The
transform turns one HF tensor into the hetjax tensors (`to_ours`) and back (`to_hf`):
- nnx.Linear kernels are [in, out]; torch nn.Linear weights are [out, in] -> transpose.
- GPT-2's Conv1D weights are already [in, out]; its fused c_attn [H, 3H] splits into q, k, v.
- Llama q/k: Hugging Face applies RoPE in the half-split (rotate_half) layout, and so does hetjax
  (layers.rope), so q_proj/k_proj rows map over unpermuted. (The interleaved layout of Meta's
  original checkpoints is what HF's own converter permutes away; it never reaches us.) The logits
  test checks this, and tests that the interleaved permutation would break it.

Conversion goes tensor by tensor: import reads one HF tensor at a time into the hetjax tree (one
copy of the model in host memory); export reads the hetjax checkpoint a layer at a time and writes
safetensors shards of at most `shard_bytes`. The destination appears only when complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
import time
from typing import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from hetjax.checkpoint.manager import (Checkpointer, StageSpec, model_config_of, resolve,
                                       tensor_index)
from hetjax.checkpoint.repartition import check, flatten
from hetjax.errors import HetjaxError
from hetjax.models.config import ModelConfig
from hetjax.tokenizer import FOLDER as TOKENIZER_FOLDER, copy_tokenizer_files, tokenizer_folder

DTYPES = ('float32', 'bfloat16')


@dataclasses.dataclass(frozen=True)
class Transform:
  to_ours: Callable[[np.ndarray], list]
  to_hf: Callable[[list], np.ndarray]


SAME = Transform(lambda x: [x], lambda xs: xs[0])
TRANSPOSE = Transform(lambda x: [x.T], lambda xs: xs[0].T)
SPLIT_QKV = Transform(lambda x: np.split(x, 3, axis=-1), lambda xs: np.concatenate(xs, axis=-1))


@dataclasses.dataclass(frozen=True)
class Rule:
  hf: str
  ours: tuple[str, ...]
  transform: Transform = SAME


def _rules(*rows) -> list[Rule]:
  return [Rule(hf, (ours,) if isinstance(ours, str) else tuple(ours), *t) for hf, ours, *t in rows]


_B = 'blocks/{i}/'
GPT2_MAP = _rules(
    ('transformer.wte.weight', 'token_embed/embedding'),
    ('transformer.wpe.weight', 'pos_embed/embedding'),
    ('transformer.h.{i}.ln_1.weight', _B + 'attn_norm/scale'),
    ('transformer.h.{i}.ln_1.bias', _B + 'attn_norm/bias'),
    ('transformer.h.{i}.attn.c_attn.weight', [_B + f'attn/{p}/kernel' for p in 'qkv'], SPLIT_QKV),
    ('transformer.h.{i}.attn.c_attn.bias', [_B + f'attn/{p}/bias' for p in 'qkv'], SPLIT_QKV),
    ('transformer.h.{i}.attn.c_proj.weight', _B + 'attn/o/kernel'),
    ('transformer.h.{i}.attn.c_proj.bias', _B + 'attn/o/bias'),
    ('transformer.h.{i}.ln_2.weight', _B + 'mlp_norm/scale'),
    ('transformer.h.{i}.ln_2.bias', _B + 'mlp_norm/bias'),
    ('transformer.h.{i}.mlp.c_fc.weight', _B + 'mlp/up/kernel'),
    ('transformer.h.{i}.mlp.c_fc.bias', _B + 'mlp/up/bias'),
    ('transformer.h.{i}.mlp.c_proj.weight', _B + 'mlp/down/kernel'),
    ('transformer.h.{i}.mlp.c_proj.bias', _B + 'mlp/down/bias'),
    ('transformer.ln_f.weight', 'final_norm/scale'),
    ('transformer.ln_f.bias', 'final_norm/bias'),
    ('lm_head.weight', 'lm_head/kernel', TRANSPOSE),  # untied heads only
)

LLAMA_MAP = _rules(
    ('model.embed_tokens.weight', 'token_embed/embedding'),
    ('model.layers.{i}.input_layernorm.weight', _B + 'attn_norm/scale'),
    ('model.layers.{i}.self_attn.q_proj.weight', _B + 'attn/q/kernel', TRANSPOSE),  # no RoPE permutation
    ('model.layers.{i}.self_attn.k_proj.weight', _B + 'attn/k/kernel', TRANSPOSE),
    ('model.layers.{i}.self_attn.v_proj.weight', _B + 'attn/v/kernel', TRANSPOSE),
    ('model.layers.{i}.self_attn.o_proj.weight', _B + 'attn/o/kernel', TRANSPOSE),
    ('model.layers.{i}.post_attention_layernorm.weight', _B + 'mlp_norm/scale'),
    ('model.layers.{i}.mlp.gate_proj.weight', _B + 'mlp/gate/kernel', TRANSPOSE),
    ('model.layers.{i}.mlp.up_proj.weight', _B + 'mlp/up/kernel', TRANSPOSE),
    ('model.layers.{i}.mlp.down_proj.weight', _B + 'mlp/down/kernel', TRANSPOSE),
    ('model.norm.weight', 'final_norm/scale'),
    ('lm_head.weight', 'lm_head/kernel', TRANSPOSE),  # untied heads only
)

MAPS = {'gpt2': GPT2_MAP, 'llama': LLAMA_MAP}
# HF tensors that carry no weights (old causal-mask and RoPE buffers).
IGNORED_SUFFIXES = ('.attn.bias', '.attn.masked_bias', '.rotary_emb.inv_freq')


def expand(mcfg: ModelConfig, param_names: Iterable[str]) -> list[list[Rule]]:
  """The family's rules per layer group ([embed/head rules, layer 0, layer 1, ...]), keeping only
  those whose hetjax tensors the model has (no lm_head when tied, no pos_embed for Llama)."""
  have = set(param_names)
  groups: list[list[Rule]] = [[] for _ in range(mcfg.num_layers + 1)]
  for rule in MAPS[mcfg.family]:
    layers = range(mcfg.num_layers) if '{i}' in rule.hf else [None]
    for i in layers:
      r = Rule(rule.hf.format(i=i), tuple(n.format(i=i) for n in rule.ours), rule.transform)
      if all(n in have for n in r.ours):
        groups[0 if i is None else i + 1].append(r)
  return [g for g in groups if g]


# ---- configs ----

def _require(ok: bool, what: str) -> None:
  if not ok:
    raise HetjaxError(f'unsupported Hugging Face config: {what}')


def _dtype(requested: str, source: str | None) -> str:
  if requested:
    if requested not in DTYPES:
      raise HetjaxError(f'dtype must be one of {DTYPES}, got {requested!r}')
    return requested
  return source if source in DTYPES else 'float32'


def model_config_from_hf(hf: dict, dtype: str = '') -> ModelConfig:
  """The hetjax ModelConfig of a Hugging Face config.json (GPT-2 or Llama)."""
  family = hf.get('model_type')
  dt = _dtype(dtype, hf.get('dtype') or hf.get('torch_dtype'))
  if family == 'gpt2':
    _require(hf.get('activation_function', 'gelu_new') in ('gelu_new', 'gelu_pytorch_tanh'),
             f'activation {hf.get("activation_function")} (hetjax GPT-2 uses tanh GELU)')
    _require(hf.get('scale_attn_weights', True) and not hf.get('scale_attn_by_inverse_layer_idx'),
             'non-standard attention scaling')
    return ModelConfig(
        'gpt2', hf['n_layer'], hf['n_embd'], hf['n_head'], hf['n_head'],
        hf.get('n_inner') or 4 * hf['n_embd'], hf['vocab_size'], hf['n_positions'],
        norm_eps=hf.get('layer_norm_epsilon', 1e-5), tie_embeddings=hf.get('tie_word_embeddings', True),
        dtype=dt, param_dtype=dt).validate()
  if family == 'llama':
    rope = hf.get('rope_parameters') or hf.get('rope_scaling') or {}
    _require(rope.get('rope_type', rope.get('type', 'default')) == 'default', f'RoPE scaling {rope}')
    _require(hf.get('hidden_act', 'silu') == 'silu', f'activation {hf.get("hidden_act")}')
    _require(not hf.get('attention_bias') and not hf.get('mlp_bias'), 'biases in attention or MLP')
    heads = hf['num_attention_heads']
    _require(hf.get('head_dim') in (None, hf['hidden_size'] // heads), 'head_dim != hidden/heads')
    return ModelConfig(
        'llama', hf['num_hidden_layers'], hf['hidden_size'], heads,
        hf.get('num_key_value_heads') or heads, hf['intermediate_size'], hf['vocab_size'],
        hf['max_position_embeddings'], rope_theta=float(hf.get('rope_theta') or rope.get('rope_theta', 1e4)),
        norm_eps=hf.get('rms_norm_eps', 1e-6), tie_embeddings=hf.get('tie_word_embeddings', False),
        dtype=dt, param_dtype=dt).validate()
  raise HetjaxError(f'unsupported model_type {family!r}; hetjax converts gpt2 and llama')


def hf_config_from(mcfg: ModelConfig, dtype: str, base: dict | None = None) -> dict:
  """config.json for a ModelConfig; fields of `base` (the imported config, if any) are kept."""
  c = dict(base or {})
  if mcfg.family == 'gpt2':
    c.update(architectures=['GPT2LMHeadModel'], model_type='gpt2', n_layer=mcfg.num_layers,
             n_embd=mcfg.hidden, n_head=mcfg.num_heads, n_inner=mcfg.ffn, vocab_size=mcfg.vocab_size,
             n_positions=mcfg.max_len, layer_norm_epsilon=mcfg.norm_eps, activation_function='gelu_new')
  else:
    c.update(architectures=['LlamaForCausalLM'], model_type='llama', num_hidden_layers=mcfg.num_layers,
             hidden_size=mcfg.hidden, num_attention_heads=mcfg.num_heads,
             num_key_value_heads=mcfg.num_kv_heads, head_dim=mcfg.head_dim,
             intermediate_size=mcfg.ffn, vocab_size=mcfg.vocab_size,
             max_position_embeddings=mcfg.max_len, rms_norm_eps=mcfg.norm_eps, hidden_act='silu',
             attention_bias=False, mlp_bias=False, rope_theta=mcfg.rope_theta,
             rope_parameters={'rope_type': 'default', 'rope_theta': mcfg.rope_theta})
    c.pop('rope_scaling', None)
  c.update(tie_word_embeddings=mcfg.tie_embeddings, dtype=dtype)
  c.pop('torch_dtype', None)
  return c


# ---- files ----

def is_hf_dir(path: str) -> bool:
  cfg = os.path.join(path, 'config.json')
  if not os.path.isfile(cfg):
    return False
  with open(cfg) as f:
    return 'model_type' in json.load(f)


def hf_tensor_files(path: str) -> dict[str, str]:
  """{tensor name: safetensors file} for model.safetensors or a sharded index."""
  single = os.path.join(path, 'model.safetensors')
  index = os.path.join(path, 'model.safetensors.index.json')
  if os.path.isfile(index):
    with open(index) as f:
      return {name: os.path.join(path, file) for name, file in json.load(f)['weight_map'].items()}
  if os.path.isfile(single):
    return {name: single for name in SafetensorsReader(single).header}
  raise HetjaxError(f'{path} has no model.safetensors or model.safetensors.index.json')


class SafetensorsReader:
  """Reads one tensor at a time with plain file reads. (safetensors' safe_open maps the whole
  file, and the pages it touches stay resident: a second copy of the model in memory.)"""

  DTYPES = {'F32': 'float32', 'BF16': 'bfloat16', 'F16': 'float16', 'F64': 'float64',
            'I64': 'int64', 'I32': 'int32', 'U8': 'uint8', 'BOOL': 'bool'}

  def __init__(self, path: str):
    self.path = path
    with open(path, 'rb') as f:
      size = int.from_bytes(f.read(8), 'little')
      self.header = json.loads(f.read(size))
    self.header.pop('__metadata__', None)
    self.data_start = 8 + size

  def get(self, name: str) -> np.ndarray:
    info = self.header[name]
    if info['dtype'] not in self.DTYPES:
      raise HetjaxError(f'{self.path}: tensor {name} has unsupported dtype {info["dtype"]}')
    dtype = jnp.dtype(self.DTYPES[info['dtype']])
    start, end = info['data_offsets']
    with open(self.path, 'rb') as f:
      f.seek(self.data_start + start)
      x = np.fromfile(f, dtype=dtype, count=(end - start) // dtype.itemsize)
    return x.reshape(info['shape'])


def progress(items: Sequence, label: str, stream=sys.stderr):
  """Yield items while redrawing a one-line progress bar (at most ten times a second)."""
  n, t0, shown, width = len(items), time.perf_counter(), 0.0, 30
  for k, item in enumerate(items):
    yield item
    now = time.perf_counter()
    if now - shown >= 0.1 or k + 1 == n:
      done = (k + 1) * width // max(n, 1)
      stream.write(f'\r{label} [{"#" * done}{"." * (width - done)}] {k + 1}/{n}  {now - t0:.1f}s')
      stream.flush()
      shown = now
  stream.write('\n')


def _refuse_existing(dst: str, overwrite: bool) -> None:
  if os.path.exists(dst) and not overwrite:
    raise HetjaxError(f'destination {dst} exists; pass --config.overwrite=true to replace it')


@contextlib.contextmanager
def _staged(dst: str):
  """A sibling folder to write into; it replaces `dst` only once complete, and goes on failure."""
  tmp = f'{os.path.abspath(dst).rstrip("/")}.partial-{os.getpid()}'
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  old = f'{tmp}.old'
  if os.path.exists(dst):
    os.replace(dst, old)
  os.replace(tmp, dst)
  shutil.rmtree(old, ignore_errors=True)


def _abstract_params(mcfg: ModelConfig) -> dict:
  from hetjax.models.model import abstract_model
  return flatten(abstract_model(mcfg))


# ---- import / export ----

def import_hf(src: str, dst: str, dtype: str = '', overwrite: bool = False,
              show_progress: bool = True) -> ModelConfig:
  """A Hugging Face folder -> a hetjax checkpoint at `dst` (step 0, parameters only)."""
  with open(os.path.join(src, 'config.json')) as f:
    hf_cfg = json.load(f)
  mcfg = model_config_from_hf(hf_cfg, dtype)
  _refuse_existing(dst, overwrite)
  template = _abstract_params(mcfg)
  rules = [r for group in expand(mcfg, template) for r in group]
  files = hf_tensor_files(src)
  mapped = {r.hf for r in rules}
  unknown = [n for n in files if n not in mapped and not n.endswith(IGNORED_SUFFIXES)
             and not (n == 'lm_head.weight' and mcfg.tie_embeddings)]
  if unknown:
    raise HetjaxError(f'Hugging Face tensor {unknown[0]} has no place in the {mcfg.family} name map')
  params, readers, cpu = {}, {}, jax.devices('cpu')[0]
  for rule in (progress(rules, 'import') if show_progress else rules):
    if rule.hf not in files:
      raise HetjaxError(f'{src} lacks tensor {rule.hf}')
    file = files[rule.hf]
    reader = readers.setdefault(file, SafetensorsReader(file))
    for name, y in zip(rule.ours, rule.transform.to_ours(reader.get(rule.hf))):
      # A CPU jax array: orbax then writes it without another copy.
      params[name] = jax.device_put(np.ascontiguousarray(y, dtype=template[name].dtype), cpu)
  check(template, {n: x.shape for n, x in params.items()})
  meta = {'model': dataclasses.asdict(mcfg), 'hf_config': hf_cfg, 'source': os.path.abspath(src)}
  with _staged(dst) as tmp:
    ckpt = Checkpointer(tmp)
    ckpt.save(0, [(StageSpec(0, mcfg.num_layers, True, True), {'params': params})], meta)
    ckpt.close()
    copy_tokenizer_files(src, os.path.join(tmp, TOKENIZER_FOLDER))  # text in, text out
  return mcfg


def export_hf(src: str, dst: str, dtype: str = '', overwrite: bool = False,
              show_progress: bool = True, shard_bytes: int = 1 << 30) -> ModelConfig:
  """A hetjax checkpoint (its latest step) -> a Hugging Face folder that from_pretrained loads."""
  ckpt = Checkpointer(resolve(src), read_only=True)
  meta = ckpt.meta()
  mcfg = model_config_of(meta)
  dtype = _dtype(dtype, mcfg.param_dtype)
  _refuse_existing(dst, overwrite)
  template = _abstract_params(mcfg)
  saved = {n[len('params/'):]: shape for n, (_, shape, _) in tensor_index(meta).items()
           if n.startswith('params/')}
  check(template, saved)
  groups = expand(mcfg, template)
  with _staged(dst) as tmp:
    copy_tokenizer_files(tokenizer_folder(src), tmp)
    writer = _ShardWriter(tmp, shard_bytes)
    for group in (progress(groups, 'export') if show_progress else groups):
      flat = ckpt.read([f'params/{n}' for r in group for n in r.ours], meta=meta)
      for rule in group:
        x = rule.transform.to_hf([flat[f'params/{n}'] for n in rule.ours])
        writer.add(rule.hf, np.ascontiguousarray(x, dtype=jnp.dtype(dtype)))
      del flat
    writer.close()
    with open(os.path.join(tmp, 'config.json'), 'w') as f:
      json.dump(hf_config_from(mcfg, dtype, meta.get('hf_config')), f, indent=2)
  ckpt.close()
  return mcfg


class _ShardWriter:
  """Writes tensors into safetensors shards of at most `limit` bytes (one tensor may exceed it),
  then names them as Hugging Face does: model.safetensors, or model-0000k-of-0000n + an index."""

  def __init__(self, folder: str, limit: int):
    self.folder, self.limit = folder, limit
    self.pending: dict[str, np.ndarray] = {}
    self.shards: list[list[str]] = []
    self.total = 0

  def add(self, name: str, x: np.ndarray) -> None:
    if self.pending and sum(a.nbytes for a in self.pending.values()) + x.nbytes > self.limit:
      self._flush()
    self.pending[name] = x
    self.total += x.nbytes

  def _flush(self) -> None:
    save_file(self.pending, os.path.join(self.folder, f'part-{len(self.shards)}'),
              metadata={'format': 'pt'})
    self.shards.append(list(self.pending))
    self.pending = {}

  def close(self) -> None:
    if self.pending or not self.shards:
      self._flush()
    n = len(self.shards)
    if n == 1:
      os.replace(os.path.join(self.folder, 'part-0'), os.path.join(self.folder, 'model.safetensors'))
      return
    weight_map = {}
    for k, names in enumerate(self.shards):
      file = f'model-{k + 1:05d}-of-{n:05d}.safetensors'
      os.replace(os.path.join(self.folder, f'part-{k}'), os.path.join(self.folder, file))
      weight_map.update({name: file for name in names})
    with open(os.path.join(self.folder, 'model.safetensors.index.json'), 'w') as f:
      json.dump({'metadata': {'total_size': self.total}, 'weight_map': weight_map}, f, indent=2)
