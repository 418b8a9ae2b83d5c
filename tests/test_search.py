"""Search: matching and Held-Karp vs brute force, GA vs brute force, layers, determinism, planners."""
import itertools
import os
import sys
import time

import numpy as np
import pytest

from hetjax.cluster import Cluster, Device, dtfm_case, get_cluster
from hetjax.costmodel import training as cm
from hetjax.errors import HetjaxError
from hetjax.models.config import get_model_config
from hetjax.search.layers import assign_layers
from hetjax.search.ordering import bottleneck_matching, held_karp_path, heuristic_path
from hetjax.search.partition import (GAConfig, genetic_partition, groups_of, kl_pass, matching_pass, repair,
                                     transversal, within_cost)
from hetjax.search.planner import SearchConfig, kl_weights, plan_training

PAPER = dict(c_pp_bytes=0.471 * 2 ** 30, c_dp_bytes=0.65e9)   # DT-FM scheduler's constants


def test_bottleneck_matching_brute_force():
  rng = np.random.default_rng(0)
  for _ in range(40):
    n = int(rng.integers(1, 6))
    w = rng.integers(0, 6, (n, n)).astype(float)   # many ties
    val, cols = bottleneck_matching(w)
    brute = min(max(w[i, p[i]] for i in range(n)) for p in itertools.permutations(range(n)))
    assert val == brute and sorted(cols) == list(range(n)) and w[np.arange(n), cols].max() == val


def test_held_karp_brute_force_and_heuristic():
  rng = np.random.default_rng(1)
  for _ in range(20):
    k = int(rng.integers(1, 7))
    d = rng.random((k, k))
    d = d + d.T
    cost, path = held_karp_path(d)
    brute = min(sum(d[p[i], p[i + 1]] for i in range(k - 1)) for p in itertools.permutations(range(k)))
    assert cost == pytest.approx(brute) and sorted(path) == list(range(k))
    assert sum(d[path[i], path[i + 1]] for i in range(k - 1)) == pytest.approx(cost)
    h, hp = heuristic_path(d)
    assert h >= cost - 1e-12 and sorted(hp) == list(range(k))


def _random_cluster(n, rng):
  bw = rng.uniform(0.5, 10, (n, n))
  dl = rng.uniform(0, 50, (n, n))
  return Cluster('rand', [Device(i, 'V100-SXM2-32GB', f'h{i}', 'r') for i in range(n)], dl + dl.T, bw + bw.T)


def _all_partitions(items, size):
  if not items:
    yield []
    return
  first = items[0]
  for rest in itertools.combinations(items[1:], size - 1):
    group = [first, *rest]
    left = [x for x in items if x not in group]
    for tail in _all_partitions(left, size):
      yield [group, *tail]


@pytest.mark.parametrize('k,budget', [(2, 25), (4, 100)])
def test_ga_finds_brute_force_optimum(k, budget):
  # 8 devices: 35 partitions into 2 groups, 105 into 4; the GA scores fewer distinct candidates than that
  rng = np.random.default_rng(k)
  for trial in range(4):
    c = _random_cluster(8, rng)
    fit_groups = lambda g: cm.dtfm_cost(c, g, c_pp=0.5e9, c_dp=1e9)['total']
    brute = min(fit_groups(p) for p in _all_partitions(list(range(8)), 8 // k))
    pair = kl_weights(cm.dp_pair_cost(c, 1e9, 8 // k), c.transfer_time(0.5e9))
    res = genetic_partition([8 // k] * k, lambda a: fit_groups(groups_of(a, k)),
                            GAConfig(population=10, evaluations=budget), seed=trial, pair_weight=pair)
    assert res.cost == pytest.approx(brute) and res.evaluations <= budget
    assert res.history == sorted(res.history, reverse=True)


def test_kl_and_repair_keep_sizes_and_lower_cost():
  rng = np.random.default_rng(3)
  w = rng.random((12, 12))
  w = w + w.T
  np.fill_diagonal(w, 0)
  a = rng.permutation(np.repeat(np.arange(3), 4))
  within = lambda x: sum(w[i, j] for i in range(12) for j in range(i + 1, 12) if x[i] == x[j])
  b = kl_pass(a, w, 3, 6)
  assert np.bincount(b).tolist() == [4, 4, 4] and within(b) <= within(a)
  r = repair(np.array([0, 0, 0, 0, 0, 1, 2, 2]), [3, 3, 2], rng)
  assert np.bincount(r, minlength=3).tolist() == [3, 3, 2]


def test_assign_layers_brute_force():
  rng = np.random.default_rng(4)
  for _ in range(20):
    s, L = 3, int(rng.integers(3, 10))
    t, e = rng.random(s) + 0.1, rng.random(s)
    caps = rng.integers(1, L, s).tolist()
    best = min((max(n[i] * t[i] + e[i] for i in range(s)) for n in itertools.product(range(1, L + 1), repeat=s)
                if sum(n) == L and all(n[i] <= caps[i] for i in range(s))), default=None)
    if best is None:
      with pytest.raises(HetjaxError):
        assign_layers(L, t, e, caps)
      continue
    n = assign_layers(L, t, e, caps)
    assert sum(n) == L and max(n[i] * t[i] + e[i] for i in range(s)) == pytest.approx(best)


def test_dtfm_beats_baselines_and_is_deterministic():
  c = dtfm_case(4, n=16)
  m = get_model_config('gpt3_xl')
  setup = cm.TrainSetup(global_batch=64)
  cfg = SearchConfig(method='dtfm', d_pp=4, population=20, evaluations=300)
  a = plan_training(c, m, setup, cfg, seed=5)
  b = plan_training(c, m, setup, cfg, seed=5)
  strip = lambda p: {**p.to_dict(), 'search': {k: v for k, v in p.search.items() if k != 'seconds'}}
  assert strip(a) == strip(b)
  rnd = plan_training(c, m, setup, SearchConfig(method='random', d_pp=4), seed=0)
  idx = plan_training(c, m, setup, SearchConfig(method='index', d_pp=4))
  assert a.prediction['dtfm_cost'] <= min(rnd.prediction['dtfm_cost'], idx.prediction['dtfm_cost'])
  assert a.search['best'] == pytest.approx(a.prediction['dtfm_cost'])


def test_hetjax_mixed_gpus_uneven_layers_and_tp():
  c = get_cluster('small_lab')   # 4 A100 (one host), 4 RTX3090 (2 hosts), 8 T4 (2 hosts)
  m = get_model_config('gpt2_medium')
  setup = cm.TrainSetup(global_batch=32, seq_len=1024)
  cfg = SearchConfig(method='hetjax', population=20, evaluations=200, screen_evaluations=60)
  p = plan_training(c, m, setup, cfg, seed=0, model_name='gpt2_medium')
  p.validate(c, m)
  assert p.prediction['memory_ok'] == 1.0
  for r in p.replicas:
    for s in r.stages:
      assert c.same_host(s.devices)     # TP only inside a host
  idx = plan_training(c, m, setup, SearchConfig(method='index'), model_name='gpt2_medium')
  assert p.prediction['total'] <= idx.prediction['total'] + 1e-9
  # faster GPUs get at least as many layers per stage (ignoring the head's extra work on the last stage)
  speed = [min(c.tflops(d) for r in p.replicas for d in r.stages[k].devices) * p.replicas[0].stages[k].tp
           for k in range(p.num_stages)]
  counts = p.layer_counts()
  body = list(range(p.num_stages - 1))
  for i in body:
    for j in body:
      if speed[i] > 1.5 * speed[j]:
        assert counts[i] >= counts[j]


def test_plan_mode_writes_outputs(tmp_path):
  from configs import plan as plan_cfg
  from hetjax.modes import plan as plan_mode
  cfg = plan_cfg.get_config()
  cfg.cluster, cfg.num_devices = 'dtfm_case3', 8
  cfg.train.global_batch = 16
  cfg.search.method, cfg.search.evaluations = 'dtfm', 100
  cfg.search.population, cfg.search.d_pp = 10, 4
  plan_mode.run(cfg, str(tmp_path))
  assert os.path.getsize(tmp_path / 'plan.json') > 0 and os.path.getsize(tmp_path / 'placement.png') > 0
  cfg.search.method = 'bogus'
  with pytest.raises(HetjaxError, match='unknown search.method'):
    plan_mode.run(cfg, str(tmp_path))
  cfg.search.method, cfg.search.d_pp, cfg.num_devices = 'dtfm', 0, 64
  cfg.model, cfg.train.global_batch = 'tiny_gpt', 64   # 64 stages > 4 layers is impossible when forced
  cfg.search.d_pp = 64
  with pytest.raises(HetjaxError, match='cannot split'):
    plan_mode.run(cfg, str(tmp_path))


def test_search_reports_memory_infeasibility():
  c = dtfm_case(1, n=8)
  cfg = SearchConfig(method='hetjax', population=6, evaluations=20, screen_evaluations=10)
  with pytest.raises(HetjaxError, match=r'no memory-feasible plan.*device \d+ \(V100.*needs .* GB'):
    plan_training(c, get_model_config('llama2_70b'), cm.TrainSetup(global_batch=8, seq_len=1024), cfg)


def test_matching_pass_beats_every_permutation_of_its_first_layer():
  rng = np.random.default_rng(6)
  for _ in range(10):
    w = rng.random((12, 12))
    w = w + w.T
    np.fill_diagonal(w, 0)
    a = rng.permutation(np.repeat(np.arange(4), 3))
    b = matching_pass(a, w, 4, np.random.default_rng(0), rounds=1)
    assert np.bincount(b).tolist() == [3, 3, 3, 3] and within_cost(b, w) <= within_cost(a, w) + 1e-12
    # the first layer matching_pass moves: the first of each group's members in its rng order
    r = np.random.default_rng(0)
    layer = [int(r.permutation(np.flatnonzero(a == g))[0]) for g in range(4)]
    for perm in itertools.permutations(range(4)):
      moved = a.copy()
      moved[layer] = perm
      assert within_cost(b, w) <= within_cost(moved, w) + 1e-12


def test_transversal_lays_pipeline_segments_on_hosts():
  # DT-FM case 2 at 16 devices: 2 hosts of 4 GPUs (fast) and 8 single GPUs; 4 groups of 4, segments of 2
  c = dtfm_case(2, n=16).subset(np.random.default_rng(3).permutation(16).tolist())
  link = c.transfer_time(1e8)
  np.fill_diagonal(link, 0)
  a = transversal(link, np.zeros((16, 16)), 4, 2, np.random.default_rng(0))
  groups = groups_of(a, 4)
  hosts = c.hosts()
  fast = [g for g in groups if all(c.devices[d].host.startswith('spot') for d in g)]
  assert len(fast) == 2 and all(np.bincount(a, minlength=4) == 4)
  for ids in [ids for name, ids in hosts.items() if name.startswith('spot')]:
    assert sorted(a[ids]) == [0, 0, 1, 1]   # fast segments: two GPUs of each host in each fast group



def _best_host_bundling(c, objective, k, line_len):
  """Brute force over bundlings of lines (`line_len` devices of one host, in id order; leftover
  single GPUs of a region likewise) into two bundles; each bundle gives line_len groups, one device
  of each of its lines per group (devices of a host are interchangeable). Returns the best cost."""
  blocks = [ids for ids in c.hosts().values() if len(ids) > 1]
  singles: dict = {}
  for ids in c.hosts().values():
    if len(ids) == 1:
      singles.setdefault(c.devices[ids[0]].region, []).append(ids[0])
  lines = [ids[i:i + line_len] for ids in blocks + list(singles.values()) for i in range(0, len(ids), line_len)]
  assert k == 2 * line_len and all(len(x) == line_len for x in lines) and sum(map(len, lines)) == c.n
  n = len(lines)
  best = np.inf
  for a in itertools.combinations(range(1, n), n // 2 - 1):
    bundles = [(0,) + a, [i for i in range(n) if i not in (0,) + a]]
    best = min(best, objective([[lines[i][j] for i in b] for b in bundles for j in range(line_len)]))
  return best


def test_bundle_search_reaches_best_bundling(experiment):
  # 32 GPUs on 4-GPU hosts in 5 uneven regions (shuffled ids), 8 groups of 4: which hosts share a
  # group decides the cost, and no swap of two devices moves a host. The plain bundling misses the
  # best one in some draws; the bundling searched on the true cost finds it in every draw.
  ex = experiment('dtfm_scheduling')
  c = ex._regional('small_world', {'Oregon': [4] * 3, 'Virginia': [4] * 2, 'Tokyo': [4], 'London': [4],
                                   'Frankfurt': [4]}, 2.0, 5.0)
  objective = cm.DtfmObjective(c, PAPER['c_pp_bytes'], PAPER['c_dp_bytes'], 4)
  best = _best_host_bundling(c, objective, 8, 4)
  link = c.transfer_time(PAPER['c_pp_bytes'])
  np.fill_diagonal(link, 0)
  w = cm.dp_pair_cost(c, PAPER['c_dp_bytes'], 4)
  plain, searched = [], []
  for seed in range(5):
    plain.append(objective(groups_of(transversal(link, w, 8, 4, np.random.default_rng(seed)), 8)))
    a = transversal(link, w, 8, 4, np.random.default_rng(seed), evaluations=200,
                    fitness=lambda a: objective.ranked(groups_of(a, 8)))
    searched.append(objective(groups_of(a, 8)))
  assert searched == pytest.approx([best] * 5)
  assert max(plain) > best * 1.02


def test_dtfm_reaches_brute_force_with_shuffled_ids():
  m = get_model_config('gpt3_xl')
  setup = cm.TrainSetup(global_batch=64, **PAPER)
  for case in (2, 5):
    c = dtfm_case(case, n=8).subset(np.random.default_rng(case).permutation(8).tolist())
    obj = cm.DtfmObjective(c, PAPER['c_pp_bytes'], PAPER['c_dp_bytes'], 2)
    brute = min(obj(p) for p in _all_partitions(list(range(8)), 2))
    p = plan_training(c, m, setup, SearchConfig(method='dtfm', d_pp=4, population=10, evaluations=60), seed=1)
    assert p.search['best'] == pytest.approx(brute) and p.prediction['dtfm_cost'] == pytest.approx(brute)


def test_dtfm_cost_is_reported_in_run_order():
  c, m = dtfm_case(5), get_model_config('gpt3_xl')
  setup = cm.TrainSetup(**PAPER)
  idx = plan_training(c, m, setup, SearchConfig(method='index'))
  groups = [[d for g in grp for d in g] for grp in idx.stage_groups()]
  reordered = cm.dtfm_cost(c, groups, PAPER['c_pp_bytes'], PAPER['c_dp_bytes'])['total']
  run_order = cm.plan_link_cost(c, idx, PAPER['c_pp_bytes'], PAPER['c_dp_bytes'])['total']
  assert idx.prediction['dtfm_cost'] == pytest.approx(run_order) and run_order > reordered * 1.05
  strided = plan_training(c, m, setup, SearchConfig(method='strided'))
  assert [sorted(d[0] for d in g) for g in strided.stage_groups()] == [list(range(s, 64, 8)) for s in range(8)]
  assert strided.prediction['dtfm_cost'] < run_order


def test_search_prints_progress(capsys):
  c = _random_cluster(16, np.random.default_rng(9))
  obj = cm.DtfmObjective(c, 0.5e9, 1e9, 4)
  slow = lambda a: (time.sleep(0.002), obj(groups_of(a, 4)))[1]
  genetic_partition([4] * 4, slow, GAConfig(population=8, evaluations=60, progress_s=0.02, label='probe'), seed=0)
  out = capsys.readouterr().out
  assert 'probe:' in out and 'candidates/s' in out and 'best' in out


@pytest.mark.slow
def test_dtfm_shuffled_case5_reaches_best_known_in_9_of_10_seeds():
  # best known: the strided plan of the unshuffled case 5 (one region per pipeline), in its run order
  c, m = dtfm_case(5), get_model_config('gpt3_xl')
  setup = cm.TrainSetup(**PAPER)
  best = plan_training(c, m, setup, SearchConfig(method='strided')).prediction['dtfm_cost']
  shuffled = c.subset(np.random.default_rng(2022).permutation(64).tolist())
  hits = 0
  for seed in range(10):
    p = plan_training(shuffled, m, setup, SearchConfig(method='dtfm', progress_s=0), seed=seed)
    assert p.prediction['dtfm_cost'] >= best * (1 - 1e-9)
    hits += p.prediction['dtfm_cost'] <= best * (1 + 1e-9)
  assert hits >= 9


@pytest.mark.slow
@pytest.mark.parametrize('name', ['uneven_world', 'spot_geo'])
def test_dtfm_mixed_scenarios_reach_best_host_bundling_in_every_seed(name, experiment):
  # the experiment's mixed scenarios (64 GPUs, shuffled ids); the reference is the best plan over all
  # bundlings of 4-GPU lines (hosts, halves of 8-GPU hosts, a region's single GPUs four by four)
  c, m = experiment('dtfm_scheduling').scenario(name), get_model_config('gpt3_xl')
  setup = cm.TrainSetup(**PAPER)
  best = _best_host_bundling(c, cm.DtfmObjective(c, PAPER['c_pp_bytes'], PAPER['c_dp_bytes'], 8), 8, 4)
  for seed in range(5):
    p = plan_training(c, m, setup, SearchConfig(method='dtfm', progress_s=0), seed=seed)
    assert p.prediction['dtfm_cost'] <= best * (1 + 1e-9)


def test_cli_sets_dtfm_constants(tmp_path):
  from configs import plan as plan_cfg
  from hetjax.modes import plan as plan_mode
  from hetjax.plan import Plan
  cfg = plan_cfg.get_config()
  cfg.cluster, cfg.num_devices, cfg.draw = 'dtfm_case3', 8, False
  cfg.train.global_batch = 16
  cfg.search.method, cfg.search.evaluations, cfg.search.population, cfg.search.d_pp = 'dtfm', 60, 10, 4
  cfg.train.c_pp_bytes, cfg.train.c_dp_bytes = 3e8, 7e8
  plan_mode.run(cfg, str(tmp_path))
  plan = Plan.load(str(tmp_path / 'plan.json'))
  c = get_cluster('dtfm_case3', 8)
  assert plan.prediction['dtfm_cost'] == pytest.approx(cm.plan_link_cost(c, plan, 3e8, 7e8)['total'])
  derived = cm.dtfm_workload(get_model_config(cfg.model), plan_mode.setup_from(cfg, get_model_config(cfg.model)), 4, 2)
  assert derived == (3e8, 7e8)
  for bad in (-1.0, float('nan'), float('inf')):
    cfg.train.c_pp_bytes = bad
    with pytest.raises(HetjaxError, match='train.c_pp_bytes must be a positive number'):
      plan_mode.run(cfg, str(tmp_path))


def test_bad_dtfm_constant_gets_one_error_line(tmp_path):
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, 'XLA_FLAGS': '', 'JAX_PLATFORMS': 'cpu'}
  r = subprocess.run([sys.executable, os.path.join(root, 'run.py'), '--config=configs/plan.py',
                      '--config.train.c_dp_bytes=-5', f'--config.workdir={tmp_path}'],
                     cwd=root, env=env, capture_output=True, text=True, timeout=300)
  lines = r.stderr.strip().splitlines()
  assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith('error: train.c_dp_bytes'), r.stderr


def test_per_stage_tp_candidates_are_valid_and_considered():
  from hetjax.search.planner import mixed_tp_candidates
  c = get_cluster('small_lab')   # 4 A100 (one host), 4 RTX3090 (2 hosts), 8 T4 (2 hosts)
  m = get_model_config('gpt2_medium')
  setup = cm.TrainSetup(global_batch=32, seq_len=1024)
  cfg = SearchConfig(method='hetjax', population=20, evaluations=200, screen_evaluations=60, progress_s=0)
  cands = mixed_tp_candidates(c, m, setup, cfg, np.random.default_rng(0))
  assert cands
  best_mixed = np.inf
  for _, ev, groups in cands:
    if ev.layout(groups)['deficit']:
      continue
    plan = ev.to_plan(groups)
    plan.validate(c, m)
    for k in range(plan.num_stages):
      degrees = {r.stages[k].tp or len(r.stages[k].devices) for r in plan.replicas}
      assert len(degrees) == 1 and c.same_host(plan.replicas[0].stages[k].devices)
    assert len({r.stages[k].tp or len(r.stages[k].devices) for r in plan.replicas for k in range(plan.num_stages)}) > 1
    best_mixed = min(best_mixed, cm.estimate(plan, c, m, setup)['total'])
  p = plan_training(c, m, setup, cfg, seed=0, model_name='gpt2_medium')
  assert p.search['mixed_tp'] and p.prediction['total'] <= best_mixed + 1e-9
