"""HexGen's plan conversion: the replicas a search chose -> a serve Plan (device ids, layer ranges,
batch limits, traffic weights in proportion to capacity) and its predicted numbers."""

from __future__ import annotations

import numpy as np

from hetjax.plan import Plan, Replica, Stage
from hetjax.search.hexgen_inner import Planner, ReplicaChoice


def to_plan(planner: Planner, reps: list[ReplicaChoice], model_name: str, info: dict) -> Plan:
  w = np.array([r.capacity for r in reps])
  offset: dict[int, int] = {}
  out = []
  for r, wi in zip(reps, w / w.sum()):
    pos, stages = 0, []
    for st in planner.devices(r.stages, offset):
      stages.append(Stage(pos, pos + st.num_layers, st.devices))
      pos += st.num_layers
    out.append(Replica(stages, weight=float(wi), max_batch=r.batch))
  s = planner.setup
  return Plan(replicas=out, num_layers=planner.model.num_layers, kind='serve', model=model_name,
              cluster=planner.cluster.name, seq_len=s.prompt_len, gen_len=s.gen_len, search=info)


def finish_prediction(plan: Plan, planner: Planner, fitness: float, reps: list[ReplicaChoice]) -> Plan:
  lat = [r.latency_1 for r in reps]
  cap = [r.capacity for r in reps]
  plan.prediction = {'latency_1_min_s': min(lat), 'latency_1_max_s': max(lat),
                     'capacity_rps': float(sum(cap)),
                     'tokens_per_s': float(sum(cap) * planner.setup.gen_len)}
  if planner.cfg.objective == 'latency':
    plan.prediction['mean_latency_s'] = fitness
  return plan
