"""mode=generate: generate from a text prompt or raw token ids; prints {"ids": [[...]]} as one JSON line,
then, for a text prompt, {"text": "..."} (the new tokens decoded)."""

from __future__ import annotations

import json
import os

import numpy as np

from hetjax.checkpoint.manager import load_model
from hetjax.data import ByteTokenizer
from hetjax.distributed import is_leader
from hetjax.errors import HetjaxError
from hetjax.inference.generate import generate
from hetjax.models.config import model_config_from
from hetjax.models.model import Stage, build_model
from hetjax.tokenizer import eos_ids, tokenizer_for


def parse_prompt(gcfg, prompt_ids: str = '', tokenizer=None) -> np.ndarray:
  """Token ids [1, T] from `prompt_ids` ("1,2,3") or, failing that, the byte-tokenized text prompt."""
  ids = prompt_ids or gcfg.get('prompt_ids', '')
  if ids:
    try:
      return np.array([[int(t) for t in str(ids).replace(' ', '').split(',') if t != '']], np.int32)
    except ValueError:
      raise HetjaxError(f'prompt_ids must be comma-separated integers, got {ids!r}') from None
  if not gcfg.prompt:
    raise HetjaxError('give a prompt: --config.generate.prompt=TEXT or --config.prompt_ids=1,2,3')
  ids = (tokenizer or ByteTokenizer()).encode(gcfg.prompt)
  if not len(ids):
    raise HetjaxError('the prompt encodes to no tokens')
  return ids[None]


def sample(model: Stage, gcfg, seed: int, prompt_ids: str = '', tokenizer=None) -> np.ndarray:
  return generate(model, parse_prompt(gcfg, prompt_ids, tokenizer), gcfg.max_new_tokens,
                  temperature=gcfg.temperature, top_k=gcfg.top_k, top_p=gcfg.top_p, seed=seed)


def print_ids(ids) -> None:
  print(json.dumps({'ids': [np.asarray(row).tolist() for row in ids]}))


def cut_at_eos(ids: np.ndarray, eos) -> list:
  """Each row up to and including its first end-of-sequence token."""
  out = []
  for row in np.asarray(ids):
    hits = np.flatnonzero(np.isin(row, list(eos))) if len(eos) else []
    out.append(row[:hits[0] + 1] if len(hits) else row)
  return out


def serve_engine(cfg, model: Stage):
  """A ServeEngine over the serve plan at cfg.plan (replicas of uneven, TP-sharded stages)."""
  import jax
  from flax import nnx
  from hetjax.compression.codecs import make_codec
  from hetjax.inference.engine import ServeEngine
  from hetjax.parallel.exchange import DevicePutTransport, PairPermuteTransport
  from hetjax.parallel.socket_transport import SocketTransport
  from hetjax.plan import Plan
  if not os.path.isfile(cfg.plan):
    raise HetjaxError(f'plan file not found: {cfg.plan} (make one with configs/plan_inference.py)')
  plan = Plan.load(cfg.plan)
  transports = {'device_put': DevicePutTransport, 'pair': PairPermuteTransport,
                'socket': SocketTransport}
  kind = cfg.transport if cfg.transport != 'auto' else (
      'pair' if jax.process_count() > 1 else 'device_put')
  if kind not in transports:
    raise HetjaxError(f"transport must be 'auto', 'device_put', 'pair' or 'socket', got "
                      f"{cfg.transport!r}")
  from hetjax.parallel.emulated_link import from_environment  # launcher --emulate: user-space latency
  transport = from_environment(transports[kind](), print if is_leader() else (lambda *a, **k: None))
  return ServeEngine(plan, model.cfg, nnx.state(model), codec=make_codec(cfg.codec),
                     transport=transport, colocate=cfg.colocate)


def run(cfg, workdir: str) -> None:
  if cfg.get('offload') and cfg.offload.policy:   # FlexGen-style offloading (hetjax/modes/_offload.py)
    from hetjax.modes._offload import run_offloaded
    return run_offloaded(cfg, workdir)
  if cfg.get('checkpoint'):
    model, _ = load_model(cfg.checkpoint)
  else:
    model = build_model(model_config_from(cfg), cfg.seed)
  tokenizer = tokenizer_for(cfg.get('checkpoint', ''))
  g = cfg.generate
  if cfg.get('plan'):
    ids = serve_engine(cfg, model).generate(
        parse_prompt(g, cfg.get('prompt_ids', ''), tokenizer), g.max_new_tokens,
        temperature=g.temperature, top_k=g.top_k, top_p=g.top_p, seed=cfg.seed)
  else:
    ids = sample(model, g, cfg.seed, cfg.get('prompt_ids', ''), tokenizer)
  if g.get('stop_at_eos', True):
    ids = cut_at_eos(ids, eos_ids(cfg.get('checkpoint', '')))
  if is_leader():
    print_ids(ids)
    if not (cfg.get('prompt_ids') or cfg.generate.get('prompt_ids')):  # a text prompt: show text too
      print(json.dumps({'text': tokenizer.decode(ids[0])}))
