"""Pipeline ordering: bottleneck perfect matching between two device groups, and open-loop TSP
(shortest Hamiltonian path, any start) over groups: exact Held-Karp up to 16 groups, heuristic beyond."""

from __future__ import annotations

import functools

import numpy as np
from scipy.optimize import linear_sum_assignment

HELD_KARP_MAX = 16


def bottleneck_matching(w: np.ndarray) -> tuple[float, np.ndarray]:
  """Perfect matching of rows to columns minimising the largest edge; ties broken by the smallest sum.

  Returns (bottleneck value, cols) with row i matched to cols[i]. Binary search over edge values,
  feasibility by linear_sum_assignment on the 0/1 "edge too long" matrix.
  """
  w = np.asarray(w, dtype=np.float64)
  n = w.shape[0]
  if n == 1:
    return float(w[0, 0]), np.zeros(1, dtype=int)
  lower = max(w.min(axis=1).max(), w.min(axis=0).max())  # every row and column needs an edge
  big = w.max() * n + 1.0

  def matching(t):  # min-sum matching using only edges <= t; None if there is no perfect one
    _, c = linear_sum_assignment(np.where(w > t, big, w))
    return None if w[np.arange(n), c].max() > t else c

  cols = matching(lower)  # often already feasible on structured clusters
  if cols is not None:
    return float(lower), cols
  values = np.unique(w)
  lo, hi = int(np.searchsorted(values, lower)) + 1, len(values) - 1
  while lo < hi:
    mid = (lo + hi) // 2
    if matching(values[mid]) is not None:
      hi = mid
    else:
      lo = mid + 1
  return float(values[lo]), matching(values[lo])


def bottleneck_value(w: np.ndarray) -> float:
  """The bottleneck of `bottleneck_matching` without the matching (cheaper: no min-sum tie-break).

  Feasibility of threshold t: a perfect matching exists using edges <= t, i.e. the 0/1 "too long"
  matrix has a zero-cost assignment."""
  w = np.asarray(w, dtype=np.float64)
  if w.shape[0] == 1:
    return float(w[0, 0])
  lower = max(w.min(axis=1).max(), w.min(axis=0).max())

  def feasible(t):
    too_long = w > t
    r, c = linear_sum_assignment(too_long)
    return not too_long[r, c].any()

  if feasible(lower):
    return float(lower)
  values = np.unique(w)
  lo, hi = int(np.searchsorted(values, lower)) + 1, len(values) - 1
  while lo < hi:
    mid = (lo + hi) // 2
    if feasible(values[mid]):
      hi = mid
    else:
      lo = mid + 1
  return float(values[lo])


@functools.lru_cache(maxsize=None)
def _held_karp_levels(k: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """Per subset size 2..k: every (mask, j in mask) as arrays (masks, js, masks without j)."""
  masks = np.arange(1 << k)
  pop = np.zeros(1 << k, dtype=np.int64)
  for b in range(k):
    pop += (masks >> b) & 1
  levels = []
  for size in range(2, k + 1):
    level = masks[pop == size]
    sel, js = [], []
    for j in range(k):
      m = level[(level >> j) & 1 == 1]
      sel.append(m)
      js.append(np.full(len(m), j))
    sel, js = np.concatenate(sel), np.concatenate(js)
    levels.append((sel, js, sel ^ (1 << js)))
  return levels


def held_karp_path(d: np.ndarray) -> tuple[float, list[int]]:
  """Exact shortest open path visiting every node once (free start and end). O(2^k k^2), vectorised
  over all (subset, last node) pairs of one subset size at a time."""
  d = np.asarray(d, dtype=np.float64)
  k = d.shape[0]
  if k == 1:
    return 0.0, [0]
  full = 1 << k
  dp = np.full((full, k), np.inf)
  parent = np.full((full, k), -1, dtype=np.int64)
  dp[1 << np.arange(k), np.arange(k)] = 0.0
  for sel, js, prev in _held_karp_levels(k):
    cand = dp[prev] + d[:, js].T              # [pair, i]: reach j from i
    best = np.argmin(cand, axis=1)
    dp[sel, js] = cand[np.arange(len(sel)), best]
    parent[sel, js] = best
  end = int(np.argmin(dp[full - 1]))
  cost = float(dp[full - 1, end])
  path, mask, j = [], full - 1, end
  while j >= 0:
    path.append(j)
    mask, j = mask ^ (1 << j), int(parent[mask, j])
  return cost, path[::-1]


def _path_cost(d, path):
  return float(sum(d[a, b] for a, b in zip(path[:-1], path[1:])))


def heuristic_path(d: np.ndarray) -> tuple[float, list[int]]:
  """Nearest neighbour from every start, then 2-opt (segment reversal) on the best path."""
  d = np.asarray(d, dtype=np.float64)
  k = d.shape[0]
  best = None
  for s in range(k):
    path, left = [s], set(range(k)) - {s}
    while left:
      nxt = min(left, key=lambda j: d[path[-1], j])
      path.append(nxt)
      left.remove(nxt)
    c = _path_cost(d, path)
    if best is None or c < best[0]:
      best = (c, path)
  cost, path = best
  improved = True
  while improved:
    improved = False
    for i in range(k - 1):
      for j in range(i + 1, k):
        cand = path[:i] + path[i:j + 1][::-1] + path[j + 1:]
        c = _path_cost(d, cand)
        if c < cost - 1e-12:
          cost, path, improved = c, cand, True
  return cost, path


def open_path(d: np.ndarray, exact_max: int = HELD_KARP_MAX) -> tuple[float, list[int]]:
  """Open-loop TSP: exact (Held-Karp) up to exact_max nodes, heuristic beyond."""
  return held_karp_path(d) if len(d) <= exact_max else heuristic_path(d)


def order_groups(link_time: np.ndarray, groups: list[list[int]], cache: dict | None = None,
                 exact_max: int = HELD_KARP_MAX):
  """DT-FM pipeline cost of device groups under a device-to-device transfer-time matrix.

  Edge weight between groups = bottleneck perfect matching of their devices; then the open-loop
  TSP over groups. Returns (path cost, group order, replicas) where replicas[j] lists one device
  per stage (in path order), following the matchings.
  """
  k = len(groups)
  cost = np.zeros((k, k))
  match = {}
  for a in range(k):
    for b in range(a + 1, k):
      key = (tuple(groups[a]), tuple(groups[b]))
      if cache is not None and key in cache:
        v, cols = cache[key]
      else:
        v, cols = bottleneck_matching(link_time[np.ix_(groups[a], groups[b])])
        if cache is not None:
          cache[key] = (v, cols)
      cost[a, b] = cost[b, a] = v
      match[(a, b)] = cols
      match[(b, a)] = np.argsort(cols)
  total, path = open_path(cost, exact_max)
  size = len(groups[path[0]])
  idx = [np.arange(size)]  # position in each group's list, per replica
  for a, b in zip(path[:-1], path[1:]):
    idx.append(match[(a, b)][idx[-1]])
  replicas = [[groups[g][int(idx[s][j])] for s, g in enumerate(path)] for j in range(size)]
  return total, path, replicas
