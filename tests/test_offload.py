"""FlexGen cost model and LP policy search: constraints hold, LP beats sampled policies, capacity errors."""

import dataclasses

import numpy as np
import pytest

from hetjax.costmodel import offload as om
from hetjax.errors import HetjaxError
from hetjax.models.config import get_model_config
from hetjax.search import policy_lp as lp

T4 = om.load_hardware('t4_node')
WL = om.Workload(512, 32)
SMALL = dict(gpu_batch_sizes=(1, 4, 16), num_gpu_batches=(1, 8, 32))


def test_cost_model_is_affine_in_the_fractions():
  m = get_model_config('opt_30b')
  shape = om.Shape(8, 4, cpu_attention=True)
  const, coef = lp.affine(m, T4, WL, shape)
  x = np.random.default_rng(0).random(9)
  ev = om.evaluate(m, T4, WL, shape, x)
  for (part, k), c0 in const.items():
    assert ev[part][k] == pytest.approx(c0 + coef[part, k] @ x, rel=1e-9)


@pytest.mark.parametrize('name,compress', [('opt_30b', False), ('opt_175b', True), ('opt_6.7b', True)])
def test_lp_policies_satisfy_every_constraint(name, compress):
  m = get_model_config(name)
  res = lp.search_policy(m, T4, WL, compress=compress, **SMALL)
  assert lp.check_policy(m, T4, WL, res.best) == []
  assert res.best.throughput == pytest.approx(res.best.shape.block * WL.gen_len / res.best.total_s)
  for shape in list(lp.candidate_shapes(compress, **SMALL))[::5]:
    p = lp.solve_shape(m, T4, WL, shape)
    if p is not None:
      assert lp.check_policy(m, T4, WL, p) == []


def test_lp_beats_every_sampled_feasible_policy():
  m = get_model_config('opt_30b')
  shape = om.Shape(4, 8)
  p = lp.solve_shape(m, T4, WL, shape)
  caps = T4.caps()
  rng = np.random.default_rng(0)
  better = feasible = 0
  for _ in range(3000):
    x = np.concatenate([rng.dirichlet([0.5] * 3) for _ in range(3)])
    ev = om.evaluate(m, T4, WL, shape, x)
    if any(ev['memory'][k] > caps[k] for k in caps):
      continue
    feasible += 1
    t = om.total_time(m, WL, max(ev['prefill'].values()), max(ev['decode'].values()))
    better += t < p.total_s * (1 - 1e-9)
  assert feasible > 50 and better == 0


def test_a_model_that_fits_stays_on_the_gpu_and_compression_helps_big_models():
  m = get_model_config('gpt2_small')
  p = lp.search_policy(m, T4, om.Workload(64, 8), **SMALL).best
  assert p.fractions['wg'] == pytest.approx(1) and p.fractions['cg'] == pytest.approx(1)
  big = get_model_config('opt_175b')
  plain = lp.search_policy(big, T4, WL, compress=False, **SMALL).best
  comp = lp.search_policy(big, T4, WL, compress=True, **SMALL).best
  assert comp.throughput > plain.throughput
  assert plain.fractions['wd'] > 0          # 350 GB of weights cannot all sit in 208 GB of DRAM


def test_local_machine_policy_for_a_small_model_offloads_under_a_small_device_budget():
  hw = om.local_hardware(gpu_mem_gb=0.1, probe_mb=16)
  assert hw.cpu_mem_gb > 1 and hw.disk_gb > 1
  m = get_model_config('gpt2_small')
  wl = om.Workload(128, 16)
  res = lp.search_policy(m, hw, wl, **SMALL)
  assert res.best.fractions['wg'] < 1
  assert lp.check_policy(m, hw, wl, res.best) == []
  off = res.best.to_plan_offload()
  assert sum(off['weights']) == pytest.approx(1) and off['gpu_batch_size'] >= 1


def test_capacity_and_input_errors():
  small = dataclasses.replace(T4, cpu_mem_gb=10, disk_gb=10)
  with pytest.raises(HetjaxError, match='no offloading policy fits: .* GB'):
    lp.search_policy(get_model_config('opt_30b'), small, WL, **SMALL)
  with pytest.raises(HetjaxError, match='CPU attention'):
    om.Shape(1, 1, cpu_attention=True, compress_kv=True).validate()
  with pytest.raises(HetjaxError, match='unknown hardware'):
    om.load_hardware('a100_node')
  with pytest.raises(HetjaxError, match='ctog_gbs must be > 0'):
    om.load_hardware('t4_node', ctog_gbs=-1.0)
  with pytest.raises(HetjaxError, match='prompt_len'):
    lp.search_policy(get_model_config('opt_30b'), T4, om.Workload(0, 4))
