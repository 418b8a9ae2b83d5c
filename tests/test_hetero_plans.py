"""Scoring and constructing training plans with heterogeneous replicas (search/hetero_replicas.py)."""

import pytest

from hetjax.cluster import get_cluster
from hetjax.costmodel import training as cm
from hetjax.models.config import get_model_config
from hetjax.plan import Plan, Replica, Stage
from hetjax.search import hetero_replicas as hr

LAB = get_cluster('small_lab')  # 0-3 A100 (one host), 4-7 RTX3090 (2 hosts), 8-15 T4 (2 hosts); 1 Gbit/s between labs
SETUP = cm.TrainSetup(global_batch=32, seq_len=1024)


def test_identical_replicas_score_as_the_uniform_model():
  model = get_model_config('llama2_7b', num_layers=24, max_len=1024)  # untied: one table, no copy
  plan = Plan([Replica([Stage(0, 12, [0, 1]), Stage(12, 24, [8, 9])]),
               Replica([Stage(0, 12, [2, 3]), Stage(12, 24, [10, 11])])],
              num_layers=24, micro_batches=16, micro_batch_size=1)
  got, want = hr.estimate(plan, LAB, model, SETUP), cm.estimate(plan, LAB, model, SETUP)
  assert got['dp_comm'] > 0
  for key in ('total', 'pipeline', 'dp_comm'):
    assert got[key] == pytest.approx(want[key], rel=1e-12)


def test_all_reduce_groups_layers_by_holders_and_serialises_a_shared_device():
  """Replica 0 holds everything on device 0; replica 1 splits at layer 10 over devices 4 and 8.
  Device 0 takes part in both groups, one after the other."""
  model = get_model_config('gpt2_medium')
  plan = Plan([Replica([Stage(0, 24, [0])]), Replica([Stage(0, 10, [4]), Stage(10, 24, [8])])],
              num_layers=24, micro_batches=16, micro_batch_size=1)
  g = SETUP.grad_bytes
  first = (model.embed_params() + 10 * model.block_params()) * g
  second = (14 * model.block_params() + model.head_params()) * g
  want = cm.dtfm_dp_cost(LAB, [[0, 4]], first) + cm.dtfm_dp_cost(LAB, [[0, 8]], second)
  assert hr.allreduce_time(plan, LAB, model, SETUP) == pytest.approx(want, rel=1e-12)


def test_rebalancing_gives_the_faster_replica_more_of_the_batch():
  model = get_model_config('gpt2_medium')
  # Replica 0 on A100s, replica 1 on RTX3090s (same lab), same layer split and shares.
  uniform = Plan([Replica([Stage(0, 12, [0]), Stage(12, 24, [1])]),
                  Replica([Stage(0, 12, [4]), Stage(12, 24, [5])])],
                 num_layers=24, micro_batches=16, micro_batch_size=1)
  before = hr.estimate(uniform, LAB, model, SETUP)['total']
  reb = hr.rebalance(uniform, LAB, model, SETUP)
  reb.validate(LAB, model)
  micro = reb.replica_micro_batches()
  assert sum(micro) == 32 and micro[0] > micro[1]
  assert reb.prediction['total'] < before


@pytest.mark.parametrize('by', ['region', 'host', 'gpu'])
def test_constructed_plans_are_valid_and_use_every_device(by):
  model = get_model_config('gpt2_medium')
  plan = hr.construct(LAB, model, SETUP, by=by, use_all=True, model_name='gpt2_medium')
  plan.validate(LAB, model)
  hr.check_memory(plan, LAB, model, SETUP)
  assert sorted(plan.devices) == list(range(LAB.n))
  assert sum(plan.replica_micro_batches()) * plan.micro_batch_size == SETUP.global_batch
  assert plan.prediction['total'] == pytest.approx(hr.estimate(plan, LAB, model, SETUP)['total'])


def test_best_plan_keeps_the_fastest_candidate_and_scores_them_all():
  """mode=plan's --config.search.hetero_replicas: the uniform plan against its rebalanced form and
  island-built replicas, all scored by one model; a hetero plan wins where it is predicted faster."""
  model = get_model_config('llama2_7b', num_layers=24, max_len=1024)
  uniform = Plan([Replica([Stage(0, 12, [0, 1]), Stage(12, 24, [8, 9])]),
                  Replica([Stage(0, 12, [2, 3]), Stage(12, 24, [10, 11])])],
                 num_layers=24, micro_batches=16, micro_batch_size=1)
  best, scores = hr.best_plan(uniform, LAB, model, SETUP)
  names = [name for name, _ in scores]
  assert names[0] == 'uniform' and len(names) >= 3
  assert scores[0][1] == pytest.approx(hr.estimate(uniform, LAB, model, SETUP)['total'])
  fastest = min(t for _, t in scores)
  assert hr.estimate(best, LAB, model, SETUP)['total'] == pytest.approx(fastest)
  # this hand-made uniform plan leaves the A100s half idle: something heterogeneous beats it
  assert best is not uniform and fastest < scores[0][1]
