"""HexGen's outer genome: a grouping of devices into replicas, as a device count per pool for each
group (devices outside every group are idle), with its random start, hand-made seeds, mutation
(move a chunk of GPUs between groups or to / from the idle set, merge two groups, split a group) and
crossover. HexGen's "shift layers" mutation is not needed: the inner DP already returns the best
layer split for a grouping."""

from __future__ import annotations

import numpy as np

Genome = tuple[tuple[int, ...], ...]


def canonical(groups) -> Genome:
  return tuple(sorted(tuple(int(c) for c in g) for g in groups if sum(g) > 0))


def idle(genome: Genome, sizes: np.ndarray) -> np.ndarray:
  used = np.sum(genome, axis=0) if genome else np.zeros_like(sizes)
  return sizes - used


def random_genome(sizes: np.ndarray, rng: np.random.Generator) -> Genome:
  """Each pool's devices dealt in random chunks to k random groups."""
  k = int(rng.integers(1, max(2, len(sizes)) + 1))
  groups = np.zeros((k, len(sizes)), dtype=int)
  for q, n in enumerate(sizes):
    left = int(n)
    while left:
      chunk = min(left, int(rng.choice([1, 2, 4, 8])))
      groups[rng.integers(k), q] += chunk
      left -= chunk
  return canonical(groups)


def seeds(pools: list, sizes: np.ndarray) -> list[Genome]:
  """Hand-made starting points: one group per pool, per host, per region, and all in one (pools: objects
  with .host and .region, in the order of `sizes`)."""
  out = [canonical(np.diag(sizes)), canonical([sizes])]
  for key in ('host', 'region'):
    names = sorted({getattr(p, key) for p in pools})
    out.append(canonical([[s if getattr(p, key) == nm else 0 for p, s in zip(pools, sizes)] for nm in names]))
  return out


def mutate(genome: Genome, sizes: np.ndarray, rng: np.random.Generator) -> Genome:
  groups = [list(g) for g in genome]
  free = idle(genome, sizes)
  move = rng.choice(['move', 'merge', 'split']) if len(groups) >= 2 else rng.choice(['move', 'split'])
  if move == 'merge':
    i, j = rng.choice(len(groups), 2, replace=False)
    groups[i] = [a + b for a, b in zip(groups[i], groups[j])]
    groups.pop(j)
  elif move == 'split' and groups:
    i = int(rng.integers(len(groups)))
    g = np.array(groups[i])
    part = rng.binomial(g, 0.5) if rng.random() < 0.5 else g * (rng.random(len(g)) < 0.5)
    groups[i], groups_new = list(g - part), list(part)
    groups.append(groups_new)
  else:   # move a chunk of one pool's GPUs: group -> group, group -> idle, or idle -> group
    chunk = int(rng.choice([1, 2, 4]))
    src = int(rng.integers(-1, len(groups)))   # -1: the idle set
    have = free if src < 0 else np.array(groups[src])
    qs = np.flatnonzero(have > 0)
    if len(qs):
      q = int(rng.choice(qs))
      c = min(chunk, int(have[q]))
      dst = int(rng.integers(-1, len(groups) + 1))    # len(groups): a new group
      if dst == len(groups):
        groups.append([0] * len(sizes))
      if src >= 0:
        groups[src][q] -= c
      if dst >= 0 and dst != src:
        groups[dst][q] += c
      elif dst == src and src >= 0:
        groups[src][q] += c
  return canonical(groups)


def crossover(a: Genome, b: Genome, sizes: np.ndarray, rng: np.random.Generator) -> Genome:
  """Keep a random subset of a's groups, then b's groups clipped to the devices left."""
  keep = [g for g in a if rng.random() < 0.5]
  left = sizes - (np.sum(keep, axis=0) if keep else 0)
  out = list(keep)
  for g in b:
    g2 = np.minimum(g, left)
    left -= g2
    out.append(g2)
  return canonical(out)
