"""Request dispatch across serving replicas: policies and a discrete-event simulator.

A replica serves one batch at a time: when it is idle and its queue is not empty it takes up to
`max_batch` queued requests, and the batch takes `service[b]` seconds (from the cost model or from
measurements). A policy sees each replica through `ReplicaState` (queue length, busy-until time,
service table) and picks one for every arriving request. The real engine can keep one ReplicaState
per replica, update it on the same events (arrive, start batch, finish batch) and call the same policy.
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import math
from typing import Sequence

import numpy as np

from hetjax.errors import HetjaxError


@dataclasses.dataclass
class ReplicaState:
  service: np.ndarray          # seconds for a batch of b requests, index b (service[0] unused)
  max_batch: int
  queue: collections.deque = dataclasses.field(default_factory=collections.deque)
  busy_until: float = 0.0      # when the running batch ends (<= now when idle)
  running: list = dataclasses.field(default_factory=list)

  def __post_init__(self):
    self.service = np.asarray(self.service, dtype=np.float64)
    if self.max_batch < 1 or len(self.service) <= self.max_batch:
      raise HetjaxError(f'a replica needs service times for batches 1..{self.max_batch}, '
                        f'got {len(self.service) - 1}')
    if np.any(self.service[1:self.max_batch + 1] <= 0):
      raise HetjaxError('service times must be positive')

  def backlog_time(self, extra: int = 0) -> float:
    """Seconds to clear the queue (plus `extra` requests) in batches of max_batch."""
    n = len(self.queue) + extra
    full, rest = divmod(n, self.max_batch)
    return full * self.service[self.max_batch] + (self.service[rest] if rest else 0.0)

  def expected_completion(self, now: float) -> float:
    """When a request added now would finish: the running batch, then the queue with it at the end."""
    return max(now, self.busy_until) + self.backlog_time(extra=1)


class RoundRobin:
  """Replicas in turn, blind to their speed."""
  name = 'round_robin'

  def __init__(self):
    self.next = 0

  def choose(self, replicas: Sequence[ReplicaState], now: float) -> int:
    i = self.next % len(replicas)
    self.next += 1
    return i


class ShortestExpectedCompletion:
  """The replica where the request is expected to finish first (ties: lowest index)."""
  name = 'shortest_completion'

  def choose(self, replicas: Sequence[ReplicaState], now: float) -> int:
    return int(np.argmin([r.expected_completion(now) for r in replicas]))


POLICIES = {'round_robin': RoundRobin, 'shortest_completion': ShortestExpectedCompletion}


def make_policy(name: str):
  if name not in POLICIES:
    raise HetjaxError(f'unknown dispatch policy {name!r}; choose one of {", ".join(POLICIES)}')
  return POLICIES[name]()


@dataclasses.dataclass
class SimResult:
  arrival: np.ndarray
  start: np.ndarray
  finish: np.ndarray
  replica: np.ndarray
  completions: int              # finish events seen (== number of requests when none is lost/duplicated)

  @property
  def latency(self) -> np.ndarray:
    return self.finish - self.arrival

  def attainment(self, deadline: float) -> float:
    return float(np.mean(self.latency <= deadline))

  def deadline_for(self, fraction: float = 0.99) -> float:
    """Smallest deadline that `fraction` of requests meet."""
    lat = np.sort(self.latency)
    return float(lat[max(0, math.ceil(fraction * len(lat)) - 1)])


def poisson_arrivals(rate: float, num_requests: int, seed: int = 0) -> np.ndarray:
  if rate <= 0 or num_requests < 1:
    raise HetjaxError(f'need rate > 0 and num_requests >= 1, got {rate}, {num_requests}')
  return np.cumsum(np.random.default_rng(seed).exponential(1 / rate, num_requests))


def simulate(arrivals: Sequence[float], replicas: Sequence[ReplicaState], policy) -> SimResult:
  """Event simulation; replicas are reset first. Returns per-request times and replica."""
  arrivals = np.asarray(arrivals, dtype=np.float64)
  if not len(replicas):
    raise HetjaxError('dispatch needs at least one replica')
  if np.any(np.diff(arrivals) < 0):
    raise HetjaxError('arrival times must be sorted')
  n = len(arrivals)
  start, finish = np.full(n, np.nan), np.full(n, np.nan)
  where = np.full(n, -1)
  for r in replicas:
    r.queue.clear()
    r.running, r.busy_until = [], 0.0
  events = [(float(t), 1, i, 'arrive') for i, t in enumerate(arrivals)]   # finishes (0) go first on ties
  heapq.heapify(events)
  completions = 0

  def launch(k: int, now: float):
    r = replicas[k]
    batch = [r.queue.popleft() for _ in range(min(r.max_batch, len(r.queue)))]
    r.running, r.busy_until = batch, now + r.service[len(batch)]
    start[batch] = now
    heapq.heappush(events, (r.busy_until, 0, k, 'finish'))

  while events:
    now, _, x, kind = heapq.heappop(events)
    if kind == 'arrive':
      k = policy.choose(replicas, now)
      replicas[k].queue.append(x)
      where[x] = k
      if not replicas[k].running:
        launch(k, now)
    else:
      r = replicas[x]
      for i in r.running:
        if not np.isnan(finish[i]):
          raise HetjaxError(f'request {i} finished twice')
        finish[i] = now
        completions += 1
      r.running = []
      if r.queue:
        launch(x, now)
  return SimResult(arrivals, start, finish, where, completions)


def round_size(replica) -> int:
  """Requests one round of a replica takes: a group of max_batch per stage, as the engine's
  serving rounds keep one group in flight per stage."""
  return len(replica.stages) * max(1, replica.max_batch)


def replicas_from_plan(plan, cluster, model, setup) -> list[ReplicaState]:
  """One ReplicaState per replica of a serve Plan, service times from the inference cost model."""
  from hetjax.costmodel.inference import plan_stages, service_time_fn
  out = []
  for i, r in enumerate(plan.replicas):
    n = round_size(r)
    out.append(ReplicaState(service_time_fn(cluster, model, plan_stages(plan, i), setup, n), n))
  return out


def sweep(replicas: Sequence[ReplicaState], rates: Sequence[float], deadline: float, policy: str,
          num_requests: int = 2000, seed: int = 0) -> list[dict]:
  """SLO attainment and the 99% deadline at each request rate (same arrival seed for every policy)."""
  rows = []
  for rate in rates:
    res = simulate(poisson_arrivals(rate, num_requests, seed), replicas, make_policy(policy))
    rows.append({'rate': float(rate), 'policy': policy, 'attainment': res.attainment(deadline),
                 'deadline_99': res.deadline_for(0.99), 'mean_latency': float(res.latency.mean())})
  return rows


def max_rate(replicas: Sequence[ReplicaState], deadline: float, policy: str, target: float = 0.99,
             num_requests: int = 2000, seed: int = 0, hi: float = 1024.0, iters: int = 14) -> float:
  """Largest Poisson rate (bisection on a log scale, ~1% resolution) whose SLO attainment is >= target."""
  def ok(rate):
    res = simulate(poisson_arrivals(rate, num_requests, seed), replicas, make_policy(policy))
    return res.attainment(deadline) >= target
  lo = 1e-3
  if not ok(lo):
    return 0.0
  if ok(hi):
    return hi
  for _ in range(iters):
    mid = math.sqrt(lo * hi)
    lo, hi = (mid, hi) if ok(mid) else (lo, mid)
  return lo
