"""Serving requests over a ServeEngine: arrivals, dispatch to replicas, batches, per-request times.

Requests that have arrived are dispatched to replicas by a policy from dispatch.py, through the same
`ReplicaState` the simulator uses (its service table is learned from measured rounds). A round then
takes, for every replica with a queue, up to `max_batch` requests per request group and as many
groups as the replica has stages (so its pipeline stays full), and runs all replicas side by side.
Batching is static: a request that arrives during a round waits for the next one.
"""

from __future__ import annotations

import dataclasses
import json
import time

import numpy as np

from hetjax.errors import HetjaxError
from hetjax.inference.dispatch import ReplicaState, make_policy
from hetjax.inference.engine import ServeEngine, pad_prompts


@dataclasses.dataclass
class Request:
  id: str
  ids: np.ndarray            # prompt token ids
  max_new_tokens: int
  arrival_s: float = 0.0
  # filled in while serving
  replica: int = -1
  first_token_s: float = float('nan')
  done_s: float = float('nan')
  output: list = dataclasses.field(default_factory=list)


def parse_requests(lines, encode, max_len: int, default_new_tokens: int) -> list[Request]:
  """Requests from JSON lines: {"prompt": text} or {"ids": [...]}, optional "max_new_tokens",
  "arrival_s" and "id". Errors name the line."""
  out = []
  for n, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      d = json.loads(line)
      if not isinstance(d, dict):
        raise ValueError('not a JSON object')
      if 'ids' in d:
        ids = np.asarray([int(i) for i in d['ids']], np.int32)
      elif isinstance(d.get('prompt'), str):
        ids = encode(d['prompt'])
      else:
        raise ValueError('needs "prompt" (text) or "ids"')
      new = int(d.get('max_new_tokens', default_new_tokens))
      arrival = float(d.get('arrival_s', 0.0))
    except (ValueError, TypeError) as e:
      raise HetjaxError(f'requests line {n}: {e}') from None
    if not len(ids):
      raise HetjaxError(f'requests line {n}: empty prompt')
    if new < 1 or not np.isfinite(arrival) or arrival < 0:
      raise HetjaxError(f'requests line {n}: max_new_tokens must be >= 1 and arrival_s >= 0')
    if len(ids) + new > max_len:
      raise HetjaxError(f'requests line {n}: prompt ({len(ids)}) + max_new_tokens ({new}) exceeds '
                        f'the model\'s max length {max_len}')
    out.append(Request(str(d.get('id', len(out))), ids, new, arrival))
  if not out:
    raise HetjaxError('the requests file has no requests')
  return sorted(out, key=lambda r: r.arrival_s)


class Server:

  def __init__(self, engine: ServeEngine, policy: str, max_batch: int, sampling: dict, seed: int = 0):
    self.engine, self.sampling, self.seed = engine, sampling, seed
    self.policy = make_policy(policy)
    plan = engine.plan
    self.max_batch = [r.max_batch or max_batch for r in plan.replicas]
    self.states = [ReplicaState(np.ones(b + 1), b) for b in self.max_batch]
    self.busy: list[tuple] = []    # (replica, start_s, end_s) of each round

  def serve(self, requests: list[Request], progress=print) -> list[Request]:
    pending = list(requests)
    start = time.perf_counter()
    now = lambda: time.perf_counter() - start
    finished, rounds = 0, 0
    while pending or any(s.queue for s in self.states):
      while pending and pending[0].arrival_s <= now():
        req = pending.pop(0)
        req.replica = self.policy.choose(self.states, now())
        self.states[req.replica].queue.append(req)
      if not any(s.queue for s in self.states):
        time.sleep(max(0.0, min(pending[0].arrival_s - now(), 0.5)))
        continue
      finished += self._round(now)
      rounds += 1
      progress(f'\rserved {finished}/{len(requests)} requests in {rounds} rounds, {now():.1f} s',
               end='', flush=True)
    progress('')
    return requests

  def _round(self, now) -> int:
    """One round: each busy replica's queue (up to max_batch per group, one group per stage)."""
    engine = self.engine
    layout, batches = [], []
    for r, state in enumerate(self.states):
      take = min(len(state.queue), self.max_batch[r] * len(engine.replicas[r]))
      reqs = [state.queue.popleft() for _ in range(take)]
      groups = [list(g) for g in np.array_split(np.arange(take), min(take, len(engine.replicas[r])) or 1)
                if len(g)] if take else []
      layout.append([[reqs[i] for i in g] for g in groups])
      batches.append([pad_prompts([reqs[i].ids for i in g]) for g in groups])
    num_tokens = max(q.max_new_tokens for groups in layout for g in groups for q in g)
    t0 = now()

    def on_token(r, m, t, token):
      token = np.asarray(token)   # waits for it: the time is when the token exists
      at = now()
      for row, req in enumerate(layout[r][m]):
        if t == 0:
          req.first_token_s = at
        if t < req.max_new_tokens:
          req.output.append(int(token[row]))
          if t == req.max_new_tokens - 1:
            req.done_s = at

    engine.run(batches, num_tokens, seed=self.seed, on_token=on_token, **self.sampling)
    t1 = now()
    for r, groups in enumerate(layout):
      if groups:
        self.busy.append((r, t0, t1))
        # The last measured round time: the dispatch policy's service time for this replica.
        self.states[r].service[1:] = t1 - t0
    return sum(len(g) for groups in layout for g in groups)


def summary(requests: list[Request], seconds: float, deadline_s: float) -> dict:
  latency = np.array([r.done_s - r.arrival_s for r in requests])
  ttft = np.array([r.first_token_s - r.arrival_s for r in requests])
  tokens = sum(len(r.output) for r in requests)
  out = {'requests': len(requests), 'tokens': tokens, 'seconds': seconds,
         'tokens_per_s': tokens / seconds if seconds > 0 else 0.0,
         'latency_p50_s': float(np.percentile(latency, 50)),
         'latency_p99_s': float(np.percentile(latency, 99)),
         'ttft_p50_s': float(np.percentile(ttft, 50))}
  if deadline_s > 0:
    out['deadline_s'] = deadline_s
    out['slo_attainment'] = float(np.mean(latency <= deadline_s))
  return out


def draw_busy(busy, num_replicas: int, path: str) -> None:
  """Each replica's rounds on a time axis."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(9, 0.5 * num_replicas + 1.5))
  for r, t0, t1 in busy:
    ax.barh(r, t1 - t0, left=t0, color=plt.cm.tab10(r % 10), edgecolor='black', height=0.6)
  ax.set_yticks(range(num_replicas), [f'replica {r}' for r in range(num_replicas)])
  ax.invert_yaxis()
  ax.set_xlabel('seconds since start (bars: one round of batched prefill + decode)')
  ax.set_title('replica busy timeline')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
