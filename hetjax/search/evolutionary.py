"""Steady-state evolutionary loop shared by the planners (DT-FM partition GA; HexGen-style searches).

Each step picks two distinct parents at random, breeds one child (crossover, repair, local search:
whatever `breed` does), and the child replaces the worse parent if it is better. Fitness is minimised
and cached by `key(genome)`. The best cost is recorded after every `population` evaluations.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Hashable, Optional, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class EvoConfig:
  population: int = 100
  evaluations: int = 5000            # candidates evaluated, initial population included
  time_limit: Optional[float] = None  # seconds


@dataclasses.dataclass
class EvoResult:
  best: Any
  cost: float
  history: list[float]     # best cost after each generation (= `population` evaluations)
  evaluations: int
  seconds: float


def steady_state(init: Callable[[np.random.Generator], Any],
                 breed: Callable[[Any, Any, np.random.Generator], Any],
                 fitness: Callable[[Any], float], cfg: EvoConfig, seed: int = 0,
                 key: Callable[[Any], Hashable] = lambda g: g, initial: Sequence[Any] = ()) -> EvoResult:
  rng = np.random.default_rng(seed)
  t0 = time.perf_counter()
  cache: dict[Hashable, float] = {}

  def score(g):
    kk = key(g)
    if kk not in cache:
      cache[kk] = float(fitness(g))
    return cache[kk]

  pop = list(initial)[:cfg.population]
  while len(pop) < max(2, cfg.population):
    pop.append(init(rng))
  scores = [score(g) for g in pop]
  evals, history = len(pop), [min(scores)]
  distinct = len({key(g) for g in pop}) > 1 or len(cache) > 1
  while distinct and evals < cfg.evaluations:
    if cfg.time_limit is not None and time.perf_counter() - t0 > cfg.time_limit:
      break
    i, j = rng.choice(len(pop), size=2, replace=False)
    child = breed(pop[i], pop[j], rng)
    c = score(child)
    evals += 1
    worse = i if scores[i] >= scores[j] else j
    if c < scores[worse]:
      pop[worse], scores[worse] = child, c
    if evals % cfg.population == 0:
      history.append(min(scores))
  if history[-1] != min(scores):
    history.append(min(scores))
  b = int(np.argmin(scores))
  return EvoResult(pop[b], scores[b], history, evals, time.perf_counter() - t0)
