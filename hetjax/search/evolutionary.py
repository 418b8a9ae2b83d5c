"""Steady-state evolutionary loop shared by the planners (DT-FM partition GA; HexGen-style searches).

Each step picks two distinct parents at random, breeds one child (crossover, repair, local search:
whatever `breed` does), and the child replaces the worse parent if it is better. Fitness is minimised
and cached by `key(genome)`. The best cost is recorded after every `population` evaluations.

Early stop: after `stop_after` candidates without improvement (converged). Restarts: when
`restart_after` new candidates bring no improvement, the worse half of the population is replaced by
`restart(best, rng)` (a perturbed, locally re-optimised copy of the best), so a population that has
converged into one basin looks around it again. Long searches print their
progress (candidates, best cost, candidates per second) every `progress_s` seconds.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Hashable, Optional, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class EvoConfig:
  population: int = 100
  evaluations: int = 5000            # distinct candidates evaluated, initial population included
  time_limit: Optional[float] = None  # seconds
  restart_after: int = 0             # candidates without improvement before a restart (0: never)
  stop_after: int = 0                # candidates without improvement before stopping early (0: never)
  progress_s: float = 5.0            # print progress this often once a search runs longer (0: never)
  label: str = 'search'


@dataclasses.dataclass
class EvoResult:
  best: Any
  cost: float
  history: list[float]     # best cost after each generation (= `population` new candidates)
  evaluations: int
  seconds: float
  restarts: int = 0


def steady_state(init: Callable[[np.random.Generator], Any],
                 breed: Callable[[Any, Any, np.random.Generator], Any],
                 fitness: Callable[[Any], float], cfg: EvoConfig, seed: int = 0,
                 key: Callable[[Any], Hashable] = lambda g: g, initial: Sequence[Any] = (),
                 perturb: Optional[Callable[[Any, np.random.Generator], Any]] = None,
                 restart: Optional[Callable[[Any, np.random.Generator], Any]] = None) -> EvoResult:
  """Minimise fitness. `perturb` (optional) mutates a child that was already scored, up to 5 times,
  so that the budget goes to new candidates. `restart` (optional) builds new members from the best
  one after `cfg.restart_after` candidates without improvement."""
  rng = np.random.default_rng(seed)
  t0 = time.perf_counter()
  cache: dict[Hashable, float] = {}

  def score(g):
    kk = key(g)
    if kk not in cache:
      cache[kk] = float(fitness(g))
    return cache[kk]

  pop = list(initial)[:cfg.population]
  tries = 0
  while len(pop) < max(2, cfg.population) and tries < 20 * cfg.population:
    g, tries = init(rng), tries + 1
    if key(g) not in {key(p) for p in pop}:   # distinct individuals while the space allows
      pop.append(g)
  while len(pop) < 2:
    pop.append(init(rng))
  scores = [score(g) for g in pop]
  members = [key(g) for g in pop]
  history = [min(scores)]
  steps, last_gen, restarts = 0, 0, 0
  best_seen, improved_at, printed = min(scores), len(cache), t0
  best_at = len(cache)   # candidates scored when the best cost last improved
  # `evaluations` counts distinct candidates scored (repeats hit the cache); steps are capped as well
  while len(cache) < cfg.evaluations and steps < 20 * cfg.evaluations and len(cache) > 1:
    if cfg.time_limit is not None and time.perf_counter() - t0 > cfg.time_limit:
      break
    if cfg.stop_after and len(cache) - best_at >= cfg.stop_after:
      break
    steps += 1
    i, j = rng.choice(len(pop), size=2, replace=False)
    child = breed(pop[i], pop[j], rng)
    ck = key(child)
    for _ in range(5 if perturb is not None else 0):
      if ck not in cache:
        break
      child = perturb(child, rng)
      ck = key(child)
    c = score(child)
    worse = i if scores[i] >= scores[j] else j
    if c < scores[worse] and ck not in members:   # no duplicates in the population
      pop[worse], scores[worse], members[worse] = child, c, ck
    now = min(scores)
    if now < best_seen:
      best_seen, improved_at, best_at = now, len(cache), len(cache)
    elif restart is not None and cfg.restart_after and len(cache) - improved_at >= cfg.restart_after:
      b = int(np.argmin(scores))
      for idx in np.argsort(scores)[::-1][:len(pop) // 2]:   # the worse half
        if idx == b:
          continue
        g = restart(pop[b], rng)
        gk = key(g)
        if gk not in members:
          pop[idx], scores[idx], members[idx] = g, score(g), gk
      restarts += 1
      improved_at = len(cache)
    if cfg.progress_s and time.perf_counter() - printed >= cfg.progress_s:
      printed = time.perf_counter()
      print(f'{cfg.label}: {len(cache)}/{cfg.evaluations} candidates, best {min(scores):.6g}, '
            f'{len(cache) / (printed - t0):.0f} candidates/s, {restarts} restarts', flush=True)
    if len(cache) // cfg.population > last_gen:
      last_gen = len(cache) // cfg.population
      history.append(min(scores))
  if history[-1] != min(scores):
    history.append(min(scores))
  evals = len(cache)
  b = int(np.argmin(scores))
  return EvoResult(pop[b], scores[b], history, evals, time.perf_counter() - t0, restarts)
