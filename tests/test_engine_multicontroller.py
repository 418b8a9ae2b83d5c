"""Generation over a serve plan whose stages live in different processes (pair transport)."""

import json
import subprocess
import sys

import numpy as np
import pytest

from hetjax.inference.generate import generate
from hetjax.models.config import get_model_config
from hetjax.models.model import build_model
from hetjax.plan import Plan, Replica, Stage
from tests.test_multicontroller import LAUNCH_TIMEOUT_S, ROOT, env

pytestmark = pytest.mark.slow  # spawns processes

PROMPT = [5, 17, 99, 3, 42]
TOKENS = 6


@pytest.mark.parametrize('devices, replicas, transport', [
    # 2 processes: [0:2] on process 0, [2:4] at TP 2 on process 1.
    ('1,2', [[Stage(0, 2, [0]), Stage(2, 4, [1, 2])]], 'pair'),
    # 3 processes, two replicas: one spans processes 0 -> 1 -> 2, the other lives on process 2.
    ('1,1,4', [[Stage(0, 1, [0]), Stage(1, 3, [1]), Stage(3, 4, [2, 3])],
               [Stage(0, 4, [4, 5])]], 'pair'),
    # The same over the asynchronous socket transport.
    ('1,1,4', [[Stage(0, 1, [0]), Stage(1, 3, [1]), Stage(3, 4, [2, 3])],
               [Stage(0, 4, [4, 5])]], 'socket'),
])
def test_processes_generate_single_device_ids(tmp_path, devices, replicas, transport):
  plan = Plan([Replica(r) for r in replicas], num_layers=4, kind='serve')
  plan.save(str(tmp_path / 'plan.json'))
  n = len(devices.split(','))
  prompts = ','.join(map(str, PROMPT))
  cmd = [sys.executable, '-m', 'hetjax.launch', '-n', str(n), f'--devices={devices}', '--grace=30',
         f'--timeout={LAUNCH_TIMEOUT_S}', '--', sys.executable, 'run.py', '--config=configs/generate.py',
         '--config.model=tiny_llama', f'--config.plan={tmp_path / "plan.json"}',
         f'--config.prompt_ids={prompts}', f'--config.generate.max_new_tokens={TOKENS}',
         f'--config.workdir={tmp_path / "run"}', f'--config.transport={transport}']
  r = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True,
                     timeout=2 * LAUNCH_TIMEOUT_S)
  assert r.returncode == 0, r.stderr[-3000:]
  lines = [l[l.index('{'):] for l in r.stdout.splitlines() if '{"ids"' in l]
  assert len(lines) == 1, r.stdout[-2000:]   # printed once, by the leader
  cfg = get_model_config('tiny_llama')
  want = generate(build_model(cfg, 0), np.array([PROMPT]), TOKENS)
  assert json.loads(lines[0])['ids'] == want.tolist()


def test_a_sample_after_multi_controller_training_runs_over_the_plan(tmp_path):
  """Each stage samples where it trained (no process holds the whole model); only the leader prints."""
  plan = Plan([Replica([Stage(0, 2, [0]), Stage(2, 4, [1, 2])])], num_layers=4, micro_batches=2,
              micro_batch_size=2)
  plan.save(str(tmp_path / 'plan.json'))
  cmd = [sys.executable, '-m', 'hetjax.launch', '-n', '2', '--devices=1,2', '--grace=30',
         f'--timeout={LAUNCH_TIMEOUT_S}', '--', sys.executable, 'run.py', '--config=configs/train.py',
         f'--config.pipeline.plan={tmp_path / "plan.json"}', '--config.model_overrides.num_layers=4',
         '--config.train.steps=2', '--config.train.batch_size=4', '--config.train.seq_len=32',
         '--config.train.eval_every=0', '--config.generate.prompt=hacker',
         '--config.generate.max_new_tokens=6', f'--config.workdir={tmp_path / "run"}']
  r = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True,
                     timeout=2 * LAUNCH_TIMEOUT_S)
  assert r.returncode == 0, r.stderr[-3000:]
  lines = r.stdout.splitlines()
  at = [i for i, l in enumerate(lines) if '--- sample' in l]
  assert len(at) == 1, r.stdout[-2000:]
  sample = lines[at[0] + 1].split('] ', 1)[-1]
  assert sample.startswith('hacker')  # the prompt, then the sampled text


def test_serving_across_processes_equals_each_request_alone(tmp_path):
  """mode=serve (static rounds) over a replica whose stages live in 2 processes: process 0 admits,
  every process runs the same rounds, and the leader writes every request's tokens and times."""
  plan = Plan([Replica([Stage(0, 2, [0]), Stage(2, 4, [1, 2])], max_batch=2)], num_layers=4, kind='serve')
  plan.save(str(tmp_path / 'plan.json'))
  prompts = [[5, 17, 99], [3, 42, 7, 8, 1], [60, 2], [11]]
  (tmp_path / 'requests.jsonl').write_text(''.join(
      json.dumps({'id': f'r{i}', 'ids': p, 'max_new_tokens': 3 + i, 'arrival_s': 0.2 * i}) + '\n'
      for i, p in enumerate(prompts)))
  cmd = [sys.executable, '-m', 'hetjax.launch', '-n', '2', '--devices=1,2', '--grace=30',
         f'--timeout={LAUNCH_TIMEOUT_S}', '--', sys.executable, 'run.py', '--config=configs/serve.py',
         '--config.model=tiny_llama', f'--config.plan={tmp_path / "plan.json"}', '--config.batching=static',
         f'--config.requests={tmp_path / "requests.jsonl"}', f'--config.workdir={tmp_path / "run"}']
  r = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True,
                     timeout=2 * LAUNCH_TIMEOUT_S)
  assert r.returncode == 0, r.stderr[-3000:]
  done = [json.loads(line) for line in (tmp_path / 'run' / 'completions.jsonl').read_text().splitlines()]
  model = build_model(get_model_config('tiny_llama'), 0)
  for i, (p, c) in enumerate(zip(prompts, done)):
    assert c['id'] == f'r{i}'
    assert c['ids'] == generate(model, np.array([p]), 3 + i)[0].tolist()
    assert 0 <= c['ttft_s'] <= c['latency_s']


@pytest.mark.parametrize('transport', ['pair', 'socket'])
def test_continuous_batching_across_processes_equals_each_request_alone(tmp_path, transport):
  """mode=serve with continuous batching over 3 processes: a replica whose stages live in all three
  (TP 2 on the last) and a one-stage replica, one slot per group, so 9 requests with staggered
  arrivals refill freed slots; some stop early at the checkpoint's EOS. Process 0 decides each
  chunk's refills, the others replay them, and every request equals its greedy output alone."""
  import dataclasses
  from flax import nnx
  from hetjax.checkpoint.manager import Checkpointer, StageSpec
  from hetjax.modes.generate import cut_at_eos
  from tests.test_engine import lively_model
  cfg, model = lively_model('tiny_llama')
  ckpt = Checkpointer(str(tmp_path / 'ckpt'))
  ckpt.save(0, [(StageSpec(0, cfg.num_layers, True, True), {'params': nnx.state(model)})],
            {'model': dataclasses.asdict(cfg)})
  ckpt.close()
  rng = np.random.default_rng(7)
  lengths = [(3, 6), (5, 4), (2, 7), (6, 3), (1, 5), (4, 6), (2, 2), (7, 4), (3, 5)]
  prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n, _ in lengths]
  alone = [generate(model, np.array([p]), new)[0] for p, (_, new) in zip(prompts, lengths)]
  # the EOS: the token that most often follows the first generated one
  eos = int(np.bincount(np.concatenate([a[1:] for a in alone]), minlength=cfg.vocab_size).argmax())
  (tmp_path / 'ckpt' / 'tokenizer').mkdir()
  (tmp_path / 'ckpt' / 'tokenizer' / 'generation_config.json').write_text(json.dumps({'eos_token_id': eos}))
  want = [cut_at_eos(a[None], [eos])[0].tolist() for a in alone]
  assert sum(len(w) < new for w, (_, new) in zip(want, lengths)) >= 2, 'needs requests that stop early'
  plan = Plan([Replica([Stage(0, 1, [0]), Stage(1, 3, [1]), Stage(3, 4, [2, 3])], max_batch=1),
               Replica([Stage(0, 4, [4])], max_batch=1)], num_layers=4, kind='serve')
  plan.save(str(tmp_path / 'plan.json'))
  (tmp_path / 'requests.jsonl').write_text(''.join(
      json.dumps({'id': f'r{i}', 'ids': p, 'max_new_tokens': new, 'arrival_s': 0.1 * i}) + '\n'
      for i, (p, (_, new)) in enumerate(zip(prompts, lengths))))
  cmd = [sys.executable, '-m', 'hetjax.launch', '-n', '3', '--devices=1,1,3', '--grace=30',
         f'--timeout={LAUNCH_TIMEOUT_S}', '--', sys.executable, 'run.py', '--config=configs/serve.py',
         f'--config.checkpoint={tmp_path / "ckpt"}', f'--config.plan={tmp_path / "plan.json"}',
         '--config.batching=continuous', '--config.chunk=3', f'--config.transport={transport}',
         f'--config.requests={tmp_path / "requests.jsonl"}', f'--config.workdir={tmp_path / "run"}']
  r = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True,
                     timeout=2 * LAUNCH_TIMEOUT_S)
  assert r.returncode == 0, r.stderr[-3000:]
  done = [json.loads(line) for line in (tmp_path / 'run' / 'completions.jsonl').read_text().splitlines()]
  assert [c['id'] for c in done] == [f'r{i}' for i in range(len(prompts))]
  assert [c['ids'] for c in done] == want
  assert sorted({c['replica'] for c in done}) == [0, 1]
  assert all(0 <= c['ttft_s'] <= c['latency_s'] for c in done)
