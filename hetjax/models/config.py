"""Model configuration: one dataclass for GPT-2 and Llama, named presets, validation, sizes."""

from __future__ import annotations

import dataclasses
from typing import Any

from hetjax import checks
from hetjax.errors import HetjaxError

FAMILIES = ('gpt2', 'llama')


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  family: str                  # 'gpt2' or 'llama'
  num_layers: int
  hidden: int
  num_heads: int
  num_kv_heads: int            # == num_heads for GPT-2
  ffn: int                     # MLP width (4*hidden for GPT-2)
  vocab_size: int
  max_len: int
  rope_theta: float = 10000.0  # Llama only
  norm_eps: float = 1e-5
  tie_embeddings: bool = True
  dtype: str = 'float32'       # compute dtype: 'float32' or 'bfloat16'
  param_dtype: str = 'float32'

  @property
  def head_dim(self) -> int:
    return self.hidden // self.num_heads

  def validate(self) -> 'ModelConfig':
    if self.family not in FAMILIES:
      raise HetjaxError(f'unknown model family {self.family!r}; expected one of {FAMILIES}')
    for name in ('num_layers', 'hidden', 'num_heads', 'num_kv_heads', 'ffn', 'vocab_size', 'max_len'):
      checks.integer(getattr(self, name), f'model.{name}', 1)
    checks.real(self.rope_theta, 'model.rope_theta', 0, lo_open=True)
    checks.real(self.norm_eps, 'model.norm_eps', 0, 1, lo_open=True)
    checks.flag(self.tie_embeddings, 'model.tie_embeddings')
    if self.hidden % self.num_heads:
      raise HetjaxError(f'model.hidden={self.hidden} is not divisible by model.num_heads={self.num_heads}')
    if self.num_heads % self.num_kv_heads:
      raise HetjaxError(
          f'model.num_heads={self.num_heads} is not divisible by model.num_kv_heads={self.num_kv_heads}')
    if self.family == 'gpt2' and self.num_kv_heads != self.num_heads:
      raise HetjaxError('GPT-2 has no grouped-query attention: num_kv_heads must equal num_heads')
    if self.family == 'llama' and self.head_dim % 2:
      raise HetjaxError(f'rotary embeddings need an even head dim, got {self.head_dim}')
    for name in ('dtype', 'param_dtype'):
      if getattr(self, name) not in ('float32', 'bfloat16'):
        raise HetjaxError(f"model.{name} must be 'float32' or 'bfloat16', got {getattr(self, name)!r}")
    return self

  # ---- sizes (analytic; tests check them against nnx.eval_shape) ----
  def block_params(self) -> int:
    h, kv = self.hidden, self.num_kv_heads * self.head_dim
    if self.family == 'gpt2':
      attn = h * (h + 2 * kv) + (h + 2 * kv) + h * h + h
      mlp = 2 * h * self.ffn + self.ffn + h
      return attn + mlp + 4 * h  # two LayerNorms (scale + bias)
    attn = h * (h + 2 * kv) + h * h
    mlp = 3 * h * self.ffn
    return attn + mlp + 2 * h  # two RMSNorms

  def embed_params(self) -> int:
    pos = self.max_len * self.hidden if self.family == 'gpt2' else 0
    return self.vocab_size * self.hidden + pos

  def head_params(self) -> int:
    norm = 2 * self.hidden if self.family == 'gpt2' else self.hidden
    return norm + (0 if self.tie_embeddings else self.vocab_size * self.hidden)

  def num_params(self) -> int:
    return self.embed_params() + self.num_layers * self.block_params() + self.head_params()

  def block_matmul_params(self) -> int:
    """Weights of one block that take part in matmuls (no biases or norms)."""
    h, kv = self.hidden, self.num_kv_heads * self.head_dim
    mlp_mats = 2 if self.family == 'gpt2' else 3
    return h * (h + 2 * kv) + h * h + mlp_mats * h * self.ffn

  def block_flops_per_token(self, context: int) -> float:
    """Forward FLOPs of one block for one token attending to `context` keys (2 per MAC)."""
    return float(2 * self.block_matmul_params() + 2 * 2 * context * self.hidden)

  def kv_bytes_per_token(self, bytes_per_value: int = 2) -> int:
    """KV-cache bytes per token per layer."""
    return 2 * self.num_kv_heads * self.head_dim * bytes_per_value


def _gpt2(layers, hidden, heads, max_len=1024, vocab=50257, **kw) -> ModelConfig:
  return ModelConfig('gpt2', layers, hidden, heads, heads, 4 * hidden, vocab, max_len, **kw)


def _llama(layers, hidden, heads, kv_heads, ffn, max_len=4096, vocab=32000, **kw) -> ModelConfig:
  kw.setdefault('tie_embeddings', False)
  return ModelConfig('llama', layers, hidden, heads, kv_heads, ffn, vocab, max_len, **kw)


PRESETS: dict[str, ModelConfig] = {
    'tiny_gpt': _gpt2(4, 128, 4, max_len=256, vocab=256),
    'tiny_llama': _llama(4, 128, 8, 4, 352, max_len=256, vocab=256, tie_embeddings=False),
    'gpt2_small': _gpt2(12, 768, 12),
    'gpt2_medium': _gpt2(24, 1024, 16),
    'gpt2_large': _gpt2(36, 1280, 20),
    'gpt2_xl': _gpt2(48, 1600, 25),
    'gpt3_xl': _gpt2(24, 2048, 16, max_len=2048, vocab=50257),
    'llama2_7b': _llama(32, 4096, 32, 32, 11008, norm_eps=1e-5),
    'llama2_13b': _llama(40, 5120, 40, 40, 13824, norm_eps=1e-5),
    'llama2_70b': _llama(80, 8192, 64, 8, 28672, norm_eps=1e-5),
    # OPT (FlexGen's models): GPT-2-style blocks; sizes from shared/paper_facts/flexgen_facts.json
    'opt_6.7b': _gpt2(32, 4096, 32, max_len=2048, vocab=50272),
    'opt_30b': _gpt2(48, 7168, 56, max_len=2048, vocab=50272),
    'opt_175b': _gpt2(96, 12288, 96, max_len=2048, vocab=50272),
}


def get_model_config(name: str, **overrides: Any) -> ModelConfig:
  """A preset by name, with field overrides, validated."""
  if name not in PRESETS:
    raise HetjaxError(f'unknown model {name!r}; choose one of: {", ".join(PRESETS)}')
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = set(overrides) - fields
  if unknown:
    raise HetjaxError(f'unknown model field(s) {sorted(unknown)}; valid: {sorted(fields)}')
  return dataclasses.replace(PRESETS[name], **overrides).validate()


def model_config_from(cfg) -> ModelConfig:
  """ModelConfig from an ml_collections config with `model` (preset name) and `model_overrides`."""
  overrides = {k: v for k, v in dict(cfg.get('model_overrides', {}) or {}).items() if v is not None}
  return get_model_config(cfg.model, **overrides)
