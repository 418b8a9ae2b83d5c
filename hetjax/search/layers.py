"""Uneven layer assignment: give each pipeline stage a layer count that minimises the slowest stage,
within per-stage memory caps."""

from __future__ import annotations

import heapq
from typing import Sequence

from hetjax.errors import HetjaxError


def assign_layers(num_layers: int, per_layer: Sequence[float], extra: Sequence[float],
                  caps: Sequence[int]) -> list[int]:
  """n_s >= 1 with sum n_s = num_layers and n_s <= caps[s], minimising max_s n_s * per_layer[s] + extra[s].

  Greedy water-filling: each next layer goes to the stage whose time after taking it is smallest.
  This is optimal for a max of separable non-decreasing costs.
  """
  s = len(per_layer)
  if s > num_layers:
    raise HetjaxError(f'{s} stages but only {num_layers} layers')
  if min(caps) < 1:
    bad = min(range(s), key=lambda i: caps[i])
    raise HetjaxError(f'stage {bad} cannot hold even one layer in memory')
  if sum(caps) < num_layers:
    raise HetjaxError(f'the stages can hold {sum(caps)} layers in memory, the model has {num_layers}')
  n = [1] * s
  heap = [((2) * per_layer[i] + extra[i], i) for i in range(s) if caps[i] > 1]
  heapq.heapify(heap)
  for _ in range(num_layers - s):
    _, i = heapq.heappop(heap)
    n[i] += 1
    if n[i] < caps[i]:
      heapq.heappush(heap, ((n[i] + 1) * per_layer[i] + extra[i], i))
  return n


def equal_layers(num_layers: int, stages: int) -> list[int]:
  """Near-equal split, the remainder on the first stages."""
  if stages > num_layers:
    raise HetjaxError(f'{stages} stages but only {num_layers} layers')
  base, rem = divmod(num_layers, stages)
  return [base + (1 if i < rem else 0) for i in range(stages)]
