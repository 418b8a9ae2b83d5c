"""Fuzzed configs, plans, cluster files and hardware files: every case is accepted or ends in one
HetjaxError (what run.py prints as one `error:` line with exit code 2); never another exception,
never a hang. Each input starts from a valid one and gets 1-3 random mutations (a value replaced by
random JSON: wrong types, NaN/inf, huge or negative numbers; or a key deleted), then goes through
the code that would consume it. `pytest -s` prints the case counts per outcome."""

import collections
import copy
import json
import os
import signal
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hetjax.cluster import Cluster, get_cluster
from hetjax.config_check import check_config
from hetjax.costmodel.offload import Workload, load_hardware
from hetjax.costmodel.training import TrainSetup, check_memory, estimate
from hetjax.errors import HetjaxError
from hetjax.inference.generate import check_sampling
from hetjax.models.config import get_model_config, model_config_from
from hetjax.plan import Plan
from hetjax.train import check_train_config, make_optimizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = 120           # per input kind
CASE_LIMIT_S = 10        # one case running longer than this counts as a hang
OUTCOMES = collections.Counter()
TINY = get_model_config('tiny_gpt')

JSON_JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70),
    st.sampled_from([0, -1, 1, 2, 7, 1000, 10 ** 6, 10 ** 12, 2.5, -0.0, 1e308]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
    st.sampled_from(['abc', 'T4', 'CPU', 'r1', 'r1-r2', 'gpipe', 'train', '']),
    st.lists(st.integers(-2, 10), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


def _paths(obj, prefix=()):
  """Every (container path, key) in a JSON value."""
  if isinstance(obj, dict):
    items = obj.items()
  elif isinstance(obj, list):
    items = enumerate(obj)
  else:
    return
  for k, v in items:
    yield prefix + (k,)
    yield from _paths(v, prefix + (k,))


@st.composite
def mutated(draw, base):
  obj = copy.deepcopy(base)
  for _ in range(draw(st.integers(1, 3))):
    paths = list(_paths(obj))
    if not paths:
      break
    path = draw(st.sampled_from(paths))
    parent = obj
    for k in path[:-1]:
      parent = parent[k]
    if isinstance(parent, dict) and draw(st.booleans()) and draw(st.booleans()):
      del parent[path[-1]]
    else:
      parent[path[-1]] = draw(JSON_JUNK)
  return obj


def run_case(kind, consume, *args):
  """Run one case under an alarm; record its outcome; fail on anything but success/HetjaxError."""
  def hang(*_):
    raise TimeoutError(f'{kind} case ran longer than {CASE_LIMIT_S} s')
  old = signal.signal(signal.SIGALRM, hang)
  signal.alarm(CASE_LIMIT_S)
  try:
    consume(*args)
    OUTCOMES[(kind, 'accepted')] += 1
  except HetjaxError as e:
    assert '\n' not in str(e), f'multi-line error: {e!r}'
    OUTCOMES[(kind, 'error')] += 1
  except BaseException as e:
    OUTCOMES[(kind, type(e).__name__)] += 1
    raise AssertionError(f'{kind} input {args!r} raised {type(e).__name__}: {e}') from e
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))

# ---- cluster files: both forms, then the cost model over the cluster
COMPACT = {'name': 'fuzz',
           'devices': [{'gpu': 'T4', 'host': 'a', 'region': 'r1', 'count': 2, 'per_host': 2},
                       {'gpu': 'CPU', 'host': 'b', 'region': 'r2', 'tflops': 0.5, 'memory_gb': 2}],
           'links': {'intra_host': [0, 100], 'intra_region': [1, 10], 'inter_region_default': [50, 1],
                     'inter_region': {'r1-r2': [20, 2]}}}
FULL = json.loads(json.dumps(get_cluster('local_hetero').subset(range(3)).to_dict()))
ONE_STAGE = Plan.from_dict({'replicas': [{'stages': [{'layers': [0, 4], 'devices': [0]}]}],
                            'model': 'tiny_gpt', 'micro_batches': 2})


def consume_cluster(d):
  c = Cluster.from_dict(d, 'fuzz')
  c.summary()
  setup = TrainSetup(global_batch=2, seq_len=32, micro_batch_size=1, schedule='1f1b')
  estimate(ONE_STAGE.validate(c, TINY), c, TINY, setup)
  check_memory(ONE_STAGE, c, TINY, setup)


@FUZZ
@given(st.one_of(mutated(COMPACT), mutated(FULL)))
def test_fuzz_cluster_files(d):
  run_case('cluster', consume_cluster, d)


# ---- plan files: parse, validate against a cluster and the model, print
PLAN = {'replicas': [{'stages': [{'layers': [0, 3], 'devices': [0, 1]}, {'layers': [3, 4], 'devices': [2]}]},
                     {'stages': [{'start': 0, 'end': 3, 'devices': [3], 'tp': 1},
                                 {'layers': [3, 4], 'devices': [4], 'embed': False, 'head': True}],
                      'weight': 1.0, 'max_batch': 0}],
        'model': 'tiny_gpt', 'num_layers': 4, 'kind': 'train', 'schedule': 'gpipe', 'micro_batches': 4,
        'micro_batch_size': 1, 'seq_len': 32, 'activation_bits': 16, 'version': 1,
        'offload': {'weights': [1, 0, 0]}}
CLUSTER8 = get_cluster('local_hetero')


def consume_plan(d):
  p = Plan.from_json(json.dumps(d))
  p.table(CLUSTER8)
  p.validate(CLUSTER8, TINY).check_model('tiny_gpt')
  p.stage_groups()
  p.layer_counts()


@FUZZ
@given(mutated(PLAN))
def test_fuzz_plan_files(d):
  run_case('plan', consume_plan, d)


# ---- hardware files (FlexGen policy search input)
HARDWARE = json.load(open(os.path.join(ROOT, 'configs', 'clusters', 'offload_t4_node.json')))


def consume_hardware(d, tmp_dir):
  path = os.path.join(tmp_dir, 'hw.json')
  with open(path, 'w') as f:
    json.dump(d, f)
  hw = load_hardware(path)
  hw.caps()


@FUZZ
@given(mutated(HARDWARE))
def test_fuzz_hardware_files(tmp_path_factory, d):
  run_case('hardware', consume_hardware, d, str(tmp_path_factory.getbasetemp()))


# ---- configs: any field of any job config set to a value of its type (what --config.a.b=v
# lets through), then the checks and the cheap set-up each job does first
def _config(name):
  import importlib
  return importlib.import_module(f'configs.{name}').get_config()


CONFIGS = ['train', 'quickstart', 'plan', 'plan_inference', 'generate', 'offload_policy', 'convert']
BY_TYPE = {
    int: st.one_of(st.integers(-2 ** 40, 2 ** 40), st.sampled_from([-1, 0, 1, 2, 999_999_999, 10 ** 12])),
    float: st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                     st.sampled_from([-1.0, 0.0, 1e9, float('nan'), float('inf')])),
    str: st.one_of(st.text(max_size=6), st.sampled_from(['', 'abc', 'gpipe', 'search'])),
    bool: st.booleans()}


def _fields(cfg, prefix=''):
  for k, v in cfg.items():
    if hasattr(v, 'items'):
      yield from _fields(v, f'{prefix}{k}.')
    else:
      yield f'{prefix}{k}'


def _field_type(cfg, path):
  node = cfg
  *parents, leaf = path.split('.')
  for p in parents:
    node = node[p]
  value = node[leaf]
  if value is None:  # a placeholder: its declared type
    return node.get_type(leaf) if hasattr(node, 'get_type') else int
  return type(value)


@st.composite
def config_cases(draw):
  name = draw(st.sampled_from(CONFIGS))
  cfg = _config(name)
  for _ in range(draw(st.integers(1, 3))):
    path = draw(st.sampled_from(sorted(_fields(cfg))))
    kind = _field_type(cfg, path)
    if kind not in BY_TYPE:
      continue
    *parents, leaf = path.split('.')
    node = cfg
    for p in parents:
      node = node[p]
    node[leaf] = draw(BY_TYPE[kind])
  return name, cfg


def consume_config(cfg):
  check_config(cfg)
  mcfg = model_config_from(cfg)
  if cfg.mode == 'train':
    check_train_config(mcfg, cfg.train)
    make_optimizer(cfg.train)
  if 'generate' in cfg:
    check_sampling(cfg.generate.temperature, cfg.generate.top_k, cfg.generate.top_p)


@FUZZ
@given(config_cases())
def test_fuzz_configs(case):
  name, cfg = case
  run_case(f'config:{name}', consume_config, cfg)


def test_zz_report_outcomes():
  """Prints the counts (run with -s); runs last in this file."""
  kinds = sorted({k for k, _ in OUTCOMES})
  for kind in kinds:
    row = {o: n for (k, o), n in OUTCOMES.items() if k == kind}
    print(f'fuzz {kind}: {sum(row.values())} cases: ' + ', '.join(f'{o} {n}' for o, n in sorted(row.items())))
  assert all(o in ('accepted', 'error') for _, o in OUTCOMES)


# ---- end to end: a few of the inputs through run.py (one `error:` line, exit code 2)
@pytest.mark.slow
@pytest.mark.parametrize('flags', [
    ['--config=configs/plan.py', '--config.search.population=999999999'],
    ['--config=configs/train.py', '--config.train.weight_decay=nan'],
    ['--config=configs/train.py', '--config.ckpt.every=-1'],
    ['--config=configs/generate.py', '--config.generate.top_p=0'],
])
def test_run_py_bad_input_is_one_error_line(tmp_path, flags):
  p = subprocess.run([sys.executable, 'run.py', *flags, f'--config.workdir={tmp_path}'], cwd=ROOT,
                     capture_output=True, text=True, timeout=120)
  lines = [l for l in p.stderr.splitlines() if l.strip()]
  assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith('error: '), p.stderr
