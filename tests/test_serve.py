"""mode=serve: requests in, completions out; bad request files and sampling settings refused."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from hetjax.data import ByteTokenizer
from hetjax.errors import HetjaxError
from hetjax.inference.serving import parse_requests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENCODE = ByteTokenizer().encode


def test_parse_requests():
  lines = ['{"prompt": "hi", "arrival_s": 0.5}', '', '{"ids": [1, 2, 3], "max_new_tokens": 4, "id": "x"}']
  got = parse_requests(lines, ENCODE, 64, 8)
  assert [r.id for r in got] == ['x', '0'] and got[1].ids.tolist() == [104, 105]
  assert got[0].max_new_tokens == 4 and got[1].max_new_tokens == 8


@pytest.mark.parametrize('lines, message', [
    (['{"prompt": "a"}', 'not json'], 'line 2'),
    (['{"ids": "abc"}'], 'line 1'),
    (['{"other": 1}'], 'needs "prompt"'),
    (['{"ids": []}'], 'empty prompt'),
    (['{"ids": [1], "max_new_tokens": 100}'], 'exceeds'),
    (['{"ids": [1], "arrival_s": -1}'], 'arrival_s'),
    ([], 'no requests'),
    (['', '  '], 'no requests'),
])
def test_bad_requests(lines, message):
  with pytest.raises(HetjaxError, match=message):
    parse_requests(lines, ENCODE, 64, 8)


def run_serve(tmp_path, *flags):
  plan = {'kind': 'serve', 'replicas': [{'stages': [{'layers': [0, 2], 'devices': [0, 1]},
                                                    {'layers': [2, 4], 'devices': [2]}]},
                                        {'stages': [{'layers': [0, 4], 'devices': [3]}]}]}
  (tmp_path / 'plan.json').write_text(json.dumps(plan))
  return subprocess.run([sys.executable, 'run.py', '--config=configs/serve.py',
                         f'--config.plan={tmp_path / "plan.json"}',
                         f'--config.workdir={tmp_path / "run"}', *flags],
                        cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize('flags, message', [
    (['--config.generate.temperature=-1'], 'temperature'),
    (['--config.generate.top_p=0'], 'top_p'),
    (['--config.requests=/nonexistent.jsonl'], 'cannot read requests'),
])
def test_bad_serve_flags_give_one_line(tmp_path, flags, message):
  r = run_serve(tmp_path, *flags)
  assert r.returncode == 2 and r.stderr.strip().startswith('error:') and message in r.stderr
  assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_serve_writes_completions_equal_to_generation(tmp_path):
  from hetjax.inference.generate import generate
  from hetjax.models.config import get_model_config
  from hetjax.models.model import build_model
  reqs = [{'ids': [3, 1, 4, 1, 5], 'max_new_tokens': 4}, {'prompt': 'hello', 'max_new_tokens': 6},
          {'ids': [9, 2, 6], 'max_new_tokens': 5, 'arrival_s': 0.2}]
  (tmp_path / 'req.jsonl').write_text('\n'.join(map(json.dumps, reqs)) + '\n')
  r = run_serve(tmp_path, f'--config.requests={tmp_path / "req.jsonl"}', '--config.model=tiny_llama')
  assert r.returncode == 0, r.stderr[-2000:]
  out = [json.loads(l) for l in open(tmp_path / 'run' / 'completions.jsonl')]
  assert sorted(o['replica'] for o in out) != [-1, -1, -1]
  model = build_model(get_model_config('tiny_llama'), 0)
  prompts = [np.array(reqs[0]['ids']), ENCODE('hello'), np.array(reqs[2]['ids'])]
  for o, req, p in zip(out, reqs, prompts):
    assert o['ids'] == generate(model, p[None], req['max_new_tokens'])[0].tolist()
    assert 0 < o['ttft_s'] <= o['latency_s']
  metrics = json.load(open(tmp_path / 'run' / 'metrics.json'))
  assert metrics['tokens'] == 15 and metrics['tokens_per_s'] > 0
  assert (tmp_path / 'run' / 'replica_timeline.png').stat().st_size > 1000


@pytest.mark.parametrize('name, prefill', [('tiny_llama', 'slot'), ('tiny_llama', 'token'),
                                           pytest.param('tiny_gpt', 'slot', marks=pytest.mark.slow)])
def test_continuous_batching_equals_each_request_served_alone(name, prefill):
  """Two slots per group (6 in all) for ten requests of different lengths: slots are refilled while
  other requests are mid-way (with slot prefill, their prompts prefilled into one row of a busy
  cache, sometimes two in one step; Llama with GQA, a TP-2 then a TP-1 stage, and one stage), and
  every request still gets its own greedy continuation."""
  from flax import nnx
  from hetjax.inference.engine import ServeEngine
  from hetjax.inference.generate import generate
  from hetjax.inference.serving import ContinuousServer, Request
  from hetjax.plan import Plan, Replica, Stage
  from tests.test_engine import lively_model
  cfg, model = lively_model(name)
  plan = Plan([Replica([Stage(0, 1, [0, 1]), Stage(1, 4, [2])]), Replica([Stage(0, 4, [3])])],
              num_layers=4, kind='serve')
  engine = ServeEngine(plan, cfg, nnx.state(model))
  rng = np.random.default_rng(3)
  requests = [Request(str(i), rng.integers(0, cfg.vocab_size, n).astype(np.int32), new)
              for i, (n, new) in enumerate([(3, 5), (6, 2), (1, 7), (4, 4), (2, 3), (5, 6), (2, 2),
                                                     (7, 3), (1, 1), (3, 4)])]
  server = ContinuousServer(engine, 'round_robin', 2, {}, chunk=4, prefill=prefill)
  server.serve(requests, progress=lambda *a, **k: None)
  for req in requests:
    assert req.output == generate(model, req.ids[None], req.max_new_tokens)[0].tolist(), req.id
    assert 0 <= req.first_token_s <= req.done_s
  assert sorted({req.replica for req in requests}) == [0, 1]


@pytest.mark.parametrize('prefill', ['slot', 'token'])
def test_a_refilled_slot_prefills_its_prompt_in_one_step(prefill):
  """A slot refilled at step 0 with a 5-token prompt: slot prefill yields its first token at step 0
  (the prompt padded to 8 for a cache of 12), token feeding at step 4, one prompt token a step."""
  from hetjax.inference.serving import Request, SlotGroup
  req = Request('a', np.array([5, 6, 7, 8, 9], np.int32), 3)
  queue = [req]
  group = SlotGroup(2, lambda: queue.pop() if queue else None, lambda: 0.0, prefill=prefill,
                    cache_len=12)
  for step in range(8):
    pos, use, feed = group.feed(step)
    pre = [(i, p.prompts.tolist(), p.lengths.tolist()) for i, p in group.prefills(step)]
    assert pre == ([(0, [[5, 6, 7, 8, 9, 0, 0, 0]], [5])] if prefill == 'slot' and step == 0 else [])
    if prefill == 'token' and step < 5:
      assert (pos[0], use[0], feed[0]) == (step, True, 5 + step)
    if prefill == 'slot' and 0 < step < 3:
      assert (pos[0], use[0]) == (4 + step, False)   # its own sampled token after the prompt
    group.record(step, np.array([40 + step, 0]))
  assert req.output == ([40, 41, 42] if prefill == 'slot' else [44, 45, 46])
  assert group.slots == [None, None]


def test_slot_prefill_refuses_an_unknown_mode():
  from hetjax.inference.serving import SlotGroup
  with pytest.raises(HetjaxError, match="prefill must be 'slot' or 'token'"):
    SlotGroup(2, lambda: None, lambda: 0.0, prefill='chunk')


@pytest.mark.parametrize('batching', ['continuous', 'static'])
def test_requests_end_at_the_end_of_sequence_token(batching):
  """With an EOS id, each request stops at its first EOS (included), as generating it alone and
  cutting there; under continuous batching the freed slot takes the next request."""
  from flax import nnx
  from hetjax.inference.engine import ServeEngine
  from hetjax.inference.generate import generate
  from hetjax.inference.serving import ContinuousServer, Request, Server
  from hetjax.modes.generate import cut_at_eos
  from hetjax.plan import Plan, Replica, Stage
  from tests.test_engine import lively_model
  cfg, model = lively_model('tiny_gpt')
  plan = Plan([Replica([Stage(0, 2, [0]), Stage(2, 4, [1])])], num_layers=4, kind='serve')
  engine = ServeEngine(plan, cfg, nnx.state(model))
  rng = np.random.default_rng(5)
  prompts = [rng.integers(0, cfg.vocab_size, n).astype(np.int32) for n in (3, 5, 2, 4, 6, 3)]
  alone = [generate(model, p[None], 8)[0] for p in prompts]
  # the EOS: the token that most often appears after the first position
  counts = np.bincount(np.concatenate([a[1:-1] for a in alone]), minlength=cfg.vocab_size)
  eos = int(counts.argmax())
  want = [cut_at_eos(a[None], [eos])[0].tolist() for a in alone]
  assert sum(len(w) < 8 for w in want) >= 2, 'the test needs requests that stop early'
  requests = [Request(str(i), p, 8) for i, p in enumerate(prompts)]
  server = (ContinuousServer(engine, 'round_robin', 2, {}, chunk=3, eos=[eos]) if batching == 'continuous'
            else Server(engine, 'round_robin', 2, {}, eos=[eos]))
  server.serve(requests, progress=lambda *a, **k: None)
  assert [r.output for r in requests] == want
  assert all(r.finished for r in requests)


def test_cut_at_eos_and_the_checkpoints_eos_ids(tmp_path):
  from hetjax.modes.generate import cut_at_eos
  from hetjax.tokenizer import eos_ids
  rows = cut_at_eos(np.array([[4, 2, 7, 2], [1, 1, 1, 1]]), (2, 9))
  assert [r.tolist() for r in rows] == [[4, 2], [1, 1, 1, 1]]
  assert [r.tolist() for r in cut_at_eos(np.array([[4, 2]]), ())] == [[4, 2]]
  (tmp_path / 'tokenizer').mkdir()
  assert eos_ids(str(tmp_path)) == ()
  (tmp_path / 'tokenizer' / 'generation_config.json').write_text('{"eos_token_id": [2, 7]}')
  assert eos_ids(str(tmp_path)) == (2, 7)
  (tmp_path / 'tokenizer' / 'generation_config.json').write_text('{"eos_token_id": "x"}')
  with pytest.raises(HetjaxError, match='eos_token_id must be a token id'):
    eos_ids(str(tmp_path))


def test_request_ids_outside_the_vocabulary():
  with pytest.raises(HetjaxError, match=r'line 1: token ids must lie in \[0, 50\)'):
    parse_requests(['{"ids": [1, 60]}'], ENCODE, 64, 8, vocab_size=50)


def test_static_rounds_fit_the_model_and_compile_decode_once():
  """A long prompt with few new tokens and a short prompt with many do not fit one round of a
  64-position model together: the second waits for the next round, and both equal their output
  alone. Every round uses one KV-cache length, so the decode program compiles once."""
  from flax import nnx
  from hetjax.inference.engine import ServeEngine
  from hetjax.inference.generate import generate
  from hetjax.inference.serving import Request, Server
  from hetjax.models.config import get_model_config
  from hetjax.models.model import build_model
  from hetjax.parallel.generation import stage_programs
  from hetjax.plan import Plan, Replica, Stage
  cfg = get_model_config('tiny_llama', max_len=64)
  model = build_model(cfg, 0)
  engine = ServeEngine(Plan([Replica([Stage(0, 4, [0])])], num_layers=4, kind='serve'), cfg,
                       nnx.state(model))
  rng = np.random.default_rng(1)
  requests = [Request('long', rng.integers(0, 256, 50).astype(np.int32), 4),
              Request('many', rng.integers(0, 256, 5).astype(np.int32), 30),
              Request('short', rng.integers(0, 256, 3).astype(np.int32), 7)]
  server = Server(engine, 'round_robin', 4, {})
  server.serve(requests, progress=lambda *a, **k: None)
  for req in requests:
    assert req.output == generate(model, req.ids[None], req.max_new_tokens)[0].tolist(), req.id
  assert len(server.busy) == 2                 # 'many' and 'short' waited for a second round
  group = engine.stages[0][2]
  assert stage_programs(group, (0.0, 0, 1.0)).decode._cache_size() == 1
