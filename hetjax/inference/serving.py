"""Serving requests over a ServeEngine: arrivals, dispatch to replicas, batching, per-request times.

Requests that have arrived are dispatched to replicas by a policy from dispatch.py, through the same
`ReplicaState` the simulator uses (its service table is learned from measured times). Each replica
keeps as many request groups in flight as it has stages (so its pipeline stays full), each of up to
`max_batch` requests. Two ways to batch:
- `continuous` (ContinuousServer): every group is a set of slots; a finished request's slot is
  refilled by a waiting request at the group's next step. With `prefill='slot'` (default) that step
  also prefills the new request's prompt in one go (one row, padded to a power of two >= 8) and yields
  its first token; with `prefill='token'` the slot reads its prompt one token per decode step;
- `static` (Server): rounds; a round prefills its groups together and decodes until its longest
  request is done; a request that arrives during a round waits for the next one.
"""

from __future__ import annotations

import dataclasses
import json
import time

import numpy as np

import jax

from hetjax.distributed import forget_text, gather_text, is_leader, leader_text
from hetjax.errors import HetjaxError
from hetjax.inference.dispatch import ReplicaState, make_policy
from hetjax.inference.engine import ServeEngine, pad_prompts
from hetjax.parallel.state import StateStore


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

  @property
  def finished(self) -> bool:
    return not np.isnan(self.done_s)


def parse_requests(lines, encode, max_len: int, default_new_tokens: int,
                   vocab_size: int | None = None) -> list[Request]:
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
    if vocab_size and (ids.min() < 0 or ids.max() >= vocab_size):
      raise HetjaxError(f'requests line {n}: token ids must lie in [0, {vocab_size})')
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

  def __init__(self, engine: ServeEngine, policy: str, max_batch: int, sampling: dict, seed: int = 0,
               eos=(), clock=time.perf_counter):
    """`clock` gives the seconds that arrivals and request times count in (a benchmark's CPU
    clock needs every arrival at 0: waiting for one does not advance it)."""
    self.engine, self.sampling, self.seed, self.clock = engine, sampling, seed, clock
    self.eos = frozenset(int(i) for i in eos)   # a request ends at its first token in eos
    self.policy = make_policy(policy)
    plan = engine.plan
    self.max_batch = [r.max_batch or max_batch for r in plan.replicas]
    # A round takes one group of max_batch requests per stage.
    self.states = [ReplicaState(np.ones(b * len(r.stages) + 1), b * len(r.stages))
                   for b, r in zip(self.max_batch, plan.replicas)]
    self.busy: list[tuple] = []    # (replica, start_s, end_s) of each round
    self.admissions = 0            # admission decisions shared so far (several processes)

  def serve(self, requests: list[Request], progress=print) -> list[Request]:
    pending = list(requests)
    clock = self.clock
    start = clock()
    now = lambda: clock() - start
    finished, rounds = 0, 0
    # One cache length for every round (the longest any round needs): decode compiles once.
    longest_prompt = max(len(q.ids) for q in requests)
    cache_len = min(self.engine.cfg.max_len, (1 << (longest_prompt - 1).bit_length()) +
                    max(q.max_new_tokens for q in requests))
    while pending or any(s.queue for s in self.states):
      self._admit(requests, pending, now)
      if not any(s.queue for s in self.states):
        time.sleep(max(0.0, min(pending[0].arrival_s - now(), 0.5)))
        continue
      finished += self._round(now, cache_len)
      rounds += 1
      progress(f'\rserved {finished}/{len(requests)} requests in {rounds} rounds, {now():.1f} s',
               end='', flush=True)
    progress('')
    share_results(requests)
    return requests

  def _admit(self, requests, pending, now) -> None:
    """The requests that have arrived go to replicas' queues. With several processes, process 0
    decides (arrivals on its clock, its policy state) and every process applies its decision, so
    all run the same rounds."""
    def decide():
      out = []
      while pending and pending[0].arrival_s <= now():
        req = pending.pop(0)
        req.replica = self.policy.choose(self.states, now())
        self.states[req.replica].queue.append(req)
        out.append([next(i for i, r in enumerate(requests) if r is req), req.replica])
      return json.dumps(out)
    if jax.process_count() == 1:
      decide()
      return
    self.admissions += 1
    decided = json.loads(leader_text(f'serve/admit/{self.admissions}', decide))
    if not is_leader():
      for i, replica in decided:
        req = requests[i]
        pending[:] = [r for r in pending if r is not req]
        req.replica = replica
        self.states[replica].queue.append(req)

  def _round(self, now, cache_len: int) -> int:
    """One round: from each replica's queue, in order, up to max_batch requests (a group per
    stage), while every prompt of the round plus its longest max_new_tokens fits the model (the
    others wait for the next round). KV caches hold at least `cache_len` positions."""
    engine, max_len = self.engine, self.engine.cfg.max_len
    layout, batches, taken = [], [], []
    fits = lambda reqs: max(len(q.ids) for q in reqs) + max(q.max_new_tokens for q in reqs) <= max_len
    for r, state in enumerate(self.states):
      reqs = []
      while state.queue and len(reqs) < state.max_batch and fits(taken + [state.queue[0]]):
        reqs.append(state.queue.popleft())
        taken.append(reqs[-1])
      take = len(reqs)
      groups = [list(g) for g in np.array_split(np.arange(take), min(take, len(engine.replicas[r])) or 1)
                if len(g)] if take else []
      layout.append([[reqs[i] for i in g] for g in groups])
    if not taken:   # parse_requests refuses these; a Request built in code may not have been
      first = next(s.queue[0] for s in self.states if s.queue)
      raise HetjaxError(f'request {first.id}: prompt ({len(first.ids)}) + max_new_tokens '
                        f'({first.max_new_tokens}) exceeds the model\'s max length {max_len}')
    num_tokens = max(q.max_new_tokens for q in taken)
    for r, groups in enumerate(layout):
      # Full-size groups and power-of-two prompt widths: few shapes, few compilations.
      batches.append([pad_prompts([q.ids for q in g], self.max_batch[r],
                                  max_width=max_len - num_tokens) for g in groups])
    t0 = now()

    def on_token(r, m, t, token):
      token = np.asarray(token)   # waits for it: the time is when the token exists
      at = now()
      for row, req in enumerate(layout[r][m]):
        if t == 0:
          req.first_token_s = at
        if t < req.max_new_tokens and not req.finished:
          req.output.append(int(token[row]))
          if t == req.max_new_tokens - 1 or req.output[-1] in self.eos:
            req.done_s = at

    engine.run(batches, num_tokens, seed=self.seed, on_token=on_token, min_cache_len=cache_len,
               **self.sampling)
    t1 = now()
    for r, groups in enumerate(layout):
      if groups:
        self.busy.append((r, t0, t1))
        # The last measured round time: the dispatch policy's service time for this replica.
        self.states[r].service[1:] = t1 - t0
    return sum(len(g) for groups in layout for g in groups)


def share_results(requests: list[Request], name: str = 'serve/results', skip=frozenset()) -> list[int]:
  """With several processes, a request's tokens and times are known on the process of its
  replica's head stage: every process gets those of every finished request (except the indices in
  `skip`, shared before). Returns the indices shared."""
  if jax.process_count() == 1:
    return []
  mine = {i: [r.output, r.first_token_s, r.done_s] for i, r in enumerate(requests)
          if r.finished and i not in skip}
  shared = []
  for text in gather_text(name, json.dumps(mine)):
    for i, (output, first, done) in json.loads(text).items():
      req = requests[int(i)]
      req.output, req.first_token_s, req.done_s = output, first, done
      shared.append(int(i))
  return shared


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


class SlotGroup:
  """One request group of a replica under continuous batching: `rows` slots, each holding a request
  at its own position. `feed(step)` (called by every stage before the group's decode step; the
  first call decides) refills free slots and says, per row, the position and whether the input is a
  prompt token; `prefills(step)` lists the refilled slots whose prompt the step prefills whole
  (`prefill='slot'`, into a cache of `cache_len`); `record(step, token)` (on the head stage) keeps
  the tokens that are generated ones."""

  def __init__(self, rows: int, take, now, eos=frozenset(), prefill: str = 'slot',
               cache_len: int = 0):
    if prefill not in ('slot', 'token'):
      raise HetjaxError(f"prefill must be 'slot' or 'token', got {prefill!r}")
    self.rows, self.take, self.now, self.eos = rows, take, now, eos
    self.prefill, self.cache_len = prefill, cache_len
    self.slots: list = [None] * rows
    self.pos = np.zeros(rows, np.int64)        # tokens of the slot's request already in the cache
    self.producing: dict = {}                   # step -> per row: the request whose token it yields
    self.decided: dict = {}                     # step -> (positions, use_feed, feed_tokens, prefills)

  def active(self) -> bool:
    return any(req is not None for req in self.slots)

  def feed(self, step: int):
    """The step's (positions, use_feed, feed_tokens) per row."""
    return self._decided(step)[:3]

  def prefills(self, step: int) -> list:
    return self._decided(step)[3]

  def _decided(self, step: int):
    if step not in self.decided:
      self.decided[step] = self._decide(step)
    return self.decided[step]

  def _decide(self, step: int):
    new = []
    for i, req in enumerate(self.slots):
      if req is None or req.finished:           # free, or ended early at an end-of-sequence token
        self.slots[i], self.pos[i] = self.take(), 0
        if self.slots[i] is not None and self.prefill == 'slot':
          new.append(i)
    positions = self.pos.astype(np.int32)
    use = np.ones(self.rows, bool)             # idle (and prefilled) rows read token 0 at position 0
    tokens = np.zeros(self.rows, np.int32)
    producing = [None] * self.rows
    prefills = [(i, pad_prompts([self.slots[i].ids], max_width=self.cache_len, min_width=8))
                for i in new]
    for i, req in enumerate(self.slots):
      if req is None:
        continue
      n = len(req.ids)
      if i in new:
        self.pos[i] = n - 1                    # the whole prompt, its first token out of this step
      elif self.pos[i] < n:
        tokens[i] = req.ids[self.pos[i]]
      else:
        use[i] = False                          # its own last sampled token
      if self.pos[i] >= n - 1:
        producing[i] = req
      self.pos[i] += 1
      if self.pos[i] - n + 1 >= req.max_new_tokens:  # its last token comes out of this step
        self.slots[i] = None
    self.producing[step] = producing
    return positions, use, tokens, prefills

  def forget(self, before: int) -> None:
    """Drops the decisions of steps before `before` (kept where no head stage records them)."""
    for steps in (self.decided, self.producing):
      for step in [t for t in steps if t < before]:
        del steps[step]

  def record(self, step: int, token) -> None:
    """Tokens of this step into their requests."""
    token = np.asarray(token)
    del self.decided[step]                      # the head stage is the last to use them
    at = self.now()
    for row, req in enumerate(self.producing.pop(step)):
      if req is None or req.finished:           # ended earlier in a step decided ahead
        continue
      if not req.output:
        req.first_token_s = at
      req.output.append(int(token[row]))
      if len(req.output) == req.max_new_tokens or req.output[-1] in self.eos:
        req.done_s = at


class ContinuousServer(Server):
  """Continuous batching over all replicas at once, `chunk` decode steps per engine call (KV
  caches and slots carry over between calls). Dispatch and replica state as in Server; `busy`
  holds the chunks each replica worked in. `prefill`: see SlotGroup.

  In one process a slot is refilled at the step it frees, with the requests that have arrived by
  then. With several processes, process 0 decides each chunk's refills at its start, from the
  requests that have arrived and the ones that ended (shared by every process first), and every
  process replays them; so a slot freed by an end-of-sequence token, or a request arriving
  mid-chunk, waits for the next chunk."""

  def __init__(self, engine: ServeEngine, policy: str, max_batch: int, sampling: dict,
               seed: int = 0, chunk: int = 8, eos=(), prefill: str = 'slot', clock=time.perf_counter):
    if prefill not in ('slot', 'token'):
      raise HetjaxError(f"prefill must be 'slot' or 'token', got {prefill!r}")
    super().__init__(engine, policy, max_batch, sampling, seed, eos, clock)
    self.chunk, self.prefill = chunk, prefill

  def serve(self, requests: list[Request], progress=print) -> list[Request]:
    engine, clock = self.engine, self.clock
    start = clock()
    now = lambda: clock() - start
    pending = list(requests)
    several, leader = jax.process_count() > 1, is_leader()
    # Several processes: (replica, group) -> the requests its takes return this chunk, logged on
    # process 0 and replayed on the others.
    refills: dict = {}

    def dispatch():
      while pending and pending[0].arrival_s <= now():
        req = pending.pop(0)
        req.replica = self.policy.choose(self.states, now())
        self.states[req.replica].queue.append(req)

    def taker(r, m):
      def take():
        if several and not leader:
          return refills[(r, m)].pop(0)
        if not several:                     # one process: arrivals join at any step
          dispatch()
        queue = self.states[r].queue
        req = queue.popleft() if queue else None
        if several:
          refills[(r, m)].append(req)
        return req
      return take

    longest = max(len(q.ids) + q.max_new_tokens for q in requests)
    groups = [[SlotGroup(self.max_batch[r], taker(r, m), now, self.eos, self.prefill, longest)
               for m in range(len(engine.replicas[r]))] for r in range(len(engine.replicas))]
    cache_len = {r: longest for r in range(len(groups))}
    store, step, chunks, shared = StateStore(), 0, 0, set()

    def on_token(r, m, t, token):
      groups[r][m].record(t, token)

    while True:
      if several:
        chunks += 1
        shared.update(share_results(requests, f'serve/ended/{chunks}', shared))
        # Every process has now written this chunk's key, so all have read the previous chunk's.
        forget_text(f'serve/ended/{chunks - 1}')
        forget_text(f'serve/chunk/{chunks - 1}', leader=True)
        busy = self._agree_chunk(requests, groups, step, dispatch, refills, f'serve/chunk/{chunks}')
      else:
        dispatch()
        busy = self._busy(groups)
      finished = sum(r.finished for r in requests)
      if finished == len(requests):
        break
      if not busy:
        if leader:   # the others wait for its next decision
          time.sleep(max(0.0, min(pending[0].arrival_s - now(), 0.5)) if pending else 0.0)
        continue
      t0 = now()
      engine.steps([gs if r in busy else [] for r, gs in enumerate(groups)], self.chunk, cache_len,
                   store, step, seed=self.seed, on_token=on_token, **self.sampling)
      t1 = now()
      step += self.chunk
      for r in busy:
        self.busy.append((r, t0, t1))
        # The dispatch policy's service time: one chunk's duration per request in flight.
        self.states[r].service[1:] = t1 - t0
        for g in groups[r]:
          g.forget(step)
      progress(f'\rserved {finished}/{len(requests)} requests, {step} steps, {now():.1f} s',
               end='', flush=True)
    progress('')
    return requests

  def _busy(self, groups) -> list[int]:
    """Replicas with a request in a slot or waiting in their queue."""
    return [r for r, gs in enumerate(groups) if any(g.active() for g in gs) or self.states[r].queue]

  def _agree_chunk(self, requests, groups, step, dispatch, refills, name) -> list[int]:
    """Several processes: process 0 dispatches the arrived requests and decides every busy group's
    steps of the chunk ahead, logging its takes in `refills`; every other process decides the same
    steps, its takes replaying process 0's. Returns the busy replicas."""
    index = {id(q): i for i, q in enumerate(requests)}

    def decide():
      dispatch()
      refills.clear()
      for r in self._busy(groups):
        for m, g in enumerate(groups[r]):
          refills[(r, m)] = []
          for t in range(step, step + self.chunk):
            g.feed(t)
      return json.dumps([[r, m, [-1 if q is None else index[id(q)] for q in taken]]
                         for (r, m), taken in refills.items()])
    decided = json.loads(leader_text(name, decide))
    if not is_leader():
      for r, m, taken in decided:
        refills[(r, m)] = [None if i < 0 else requests[i] for i in taken]
        for q in refills[(r, m)]:
          if q is not None:
            q.replica = r
        for t in range(step, step + self.chunk):
          groups[r][m].feed(t)
        assert not refills[(r, m)], 'this process took other refills than process 0'
    return sorted({r for r, _, _ in decided})
