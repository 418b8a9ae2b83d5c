"""HexGen-style serving planner and inference cost model: exactness on tiny clusters, TP groups,
memory rejection, asymmetric layouts, determinism and input errors."""

import dataclasses

import numpy as np
import pytest

from hetjax.cluster import Cluster, get_cluster
from hetjax.costmodel import inference as icm
from hetjax.errors import HetjaxError
from hetjax.models.config import get_model_config
from hetjax.plan import Plan
from hetjax.search import hexgen, hexgen_reference

SETUP = icm.ServeSetup(prompt_len=32, gen_len=16)


def tiny_cluster():
  """6 GPUs, 3 pools: 2 A6000 + 2 A4000 in one region, 2 T4 in another."""
  return Cluster.from_dict({'name': 'tiny', 'devices': [
      {'gpu': 'A6000', 'host': 'a', 'region': 'east', 'count': 2},
      {'gpu': 'A4000', 'host': 'b', 'region': 'east', 'count': 2},
      {'gpu': 'T4', 'host': 'c', 'region': 'west', 'count': 2}],
      'links': {'intra_host': [0.01, 100.0], 'intra_region': [0.5, 10.0], 'inter_region_default': [30.0, 1.0]}})


def test_roofline_decode_is_memory_bound_and_gqa_shrinks_kv():
  m = get_model_config('llama2_70b')
  lc = icm.layer_cost(m, SETUP, 312.0, 1555.0, 8)
  # batch 1 decode streams the layer's weights: time per step ~ weight bytes / bandwidth
  per_step = lc.decode / lc.decode_steps
  assert per_step == pytest.approx(lc.weight_bytes / (1555e9 * SETUP.memory_efficiency), rel=0.05)
  mha = dataclasses.replace(m, num_kv_heads=64)
  assert icm.layer_cost(mha, SETUP, 312.0, 1555.0, 8).kv_bytes == pytest.approx(8 * lc.kv_bytes)
  # TP all-reduce: latency term times 2(t-1), bandwidth term
  assert icm.allreduce_time(0, 4, 1e-3, 100) == pytest.approx(6e-3)
  assert icm.allreduce_time(1e9, 2, 0, 8) == pytest.approx(2 * 0.5)


def test_inner_dp_matches_exhaustive_enumeration():
  model = get_model_config('llama2_13b', num_layers=10)
  p = hexgen.Planner(tiny_cluster(), model, SETUP, hexgen.HexGenConfig(objective='latency'))
  for counts in [(2, 2, 2), (1, 2, 2), (2, 0, 1), (0, 2, 2)]:
    for b in (1, 4):
      dp = p._dp(counts, b)[0]
      ref = hexgen_reference.exhaustive_inner(p, counts, b)
      assert dp == pytest.approx(ref, rel=1e-9), (counts, b)


@pytest.mark.parametrize('objective', ['rate', 'latency'])
def test_search_matches_brute_force_on_tiny_cluster(objective):
  model = get_model_config('llama2_13b')
  cfg = hexgen.HexGenConfig(objective=objective, deadline=4.0, rate=0.5, max_batch=8, population=20,
                            evaluations=600)
  best, genome = hexgen_reference.brute_force(tiny_cluster(), model, SETUP, cfg)
  assert np.isfinite(best)
  res = hexgen.plan_serving(tiny_cluster(), model, SETUP, cfg, seed=1)
  assert res.fitness == pytest.approx(best, rel=1e-9)


def test_tp_groups_stay_in_one_host_and_gpu_type_and_plan_is_valid():
  c = get_cluster('hexgen_full_budget')
  m = get_model_config('llama2_70b')
  res = hexgen.plan_serving(c, m, SETUP, hexgen.HexGenConfig(deadline=8.0, evaluations=200, population=20))
  plan = Plan.from_json(res.plan.to_json()).validate(c, m)
  assert plan.kind == 'serve' and sum(r.weight for r in plan.replicas) == pytest.approx(1)
  for r in plan.replicas:
    assert r.max_batch >= 1
    for s in r.stages:
      assert len({c.devices[d].host for d in s.devices}) == 1
      assert len({c.devices[d].gpu for d in s.devices}) == 1
  with pytest.raises(HetjaxError, match='one host and one GPU type'):
    icm.replica_cost(c, m, [icm.StageLayout(80, [0, 8])], SETUP)


def test_asymmetric_stages_when_memory_forces_a_pipeline():
  """Like HexGen's example (A6000 + A5000 + A4000 hosts), but no host alone can hold Llama-2-70B."""
  c = Cluster.from_dict({'name': 'ex', 'devices': [
      {'gpu': 'A5000', 'host': 'h1', 'region': 'r', 'count': 4},
      {'gpu': 'A6000', 'host': 'h2', 'region': 'r', 'count': 2},
      {'gpu': 'A4000', 'host': 'h3', 'region': 'r', 'count': 2}],
      'links': {'intra_host': [0.01, 100.0], 'intra_region': [0.5, 20.0], 'inter_region_default': [30, 1]}})
  m = get_model_config('llama2_70b')
  res = hexgen.plan_serving(c, m, SETUP, hexgen.HexGenConfig(objective='latency', evaluations=200, population=10))
  st = res.plan.replicas[0].stages
  assert len(res.plan.replicas) == 1 and len(st) >= 2
  assert len({s.tp for s in st}) > 1 and len({s.num_layers for s in st}) > 1
  print(res.plan.table(c))


def test_memory_infeasible_plans_are_rejected_with_numbers():
  c, m = get_cluster('hexgen_homogeneous'), get_model_config('llama2_70b')
  with pytest.raises(HetjaxError, match=r'needs [\d.]+ GB per device .* but has [\d.]+ GB'):
    icm.replica_cost(c, m, [icm.StageLayout(80, [0, 1])], SETUP)
  assert icm.layers_that_fit(m, SETUP, 1, c.memory_bytes(0), True, True) < 80
  small = c.subset([0, 1])
  with pytest.raises(HetjaxError, match='no plan fits'):
    hexgen.plan_serving(small, m, SETUP, hexgen.HexGenConfig(objective='latency', evaluations=20, population=4))


def test_search_is_deterministic_per_seed():
  m = get_model_config('llama2_13b')
  cfg = hexgen.HexGenConfig(deadline=4.0, max_batch=8, population=10, evaluations=150)
  a = hexgen.plan_serving(tiny_cluster(), m, SETUP, cfg, seed=3).plan
  b = hexgen.plan_serving(tiny_cluster(), m, SETUP, cfg, seed=3).plan
  assert [r.stages for r in a.replicas] == [r.stages for r in b.replicas]
  assert a.search['history'] == b.search['history']


def test_symmetric_baseline_is_uniform_and_no_better():
  m = get_model_config('llama2_13b')
  cfg = hexgen.HexGenConfig(deadline=4.0, max_batch=8, population=20, evaluations=400)
  sym = hexgen.plan_serving(tiny_cluster(), m, SETUP, dataclasses.replace(cfg, symmetric=True))
  het = hexgen.plan_serving(tiny_cluster(), m, SETUP, cfg)
  tps = {s.tp for r in sym.plan.replicas for s in r.stages}
  assert len(tps) == 1
  for r in sym.plan.replicas:
    n = [s.num_layers for s in r.stages]
    assert max(n) - min(n) <= 1
  assert het.fitness <= sym.fitness + 1e-12


def test_bad_inputs_get_clear_errors():
  m = get_model_config('llama2_13b')
  with pytest.raises(HetjaxError, match='objective'):
    hexgen.HexGenConfig(objective='fast').validate()
  with pytest.raises(HetjaxError, match='deadline'):
    hexgen.HexGenConfig(objective='rate').validate()
  with pytest.raises(HetjaxError, match='batch'):
    icm.ServeSetup(batch=0).validate()
  with pytest.raises(HetjaxError, match='sum to 40'):
    icm.replica_cost(tiny_cluster(), m, [icm.StageLayout(10, [0])], SETUP)
  with pytest.raises(HetjaxError, match='tp=3'):
    icm.replica_cost(get_cluster('hexgen_homogeneous'), m, [icm.StageLayout(40, [0, 1, 2])], SETUP)


def test_run_py_plan_inference_and_offload_policy(tmp_path):
  import json
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, 'XLA_FLAGS': '', 'JAX_PLATFORMS': 'cpu'}
  run = lambda *a: subprocess.run([sys.executable, os.path.join(root, 'run.py'), *a], cwd=root, env=env,
                                  capture_output=True, text=True, timeout=300)
  r = run('--config=configs/plan_inference.py', '--config.cluster=hexgen_half_budget', '--config.evaluations=100',
          '--config.population=10', '--config.num_requests=200', f'--config.workdir={tmp_path / "a"}')
  assert r.returncode == 0, r.stderr
  assert 'replicas=' in r.stdout and 'SLO attainment' in r.stdout
  plan = Plan.load(str(tmp_path / 'a' / 'plan.json'))
  assert plan.kind == 'serve' and os.path.getsize(tmp_path / 'a' / 'plan.png') > 1000
  r = run('--config=configs/offload_policy.py', '--config.model=opt_6.7b', f'--config.workdir={tmp_path / "b"}')
  assert r.returncode == 0, r.stderr
  pol = json.load(open(tmp_path / 'b' / 'policy.json'))
  assert abs(sum(pol['weights']) - 1) < 1e-6 and 'tok/s' in r.stdout
  r = run('--config=configs/plan_inference.py', '--config.objective=fastest', f'--config.workdir={tmp_path / "c"}')
  last = r.stderr.strip().splitlines()[-1]
  assert r.returncode == 2 and last.startswith('error: ') and 'objective must be one of' in last
