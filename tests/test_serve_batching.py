"""experiments/serve_batching.py's inputs: the plan and the requests it serves both ways."""

import json

import numpy as np

from hetjax.plan import Plan


def test_the_plan_splits_layers_evenly_and_the_requests_mix_lengths(tmp_path, experiment):
  sb = experiment('serve_batching')
  sb.save_plan(str(tmp_path / 'plan.json'), 3, 7, 2)
  plan = Plan.load(str(tmp_path / 'plan.json'))
  assert [(s.start, s.end, s.devices) for s in plan.replicas[0].stages] == [
      (0, 2, [0]), (2, 5, [1]), (5, 7, [2])]
  assert plan.replicas[0].max_batch == 2
  sb.write_requests(str(tmp_path / 'r.jsonl'), 200, 4, 32, 16, 0.0, 0)
  reqs = [json.loads(l) for l in open(tmp_path / 'r.jsonl')]
  tokens = [r['max_new_tokens'] for r in reqs]
  assert min(tokens) == 4 and max(tokens) == 32 and all(len(r['ids']) == 16 for r in reqs)
  assert all(r['arrival_s'] == 0 for r in reqs)
  sb.write_requests(str(tmp_path / 'p.jsonl'), 200, 4, 4, 8, 10.0, 0)
  arrivals = np.array([json.loads(l)['arrival_s'] for l in open(tmp_path / 'p.jsonl')])
  assert np.all(np.diff(arrivals) > 0) and 0.08 < np.diff(arrivals).mean() < 0.12   # 10 per second
