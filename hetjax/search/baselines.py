"""Baseline placements at DT-FM's fixed shape (TP 1, equal layers), in fixed device-id orders:
random; index (pipeline outermost: stage s, replica j -> device s * D_DP + j); strided (data outermost:
replica j, stage s -> device j * D_PP + s, so stage group s = {s, s + D_PP, ...}). DT-FM's "hybrid"
gain is the GA in planner.plan_dtfm with gain='hybrid'."""

from __future__ import annotations

import numpy as np

from hetjax.cluster import Cluster
from hetjax.costmodel import training as cm
from hetjax.models.config import ModelConfig
from hetjax.plan import Plan, Replica, Stage
from hetjax.search.layers import equal_layers


def _grid_plan(order: list[int], d_pp: int, d_dp: int, cluster: Cluster, model: ModelConfig,
               setup: cm.TrainSetup, data_outer: bool = False) -> Plan:
  bounds = np.concatenate([[0], np.cumsum(equal_layers(model.num_layers, d_pp))]).astype(int)
  pos = (lambda s, j: j * d_pp + s) if data_outer else (lambda s, j: s * d_dp + j)
  reps = [Replica([Stage(int(bounds[s]), int(bounds[s + 1]), [int(order[pos(s, j)])]) for s in range(d_pp)])
          for j in range(d_dp)]
  return Plan(replicas=reps, num_layers=model.num_layers, cluster=cluster.name, schedule=setup.schedule,
              micro_batches=setup.micro_batches(d_dp), micro_batch_size=setup.micro_batch_size,
              seq_len=setup.seq_len, activation_bits=setup.activation_bits)


def random_plan(cluster, model, setup, d_pp: int, d_dp: int, seed: int = 0) -> Plan:
  """Devices in a random order: random groups, random pipeline order, random matching."""
  order = np.random.default_rng(seed).permutation(cluster.n).tolist()
  return _grid_plan(order, d_pp, d_dp, cluster, model, setup)


def index_plan(cluster, model, setup, d_pp: int, d_dp: int) -> Plan:
  """Devices in index order, as Megatron assigns ranks (pipeline outermost)."""
  return _grid_plan(list(range(cluster.n)), d_pp, d_dp, cluster, model, setup)


def strided_plan(cluster, model, setup, d_pp: int, d_dp: int) -> Plan:
  """Devices in index order with data parallelism outermost: replica j = devices j*D_PP .. j*D_PP+D_PP-1."""
  return _grid_plan(list(range(cluster.n)), d_pp, d_dp, cluster, model, setup, data_outer=True)
