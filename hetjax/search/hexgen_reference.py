"""Test oracles for the HexGen planner (tiny instances only): the best grouping by enumerating every
set partition of the devices, and the inner DP's optimum by enumerating every pool subset and layer
split. Not used by the planner itself."""

from __future__ import annotations

import itertools
from typing import Sequence

from hetjax.cluster import Cluster
from hetjax.costmodel import inference as icm
from hetjax.errors import HetjaxError
from hetjax.models.config import ModelConfig
from hetjax.search.hexgen_genome import Genome, canonical
from hetjax.search.hexgen_inner import INF, HexGenConfig, Planner


def brute_force(cluster: Cluster, model: ModelConfig, setup: icm.ServeSetup, cfg: HexGenConfig
                ) -> tuple[float, Genome]:
  """Best grouping by enumerating every set partition of the devices (tiny clusters only)."""
  planner = Planner(cluster, model, setup, cfg)
  pool_of = {d: q for q, p in enumerate(planner.pools) for d in p.devices}
  best, best_g = INF, ()
  for part in _set_partitions(list(range(cluster.n))):
    g = canonical([[sum(pool_of[d] == q for d in blk) for q in range(len(planner.pools))] for blk in part])
    f = planner.score(g)[0]
    if f < best:
      best, best_g = f, g
  return best, best_g


def _set_partitions(items):
  if len(items) > 10:
    raise HetjaxError(f'brute force is for tiny clusters (<= 10 devices), got {len(items)}')
  if not items:
    yield []
    return
  first, rest = items[0], items[1:]
  for part in _set_partitions(rest):
    for i in range(len(part)):
      yield part[:i] + [[first] + part[i]] + part[i + 1:]
    yield [[first]] + part


def exhaustive_inner(planner: Planner, counts: Sequence[int], b: int) -> float:
  """Reference for the inner DP: every subset, order-preserving choice of TP degree and layer split
  per pool (tiny models only); same DP cost terms."""
  L = planner.model.num_layers
  active = [q for q, c in enumerate(counts) if c > 0]
  best = INF
  for r in range(1, len(active) + 1):
    for used in itertools.combinations(active, r):
      opts = [planner._pool_cost(q, counts[q], b)[0] for q in used]
      for split in _compositions(L, r):
        t = sum(o[n] for o, n in zip(opts, split))
        t += sum(planner._hop(p, q, b) for p, q in zip(used, used[1:]))
        t += planner._back(used[-1], used[0], b) if used[-1] != used[0] else 0.0
        best = min(best, t)
  return best


def _compositions(n: int, k: int):
  if k == 1:
    yield (n,)
    return
  for first in range(1, n - k + 2):
    for rest in _compositions(n - first, k - 1):
      yield (first,) + rest
