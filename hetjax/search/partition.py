"""Balanced graph partition by a genetic algorithm (DT-FM's scheduler, after GCMA):
multi-point crossover, partition-size repair, a local search per offspring (one Kernighan-Lin style
pass of swaps, then exact layer moves by linear assignment), steady-state replacement (an offspring
replaces the worse of its parents if it is better) and restarts around the best when it stalls.
Constructive starts: balanced clusterings (`clustered`) and partitions across lines (`transversal`),
whose bundling of lines can be searched on the true fitness (`bundle_search`): a move of a whole line
(e.g. a host) between bundles, which the item swaps of the GA cannot make.

An individual is `assign`: group index per item, with fixed group sizes. The GA minimises a black-box
`fitness(assign)`; the local search minimises the sum of pair weights W inside groups (the gain function).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from hetjax.errors import HetjaxError
from hetjax.search.evolutionary import EvoConfig, steady_state


@dataclasses.dataclass(frozen=True)
class GAConfig:
  population: int = 100
  evaluations: int = 5000          # candidates evaluated, population included (DT-FM: 5000)
  crossover_points: int = 5
  mutation: float = 0.5            # probability of one random swap after crossover (keeps diversity)
  local_search: bool = True
  kl_steps: Optional[int] = None   # swaps tried per KL pass (None: half the items, at most 32)
  time_limit: Optional[float] = None  # seconds
  matching: bool = True            # exact layer moves after each KL pass
  restart_after: int = 0           # candidates without improvement before a restart (0: never)
  stop_after: int = 0              # candidates without improvement before stopping (0: never)
  progress_s: float = 5.0          # progress line this often during long searches (0: never)
  label: str = 'partition search'


@dataclasses.dataclass
class GAResult:
  assign: np.ndarray
  cost: float
  history: list[float]     # best cost after each generation (= `population` evaluations)
  evaluations: int
  seconds: float
  restarts: int = 0


def groups_of(assign: np.ndarray, k: int) -> list[list[int]]:
  """Items of each group, ascending."""
  order = np.argsort(assign, kind='stable')
  bounds = np.searchsorted(assign[order], np.arange(k + 1))
  return [order[bounds[g]:bounds[g + 1]].tolist() for g in range(k)]


def random_assign(sizes: Sequence[int], rng: np.random.Generator) -> np.ndarray:
  labels = np.repeat(np.arange(len(sizes)), sizes)
  return rng.permutation(labels)


def align_labels(ref: np.ndarray, other: np.ndarray, k: int) -> np.ndarray:
  """Relabel `other`'s groups to overlap `ref`'s most (only meaningful for equal group sizes)."""
  overlap = np.zeros((k, k))
  np.add.at(overlap, (other, ref), 1)
  rows, cols = linear_sum_assignment(-overlap)
  relabel = np.empty(k, dtype=int)
  relabel[rows] = cols
  return relabel[other]


def crossover(p1: np.ndarray, p2: np.ndarray, sizes: Sequence[int], points: int,
              rng: np.random.Generator) -> np.ndarray:
  """Copy `points` random genes of p1 into p2, then repair sizes by moving non-copied items."""
  child = p2.copy()
  pick = rng.choice(len(child), size=min(points, len(child)), replace=False)
  child[pick] = p1[pick]
  return repair(child, sizes, rng, keep=pick)


def repair(assign: np.ndarray, sizes: Sequence[int], rng: np.random.Generator,
           keep: Optional[np.ndarray] = None) -> np.ndarray:
  """Move items from over-full groups to under-full ones until every group has its size."""
  a = assign.copy()
  counts = np.bincount(a, minlength=len(sizes))
  protected = np.zeros(len(a), dtype=bool)
  if keep is not None:
    protected[keep] = True
  for g in np.flatnonzero(counts > np.asarray(sizes)):
    members = np.flatnonzero(a == g)
    members = np.concatenate([rng.permutation(members[~protected[members]]),
                              rng.permutation(members[protected[members]])])
    for item in members[:counts[g] - sizes[g]]:
      short = np.flatnonzero(counts < np.asarray(sizes))
      target = short[rng.integers(len(short))]
      a[item] = target
      counts[g] -= 1
      counts[target] += 1
  return a


def mutate(assign: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Swap two random items of different groups (sizes unchanged)."""
  a = assign.copy()
  u = rng.integers(len(a))
  others = np.flatnonzero(a != a[u])
  if len(others):
    v = others[rng.integers(len(others))]
    a[u], a[v] = a[v], a[u]
  return a


def kl_pass(assign: np.ndarray, w: np.ndarray, k: int, steps: int) -> np.ndarray:
  """One Kernighan-Lin pass: repeatedly take the best swap between groups among unlocked items,
  lock both, and keep the prefix of swaps with the largest total gain (if positive).

  Cost being lowered: sum of w[u, v] over pairs inside the same group.
  """
  n = len(assign)
  a = assign.copy()
  onehot = np.zeros((n, k))
  onehot[np.arange(n), a] = 1.0
  h = w @ onehot                        # h[v, g] = sum of w[v, t] over t in group g
  locked = np.zeros(n, dtype=bool)
  swaps, gains = [], []
  for _ in range(steps):
    own = h[np.arange(n), a]
    hx = h[:, a]                        # hx[u, v] = h[u, group(v)]
    gain = own[:, None] - hx + own[None, :] - hx.T + 2.0 * w
    invalid = (a[:, None] == a[None, :]) | locked[:, None] | locked[None, :]
    gain[invalid] = -np.inf
    u, v = np.unravel_index(int(np.argmax(gain)), gain.shape)
    if not np.isfinite(gain[u, v]):
      break
    gu, gv = a[u], a[v]
    h[:, gu] += w[:, v] - w[:, u]
    h[:, gv] += w[:, u] - w[:, v]
    a[u], a[v] = gv, gu
    locked[u] = locked[v] = True
    swaps.append((u, v))
    gains.append(gain[u, v])
  if not gains:
    return a
  total = np.cumsum(gains)
  best = int(np.argmax(total))
  if total[best] <= 1e-12:
    return assign.copy()
  for u, v in swaps[best + 1:][::-1]:   # undo the swaps after the best prefix
    a[u], a[v] = a[v], a[u]
  return a


def within_cost(assign: np.ndarray, w: np.ndarray) -> float:
  """Sum of w[u, v] over unordered pairs u != v in the same group."""
  same = assign[:, None] == assign[None, :]
  return float((w * same).sum() - np.trace(w)) / 2


def matching_pass(assign: np.ndarray, w: np.ndarray, k: int, rng: np.random.Generator,
                  rounds: int = 3) -> np.ndarray:
  """Exact layer moves (equal group sizes): split the items into layers of one item per group and
  give each layer's items to the groups by an optimal assignment (linear_sum_assignment), the cost
  of item i in group g being its w to g's other members. One move is the best of all k! permutations
  of the layer; DT-FM's cyclic moves (one vertex out of each group on the cycle) are among them."""
  a = assign.copy()
  n = len(a)
  size = n // k
  if size * k != n or np.any(np.bincount(a, minlength=k) != size):
    return a
  onehot = np.zeros((n, k))
  onehot[np.arange(n), a] = 1.0
  h = w @ onehot
  for _ in range(rounds):
    improved = False
    members = np.array([rng.permutation(np.flatnonzero(a == g)) for g in range(k)])  # k x size
    for j in range(size):
      layer = members[:, j]                                  # layer[g] is in group g
      cost = h[layer] - w[np.ix_(layer, layer)]              # [i, g]: item of group i moved to g
      rows, cols = linear_sum_assignment(cost)
      if cost[rows, cols].sum() < np.trace(cost) - 1e-12 * (1 + abs(np.trace(cost))):
        moved = rows[cols != rows]
        h[:, moved] -= w[:, layer[moved]]
        h[:, cols[moved]] += w[:, layer[moved]]
        a[layer[moved]] = cols[moved]
        members[cols, j] = layer[rows]
        improved = True
    if not improved:
      break
  return a


def local_search(assign: np.ndarray, w: np.ndarray, k: int, steps: int, rng: np.random.Generator,
                 max_rounds: int = 6) -> np.ndarray:
  """KL passes and exact layer moves in turn until neither lowers the within-group cost of w."""
  a, best = assign, within_cost(assign, w)
  for _ in range(max_rounds):
    b = matching_pass(kl_pass(a, w, k, steps), w, k, rng)
    c = within_cost(b, w)
    if c >= best - 1e-12 * (1 + abs(best)):
      break
    a, best = b, c
  return a


def clustered(w: np.ndarray, sizes: Sequence[int], rng: np.random.Generator, tries: int = 3) -> np.ndarray:
  """Balanced clustering: groups of the given sizes with a small within-group sum of w (best of
  `tries` random starts, each refined by local_search)."""
  k = len(sizes)
  steps = min(32, max(1, len(w) // 2))
  best = None
  for _ in range(tries):
    a = local_search(random_assign(sizes, rng), w, k, steps, rng)
    c = within_cost(a, w)
    if best is None or c < best[0]:
      best = (c, a)
  return best[1]


def transversal(w_line: np.ndarray, w_group: np.ndarray, k: int, line_len: int, rng: np.random.Generator,
                tries: int = 3, fitness: Optional[Callable[[np.ndarray], object]] = None,
                evaluations: int = 1000) -> np.ndarray:
  """k groups that cut across lines (pipeline segments over fast links).

  Cluster the items into lines of `line_len` items with a small within-line sum of w_line; bundle
  the lines into k / line_len bundles of n / k lines; each bundle gives line_len groups, one item of
  each of its lines per group, line by line by an optimal assignment that keeps each group's within
  sum of w_group small. line_len = k lays whole pipelines over fast links; a shorter line lays
  pipeline segments (e.g. over 4-GPU hosts when there are 8 stages).

  The bundling decides which lines share groups, and no swap of single items can change it (that
  moves a whole line). Without `fitness` the lines are bundled most tightly linked first; with it,
  the bundling is searched on fitness itself (`bundle_search`), when `evaluations` leave room for
  four scans of all line swaps (a descent and a few kicks).
  """
  n = len(w_line)
  if k % line_len or n % k:
    raise HetjaxError(f'transversal: {line_len} does not divide {k} groups, or {k} does not divide {n} items')
  n_lines, per_bundle = n // line_len, n // k
  lines = groups_of(clustered(w_line, [line_len] * n_lines, rng, tries), n_lines)
  lines.sort(key=lambda line: w_line[np.ix_(line, line)].sum())
  lines = [np.asarray(line) for line in lines]

  def build(bundle_of: np.ndarray) -> np.ndarray:
    assign = np.full(n, -1)
    for b in range(k // line_len):
      bundle = [lines[i] for i in np.flatnonzero(bundle_of == b)]
      assign[bundle[0]] = b * line_len + np.arange(line_len)
      acc = w_group[:, bundle[0]].copy()     # acc[v, g]: w_group from v to the bundle's group g so far
      for line in bundle[1:]:
        rows, cols = linear_sum_assignment(acc[line])
        assign[line[rows]] = b * line_len + cols
        acc[:, cols] += w_group[:, line[rows]]
    return assign

  bundle_of = np.repeat(np.arange(k // line_len), per_bundle)
  swaps = n_lines * (n_lines - per_bundle) // 2
  if fitness is None or k // line_len < 2 or 4 * swaps > evaluations:  # no room for a descent and kicks
    return build(bundle_of)
  return build(bundle_search(bundle_of, lambda b: fitness(build(b)), rng, evaluations))


def better(a, b, rtol: float = 1e-12) -> bool:
  """a < b for costs that are numbers or tuples compared in order (a tie on one part goes to the next)."""
  for x, y in zip(np.atleast_1d(a), np.atleast_1d(b)):
    tol = rtol * (1 + abs(y))
    if x < y - tol:
      return True
    if x > y + tol:
      return False
  return False


def bundle_search(bundle_of: np.ndarray, fitness: Callable[[np.ndarray], object], rng: np.random.Generator,
                  evaluations: int = 1000) -> np.ndarray:
  """Iterated local search over a balanced partition (`bundle_of`: bundle per line) on the true
  fitness (a number, or a tuple compared in order, so that moves along a plateau of the first part
  count when they lower the next). Descent: first-improving swaps of two lines of different bundles.
  Kick: two random swaps of the best bundling that each change its cost (swapping two equivalent
  lines changes nothing), then descend again, until `evaluations` bundlings were scored (repeats
  count too, so that a small space ends the search). Returns the best bundling seen."""
  cache, calls = {}, [0]

  def score(b):
    calls[0] += 1
    key = b.tobytes()
    if key not in cache:
      cache[key] = fitness(b)
    return cache[key]

  def descend(b, cost):
    """The local optimum, its cost and its swap neighbours that change the cost."""
    while calls[0] < evaluations:
      pairs = [(i, j) for i in range(len(b)) for j in range(i + 1, len(b)) if b[i] != b[j]]
      moves = []
      for p in rng.permutation(len(pairs)):
        c = b.copy()
        i, j = pairs[p]
        c[i], c[j] = b[j], b[i]
        fc = score(c)
        if better(fc, cost):
          b, cost = c, fc
          break
        if better(cost, fc):
          moves.append((i, j))
      else:
        return b, cost, moves
    return b, cost, []

  best, best_cost, moves = descend(bundle_of, score(bundle_of))
  while moves and calls[0] < evaluations:
    b = best.copy()
    for m in rng.choice(len(moves), size=min(2, len(moves)), replace=False):
      i, j = moves[m]
      b[i], b[j] = b[j], b[i]
    b, cost, around = descend(b, score(b))
    if better(cost, best_cost):
      best, best_cost, moves = b, cost, around
  return best


def genetic_partition(sizes: Sequence[int], fitness: Callable[[np.ndarray], float], cfg: GAConfig,
                      seed: int = 0, pair_weight=None, initial: Sequence[np.ndarray] = ()) -> GAResult:
  """Minimise fitness over assignments of sum(sizes) items into groups of the given sizes.

  pair_weight: one n x n matrix (the local-search gain) or a list of them; with a list, each
  offspring's local search uses one picked at random, so the search can leave the local optimum of
  any single gain. The local search is one KL pass plus exact layer moves (cfg.matching); restarts
  re-optimise perturbed copies of the best after cfg.restart_after candidates without progress.
  """
  sizes = [int(s) for s in sizes]
  if not sizes or any(s <= 0 for s in sizes):
    raise HetjaxError(f'group sizes must be positive, got {sizes}')
  k, n = len(sizes), sum(sizes)
  equal = len(set(sizes)) == 1
  steps = cfg.kl_steps if cfg.kl_steps is not None else min(32, max(1, n // 2))
  weights = [] if pair_weight is None else (
      list(pair_weight) if isinstance(pair_weight, (list, tuple)) else [pair_weight])
  use_kl = cfg.local_search and bool(weights) and k > 1

  def improve(a, rng):
    w = weights[rng.integers(len(weights))]
    a = kl_pass(a, w, k, steps)
    return matching_pass(a, w, k, rng) if cfg.matching else a

  def breed(p1, p2, rng):
    if equal:  # group labels are interchangeable: align p2 to p1 before crossing
      p2 = align_labels(p1, p2, k)
    child = crossover(p1, p2, sizes, cfg.crossover_points, rng)
    if use_kl:
      child = improve(child, rng)
    if rng.random() < cfg.mutation:  # after the local search, so it cannot undo it
      child = mutate(child, rng)
    return child

  def restart(best, rng):  # a random kick of n/8 swaps, then the local search
    a = best
    for _ in range(max(1, n // 8)):
      a = mutate(a, rng)
    return improve(a, rng) if use_kl else a

  def key(a):  # partitions equal up to relabelling share one fitness
    return tuple(sorted(tuple(g) for g in groups_of(a, k))) if equal else tuple(a)

  evo = EvoConfig(cfg.population, cfg.evaluations, cfg.time_limit, cfg.restart_after, cfg.stop_after,
                  cfg.progress_s, cfg.label)
  res = steady_state(lambda rng: random_assign(sizes, rng), breed, fitness, evo, seed, key,
                     [np.asarray(x, dtype=int) for x in initial], perturb=mutate,
                     restart=restart if cfg.restart_after else None)
  return GAResult(res.best, res.cost, res.history, res.evaluations, res.seconds, res.restarts)
