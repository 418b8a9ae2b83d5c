"""Offloaded (FlexGen) generation: same greedy ids as in-memory generation for every tier combination and
1-3 GPU batches, a perplexity bound for 4-bit weights + KV, budgets and bad input refused cleanly."""

import itertools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from hetjax.errors import HetjaxError
from hetjax.inference.generate import generate
from hetjax.inference.offload import OffloadEngine, OffloadPolicy, model_parts
from hetjax.inference.offload_tiers import TIERS, choose_tiers
from hetjax.models.config import get_model_config
from hetjax.models.model import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCK, GBS, T, N = 6, 2, 5, 5
ONE = {'device': (1, 0, 0), 'host': (0, 1, 0), 'disk': (0, 0, 1)}


@pytest.fixture(scope='module', params=['tiny_gpt', 'tiny_llama'])
def model(request):
  """A 3-layer model with weights scaled up 5x, so greedy ids vary token to token (at init they repeat)."""
  m = build_model(get_model_config(request.param, num_layers=3), 0)
  g, s = nnx.split(m)
  return nnx.merge(g, jax.tree.map(lambda x: x * 5, s))


PROMPTS = np.random.default_rng(0).integers(0, 256, (BLOCK, T))
_REFERENCE = {}


def reference(model):
  """In-memory greedy ids for PROMPTS (one compile per model)."""
  if id(model) not in _REFERENCE:
    _REFERENCE[id(model)] = generate(model, PROMPTS, N)
  return _REFERENCE[id(model)]


def run_engine(model, policy, tmp_path, prompts, **kw):
  layers, ends = model_parts(model)
  eng = OffloadEngine(model.cfg, policy, layers, ends, prompt_len=prompts.shape[1], gen_len=N, device_gb=1,
                      host_gb=1, disk_dir=str(tmp_path), **kw)
  try:
    ids, timing = eng.generate(prompts)
    return ids, eng.metrics(timing)
  finally:
    eng.close()


# every (weights tier, KV tier) pair; activations and the number of GPU batches rotate through theirs
COMBOS = [(w, c, TIERS[i % 3], 1 + i % 3) for i, (w, c) in enumerate(itertools.product(TIERS, TIERS))]


@pytest.mark.parametrize('w,c,a,nb', COMBOS)
def test_uncompressed_offload_gives_in_memory_greedy_ids(model, tmp_path, w, c, a, nb):
  ids, m = run_engine(model, OffloadPolicy(BLOCK // nb, nb, ONE[w], ONE[c], ONE[a]), tmp_path, PROMPTS)
  np.testing.assert_array_equal(ids, reference(model))
  layer_bytes = model.cfg.block_params() * 4
  L = model.cfg.num_layers
  if w != 'device':   # zig-zag: each layer's weights are read once per token for the whole block
    assert m['bytes_moved_by_kind'][f'from_{w}/weights'] == N * L * layer_bytes
  assert not any(k.endswith('/weights') for k in m['bytes_moved_by_kind']) or w != 'device'
  assert m['peak_resident_bytes'][w] >= L * layer_bytes
  assert os.listdir(tmp_path) == []   # the disk tier cleans up after itself


@pytest.mark.parametrize('cpu_attention', [False, True])
def test_mixed_fractions_and_cpu_attention(model, tmp_path, cpu_attention):
  policy = OffloadPolicy(GBS, 3, (0.3, 0.3, 0.4), (0.2, 0.4, 0.4), (0.4, 0.3, 0.3), cpu_attention=cpu_attention)
  ids, m = run_engine(model, policy, tmp_path, PROMPTS)
  np.testing.assert_array_equal(ids, reference(model))
  moved = m['bytes_moved_by_kind']
  assert ('to_host/cpu_attention' in moved) == cpu_attention
  if cpu_attention:   # decode never fetches an off-device cache block to the device
    assert m['bytes_moved_by_kind'].get('from_host/kv', 0) == 0


def test_naive_schedule_gives_the_same_ids_and_reloads_weights_per_batch(model, tmp_path):
  nb = 3
  policy = OffloadPolicy(GBS, nb, ONE['host'], ONE['device'], ONE['device'])
  ids, m = run_engine(model, policy, tmp_path, PROMPTS, prefetch=False, reuse_weights=False)
  np.testing.assert_array_equal(ids, reference(model))
  assert m['bytes_from_host'] == nb * N * model.cfg.num_layers * model.cfg.block_params() * 4


def test_choose_tiers_follows_fractions():
  assert choose_tiers([1] * 10, (0.3, 0.3, 0.4)) == ['device'] * 3 + ['host'] * 3 + ['disk'] * 4
  assert choose_tiers([5, 1], (0.5, 0.5, 0)) == ['device', 'host']
  assert choose_tiers([1, 1], (0, 0, 1)) == ['disk', 'disk']


def _trained_model(steps=150):
  """tiny_gpt (2 layers) trained briefly on the shipped corpus; (model, validation tokens)."""
  import optax
  from hetjax.data import BatchIterator, load_corpus, train_val_split
  from hetjax.train import train_step
  cfg = get_model_config('tiny_gpt', num_layers=2)
  graphdef, params = nnx.split(build_model(cfg, 0), nnx.Param)
  opt = optax.adam(3e-3)
  state = opt.init(params)
  train, val = train_val_split(load_corpus())
  it = BatchIterator(train, 16, 48, seed=0)
  for _ in range(steps):
    params, state, _ = train_step(graphdef, opt, params, state, next(it))
  return nnx.merge(graphdef, params), val


def test_4bit_weights_and_kv_perplexity_within_bound(tmp_path):
  model, val = _trained_model()
  windows = np.stack([val[i * 97:i * 97 + 32] for i in range(8)])
  ppl = {}
  for compress in (False, True):
    policy = OffloadPolicy(4, 2, (0, 1, 0), (0, 1, 0), (1, 0, 0), compress_weight=compress, compress_kv=compress)
    layers, ends = model_parts(model)
    eng = OffloadEngine(model.cfg, policy, layers, ends, prompt_len=16, gen_len=16, device_gb=1, host_gb=1)
    try:
      ppl[compress] = float(np.exp(eng.score(windows)))
      if compress:   # stored 4-bit: about 4.5/32 of the fp32 bytes per weight matrix
        assert eng.realised_fractions() == [0, 1, 0]
        assert sum(eng.w_stored) < 0.2 * eng.layer_fp_bytes
    finally:
      eng.close()
  print(f'perplexity fp32 {ppl[False]:.3f}, 4-bit weights+KV {ppl[True]:.3f}')
  assert ppl[False] < 25          # it learned something (bytes: 256 at chance, ~29 for unigrams)
  assert ppl[True] != ppl[False]  # compression really happened
  assert ppl[True] < ppl[False] * 1.05   # bound: +5% (measured: see notes/issue13.md)


def test_budgets_are_enforced_with_numbers(model, tmp_path):
  layers, ends = model_parts(model)
  policy = OffloadPolicy(GBS, 1, ONE['device'], ONE['device'], ONE['device'])
  with pytest.raises(HetjaxError, match=r'needs .* GB on the device .* offload.device_gb is 0.001'):
    OffloadEngine(model.cfg, policy, layers, ends, prompt_len=T, gen_len=N, device_gb=0.001, host_gb=1)
  with pytest.raises(HetjaxError, match='host'):
    OffloadEngine(model.cfg, OffloadPolicy(GBS, 1, ONE['host'], ONE['host'], ONE['host']), layers, ends,
                  prompt_len=T, gen_len=N, device_gb=1, host_gb=1e-4)
  with pytest.raises(HetjaxError, match='positive'):
    OffloadEngine(model.cfg, policy, layers, ends, prompt_len=T, gen_len=N, device_gb=0, host_gb=1)


def test_policy_validation():
  good = {'gpu_batch_size': 2, 'num_gpu_batches': 1, 'weights': [0, 1, 0], 'kv': [1, 0, 0], 'act': [1, 0, 0]}
  assert OffloadPolicy.from_dict(good).block == 2
  with pytest.raises(HetjaxError, match='sum to'):
    OffloadPolicy.from_dict({**good, 'kv': [0.5, 0.2, 0.2]})
  with pytest.raises(HetjaxError, match='not an offload policy'):
    OffloadPolicy.from_dict({'weights': [1, 0, 0]})
  with pytest.raises(HetjaxError, match='is for model'):
    OffloadPolicy.from_dict({**good, 'model': 'opt_30b'}).check_model(get_model_config('tiny_gpt'), 'tiny_gpt')


# ---- run.py, as a user drives it

def run(*args):
  env = {**os.environ, 'XLA_FLAGS': '', 'JAX_PLATFORMS': 'cpu'}
  return subprocess.run([sys.executable, os.path.join(ROOT, 'run.py'), '--config=configs/generate.py',
                         '--config.prompt_ids=1,2,3,4', '--config.generate.max_new_tokens=4', *args],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_cli_search_prints_the_in_memory_ids_and_writes_metrics(tmp_path):
  ref = run(f'--config.workdir={tmp_path / "ref"}')
  r = run(f'--config.workdir={tmp_path / "off"}', '--config.offload.policy=search',
          '--config.offload.device_gb=0.004')
  assert r.returncode == 0, r.stderr
  assert r.stdout.strip().splitlines()[-1] == ref.stdout.strip().splitlines()[-1]
  m = json.load(open(tmp_path / 'off' / 'offload_metrics.json'))
  assert m['tokens_per_s'] > 0 and m['peak_resident_bytes']['device'] <= 0.004e9
  assert {'bytes_moved_by_kind', 'predicted_tokens_per_s', 'planned_peak_bytes'} <= set(m)


def _policy_file(tmp_path, name='policy.json', **kw):
  d = {'gpu_batch_size': 1, 'num_gpu_batches': 1, 'weights': [0, 0, 1], 'kv': [1, 0, 0], 'act': [1, 0, 0],
       'model': 'tiny_gpt', **kw}
  path = tmp_path / name
  path.write_text(json.dumps(d))
  return str(path)


def test_bad_policy_gets_one_line_and_exit_2(tmp_path):
  disk = tmp_path / 'disk'
  disk.mkdir()
  r = run(f'--config.workdir={tmp_path / "work"}', f'--config.offload.disk_dir={disk}',
          f'--config.offload.policy={_policy_file(tmp_path, model="opt_30b")}')
  assert r.returncode == 2
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: the policy is for model'), r.stderr
  assert os.listdir(disk) == [] and not (tmp_path / 'work' / 'offload_metrics.json').exists()


@pytest.mark.parametrize('case, message', [
    ('other_model', 'is for model'),
    ('bad_sum', 'sum to'),
    ('not_writable', 'not a writable folder'),
    ('zero_budget', 'positive number'),
    ('negative_budget', 'positive number'),
])
def test_bad_input_is_refused_before_writing(tmp_path, case, message):
  """The same checks in-process (run.py turns a HetjaxError into one line and exit 2)."""
  from configs import generate as generate_config
  from hetjax.modes._offload import run_offloaded
  disk, work = tmp_path / 'disk', tmp_path / 'work'
  disk.mkdir()
  work.mkdir()
  cfg = generate_config.get_config()
  cfg.prompt_ids, cfg.generate.max_new_tokens = '1,2,3', 3
  cfg.offload.disk_dir, cfg.offload.policy = str(disk), _policy_file(tmp_path)
  if case == 'other_model':
    cfg.offload.policy = _policy_file(tmp_path, 'other.json', model='opt_30b')
  elif case == 'bad_sum':
    cfg.offload.policy = _policy_file(tmp_path, 'sum.json', weights=[0.5, 0.3, 0.3])
  elif case == 'not_writable':
    cfg.offload.disk_dir = str(tmp_path / 'missing')
  else:
    cfg.offload.policy = 'search'
    cfg.offload['device_gb' if case == 'zero_budget' else 'host_gb'] = 0.0 if case == 'zero_budget' else -1.0
  with pytest.raises(HetjaxError, match=message):
    run_offloaded(cfg, str(work))
  assert os.listdir(disk) == [] and os.listdir(work) == []


def test_too_little_disk_space_is_refused_before_writing(model, tmp_path, monkeypatch):
  import shutil
  from collections import namedtuple
  usage = namedtuple('usage', 'total used free')
  monkeypatch.setattr(shutil, 'disk_usage', lambda p: usage(10 ** 6, 10 ** 6, 1000))
  layers, ends = model_parts(model)
  with pytest.raises(HetjaxError, match='GB free'):
    OffloadEngine(model.cfg, OffloadPolicy(GBS, 1, ONE['disk'], ONE['disk'], ONE['disk']), layers, ends,
                  prompt_len=T, gen_len=N, device_gb=1, host_gb=1, disk_dir=str(tmp_path))
  assert os.listdir(tmp_path) == []
