"""Non-finite numbers in hardware, cluster, model, policy and planner inputs: one HetjaxError that
names the field (and through run.py: one `error:` line, exit code 2)."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from hetjax.cluster import CLUSTER_DIR, Cluster
from hetjax.costmodel.inference import ServeSetup
from hetjax.costmodel.offload import Hardware, Workload, load_hardware
from hetjax.errors import HetjaxError
from hetjax.inference.offload import OffloadPolicy
from hetjax.models.config import get_model_config
from hetjax.search.hexgen_inner import HexGenConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BAD = [float('inf'), float('-inf'), float('nan')]


def t4_node():
  with open(os.path.join(CLUSTER_DIR, 'offload_t4_node.json')) as f:
    return {k: v for k, v in json.load(f).items() if not k.startswith('_')}


@pytest.mark.parametrize('field', [f.name for f in dataclasses.fields(Hardware) if f.name != 'name'])
@pytest.mark.parametrize('value', BAD)
def test_hardware_refuses_non_finite_numbers(field, value):
  with pytest.raises(HetjaxError, match=f'{field} must be finite'):
    Hardware(**{**t4_node(), field: value}).validate()


def test_hardware_file_with_infinity_and_not_an_object(tmp_path):
  path = tmp_path / 'hw.json'
  path.write_text(json.dumps({**t4_node(), 'ctog_gbs': float('inf')}))  # writes Infinity
  with pytest.raises(HetjaxError, match='ctog_gbs must be finite'):
    load_hardware(str(path))
  path.write_text('[1, 2]')
  with pytest.raises(HetjaxError, match='must be a JSON object'):
    load_hardware(str(path))
  with pytest.raises(HetjaxError, match='cap_fraction must be <= 1'):
    Hardware(**{**t4_node(), 'cap_fraction': 1.5}).validate()


def test_cluster_file_with_infinite_tflops(tmp_path):
  d = {'name': 'x', 'devices': [{'gpu': 'CPU', 'host': 'h', 'count': 2, 'tflops': float('inf')}],
       'links': {'intra_host': [0.01, 10]}}
  with pytest.raises(HetjaxError, match='tflops must be finite'):
    Cluster.from_dict(d)


@pytest.mark.parametrize('field, value, message', [
    ('rope_theta', float('inf'), 'rope_theta must be finite'),
    ('norm_eps', float('nan'), 'norm_eps must be finite'),
    ('num_layers', 2.5, 'num_layers must be an integer'),
    ('hidden', float('inf'), 'hidden must be an integer'),
])
def test_model_config_refuses_non_finite_and_fractional_fields(field, value, message):
  """A checkpoint's meta.json or a Hugging Face config.json builds a ModelConfig directly."""
  cfg = get_model_config('tiny_gpt')
  with pytest.raises(HetjaxError, match=message):
    dataclasses.replace(cfg, **{field: value}).validate()


def test_offload_policy_with_infinite_batch():
  good = dict(gpu_batch_size=4, num_gpu_batches=2, weights=[1, 0, 0], kv=[1, 0, 0], act=[1, 0, 0])
  OffloadPolicy.from_dict(good)
  with pytest.raises(HetjaxError, match='not an offload policy'):
    OffloadPolicy.from_dict({**good, 'gpu_batch_size': float('inf')})
  with pytest.raises(HetjaxError, match='gpu_batch_size must be <= 1e\\+06'):
    OffloadPolicy.from_dict({**good, 'gpu_batch_size': 10 ** 30})


@pytest.mark.parametrize('make', [
    lambda: ServeSetup(prompt_len=float('nan')),
    lambda: ServeSetup(compute_efficiency=float('nan')),
    lambda: Workload(prompt_len=float('inf')),
    lambda: HexGenConfig(objective='rate', deadline=float('inf')),
    lambda: HexGenConfig(objective='latency', rate=float('nan')),
])
def test_planner_settings_refuse_non_finite_numbers(make):
  with pytest.raises(HetjaxError):
    make().validate()


@pytest.mark.slow  # starts run.py (imports JAX)
def test_run_py_hardware_with_infinity_is_one_error_line(tmp_path):
  path = tmp_path / 'hw.json'
  path.write_text(json.dumps({**t4_node(), 'gpu_tflops_decode': float('inf')}))
  p = subprocess.run([sys.executable, 'run.py', '--config=configs/offload_policy.py',
                      f'--config.hardware={path}', f'--config.workdir={tmp_path}'], cwd=ROOT,
                     capture_output=True, text=True, timeout=120)
  lines = [l for l in p.stderr.splitlines() if l.strip()]
  assert p.returncode == 2 and len(lines) == 1, p.stderr
  assert lines[0].startswith('error: ') and 'gpu_tflops_decode must be finite' in lines[0]
