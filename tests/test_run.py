"""run.py as a user drives it: overrides reach the model, outputs land in the workdir, bad input
gets one line and a non-zero exit."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, cwd=ROOT):
  env = {**os.environ, 'XLA_FLAGS': '', 'JAX_PLATFORMS': 'cpu'}
  return subprocess.run([sys.executable, os.path.join(ROOT, 'run.py'), *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300)


def test_overrides_reach_the_model(tmp_path):
  r = run('--config=configs/model_info.py', '--config.model=tiny_llama',
          '--config.model_overrides.num_layers=3', '--config.model_overrides.num_kv_heads=1',
          f'--config.workdir={tmp_path}')
  assert r.returncode == 0, r.stderr
  info = json.load(open(tmp_path / 'model_info.json'))
  assert info['layers'] == 3 and info['kv_heads'] == 1
  saved = json.load(open(tmp_path / 'config.json'))
  assert saved['model_overrides']['num_layers'] == 3


def test_generate_from_prompt_ids_prints_json_line(tmp_path):
  r = run('--config=configs/generate.py', '--config.prompt_ids=1,2,3',
          '--config.generate.max_new_tokens=5', f'--config.workdir={tmp_path}')
  assert r.returncode == 0, r.stderr
  out = json.loads(r.stdout.strip().splitlines()[-1])
  assert len(out['ids']) == 1 and len(out['ids'][0]) == 5
  assert all(0 <= i < 256 for i in out['ids'][0])


@pytest.mark.slow
def test_short_training_run_writes_metrics(tmp_path):
  r = run('--config=configs/train.py', '--config.model=tiny_llama', '--config.train.steps=6',
          '--config.train.log_every=2', '--config.train.batch_size=2', '--config.train.seq_len=32',
          '--config.train.eval_every=3', f'--config.workdir={tmp_path}')
  assert r.returncode == 0, r.stderr
  records = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
  assert [r['step'] for r in records if 'loss' in r] == [2, 3, 4, 6]
  assert 'steps/s' in r.stdout


@pytest.mark.parametrize('args, message', [
    (['--config=configs/model_info.py', '--config.model=gpt5'], 'unknown model'),
    (['--config=configs/model_info.py', '--config.model_overrides.num_heads=5'], 'not divisible'),
    (['--config=configs/model_info.py', '--config.model=tiny_llama',
      '--config.model_overrides.num_kv_heads=3'], 'num_kv_heads'),
    (['--config=configs/missing.py'], 'cannot load config file'),
    (['--config=configs/model_info.py', '--config.nonsense=1'], 'unknown field nonsense'),
    (['--config=configs/train.py', '--config.train.stepz=3'],
     'unknown field train.stepz; did you mean train.steps?'),
    (['--config=configs/model_info.py', '--config.model_overrides.layers=3'],
     'did you mean model_overrides.num_layers?'),
    (['--config=configs/train.py', '--config.train.steps=abc'], 'train.steps'),
    (['--config=configs/generate.py', '--config.prompt_ids=' + ','.join(['1'] * 300)], 'longer than'),
    (['--config=configs/generate.py', '--config.prompt_ids=1,x'], 'comma-separated'),
    (['--config=configs/model_info.py', '--config.mode=dance'], 'unknown mode'),
    (['--config=configs/train.py', '--config.dp.grad_bits=3'], 'dp.grad_bits must be 0 (off) or one of'),
])
def test_bad_input_gets_one_line(tmp_path, args, message):
  r = run(*args, f'--config.workdir={tmp_path}')
  assert r.returncode == 2
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error:') and message in lines[0], r.stderr
  assert 'Traceback' not in r.stderr


def test_bad_input_leaves_no_workdir(tmp_path):
  r = run(f'--config={ROOT}/configs/plan.py', '--config.cluster=nowhere', cwd=tmp_path)
  assert r.returncode == 2 and 'unknown cluster' in r.stderr
  assert not os.path.exists(tmp_path / 'runs')


def test_failure_in_an_existing_workdir_leaves_the_reason(tmp_path):
  os.makedirs(tmp_path / 'work')  # e.g. a training workdir being reused
  os.makedirs(tmp_path / 'ckpt')
  open(tmp_path / 'ckpt' / 'junk', 'w').close()
  r = run('--config=configs/convert.py', f'--config.src={tmp_path}/ckpt', f'--config.dst={tmp_path}/out',
          f'--config.workdir={tmp_path}/work')
  assert r.returncode == 2
  reason = open(tmp_path / 'work' / 'FAILED.txt').read()
  assert 'neither a Hugging Face folder' in reason


def test_print_only_modes_create_no_workdir(tmp_path):
  r = run(f'--config={ROOT}/configs/model_info.py', '--config.model=llama2_70b', cwd=tmp_path)
  assert r.returncode == 0, r.stderr
  assert 'params' in r.stdout and '68,976,648,192' in r.stdout
  r = run(f'--config={ROOT}/configs/generate.py', '--config.generate.prompt=ab',
          '--config.generate.max_new_tokens=3', cwd=tmp_path)
  assert r.returncode == 0, r.stderr
  ids_line, text_line = r.stdout.strip().splitlines()[-2:]
  ids = json.loads(ids_line)['ids'][0]
  assert len(ids) == 3 and json.loads(text_line)['text'] == bytes(ids).decode('utf-8', errors='replace')
  assert os.listdir(tmp_path) == []


def test_help_lists_configs_and_exits_zero():
  r = run('--help')
  assert r.returncode == 0, r.stderr
  for config in ('configs/train.py', 'configs/plan_inference.py', 'configs/model_info.py'):
    assert config in r.stdout
  assert '--config.help' in r.stdout


def test_config_help_lists_every_field_with_a_meaning():
  """Every field of every config has a one-line meaning in configs/field_help.py."""
  sys.path.insert(0, ROOT)
  import run as run_py
  from configs.field_help import meaning
  for path in run_py.config_files():
    name = os.path.splitext(os.path.basename(path))[0]
    missing = [k for k, _ in run_py.field_items(run_py.load_config(path)) if not meaning(name, k)]
    assert not missing, f'{name}: add meanings to configs/field_help.py for {missing}'
  r = run('--config=configs/plan.py', '--config.help')
  assert r.returncode == 0, r.stderr
  line = next(l for l in r.stdout.splitlines() if l.strip().startswith('search.evaluations='))
  assert '5000' in line and 'candidates' in line
