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
    (['--config=configs/model_info.py', '--config.nonsense=1'], 'nonsense'),
    (['--config=configs/generate.py', '--config.prompt_ids=' + ','.join(['1'] * 300)], 'longer than'),
    (['--config=configs/generate.py', '--config.prompt_ids=1,x'], 'comma-separated'),
    (['--config=configs/model_info.py', '--config.mode=dance'], 'unknown mode'),
])
def test_bad_input_gets_one_line(tmp_path, args, message):
  r = run(*args, f'--config.workdir={tmp_path}')
  assert r.returncode == 2
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error:') and message in lines[0], r.stderr
  assert 'Traceback' not in r.stderr
