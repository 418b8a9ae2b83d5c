"""mode=serve: requests over a serve plan; completions.jsonl, metrics.json, replica_timeline.png."""

from __future__ import annotations

import json
import os
import time

import numpy as np

from hetjax.checkpoint.manager import load_model
from hetjax.distributed import is_leader
from hetjax.errors import HetjaxError
from hetjax.inference.dispatch import poisson_arrivals
from hetjax.inference.serving import ContinuousServer, Server, draw_busy, parse_requests, summary
from hetjax.metrics import write_json
from hetjax.models.config import model_config_from
from hetjax.models.model import build_model
from hetjax.modes.generate import serve_engine
from hetjax.tokenizer import eos_ids, tokenizer_for


def _requests(cfg, tokenizer, max_len, vocab):
  new = cfg.generate.max_new_tokens
  if cfg.requests:
    try:
      with open(cfg.requests) as f:
        lines = f.readlines()
    except OSError as e:
      raise HetjaxError(f'cannot read requests {cfg.requests}: {e.strerror}') from None
    return parse_requests(lines, tokenizer.encode, max_len, new, vocab)
  rng = np.random.default_rng(cfg.seed)
  arrivals = poisson_arrivals(cfg.rate, cfg.num_requests, cfg.seed)
  lines = [json.dumps({'ids': rng.integers(0, vocab, cfg.prompt_len).tolist(), 'arrival_s': float(t)})
           for t in arrivals]
  return parse_requests(lines, tokenizer.encode, max_len, new, vocab)


def run(cfg, workdir: str) -> None:
  g = cfg.generate
  if g.temperature < 0 or not 0 < g.top_p <= 1:
    raise HetjaxError(f'need temperature >= 0 and 0 < top_p <= 1, got {g.temperature}, {g.top_p}')
  if not cfg.plan:
    raise HetjaxError('serve needs a plan: --config.plan=PLAN.json (from configs/plan_inference.py)')
  model = load_model(cfg.checkpoint)[0] if cfg.checkpoint else build_model(model_config_from(cfg), cfg.seed)
  tokenizer = tokenizer_for(cfg.checkpoint)
  requests = _requests(cfg, tokenizer, model.cfg.max_len, model.cfg.vocab_size)
  engine = serve_engine(cfg, model)
  say = print if is_leader() else (lambda *a, **k: None)
  say(engine.plan.table())
  sampling = dict(temperature=g.temperature, top_k=g.top_k, top_p=g.top_p)
  eos = eos_ids(cfg.checkpoint) if g.get('stop_at_eos', True) else ()
  if cfg.batching == 'continuous':
    if cfg.chunk < 1:
      raise HetjaxError(f'chunk must be >= 1, got {cfg.chunk}')
    server = ContinuousServer(engine, cfg.dispatch, cfg.max_batch, sampling, cfg.seed, cfg.chunk, eos,
                              cfg.prefill)
  elif cfg.batching == 'static':
    server = Server(engine, cfg.dispatch, cfg.max_batch, sampling, cfg.seed, eos)
  else:
    raise HetjaxError(f"batching must be 'continuous' or 'static', got {cfg.batching!r}")
  t0 = time.perf_counter()
  server.serve(requests, progress=say)
  seconds = time.perf_counter() - t0
  if not is_leader():
    return
  tmp = os.path.join(workdir, 'completions.jsonl.tmp')
  with open(tmp, 'w') as f:
    for r in requests:
      f.write(json.dumps({'id': r.id, 'ids': r.output, 'text': tokenizer.decode(r.output),
                          'ttft_s': r.first_token_s - r.arrival_s,
                          'latency_s': r.done_s - r.arrival_s, 'replica': r.replica}) + '\n')
  os.replace(tmp, os.path.join(workdir, 'completions.jsonl'))
  metrics = summary(requests, seconds, cfg.deadline_s)
  metrics['bytes_sent'] = engine.bytes_sent()
  write_json(os.path.join(workdir, 'metrics.json'), metrics)
  draw_busy(server.busy, engine.plan.dp, os.path.join(workdir, 'replica_timeline.png'))
  say(' '.join(f'{k}={v:.4g}' if isinstance(v, float) else f'{k}={v}' for k, v in metrics.items()))
  say(f'wrote {workdir}/completions.jsonl, metrics.json, replica_timeline.png')
