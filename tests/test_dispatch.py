"""Dispatch simulator: conservation, batching rules, a hand-checked timeline, policies, determinism."""

import numpy as np
import pytest

from hetjax.errors import HetjaxError
from hetjax.inference import dispatch as dsp


def replicas():
  """A fast, a medium and a slow replica; batch b costs base * (1 + 0.1 (b - 1))."""
  out = []
  for base, mb in ((1.0, 4), (2.0, 2), (5.0, 8)):
    out.append(dsp.ReplicaState(base * (1 + 0.1 * (np.arange(mb + 1) - 1)), mb))
  return out


@pytest.mark.parametrize('policy', list(dsp.POLICIES))
def test_requests_are_conserved_and_batches_respect_limits(policy):
  reps = replicas()
  arr = dsp.poisson_arrivals(2.0, 500, seed=1)
  res = dsp.simulate(arr, reps, dsp.make_policy(policy))
  assert res.completions == len(arr)
  assert not np.isnan(res.finish).any() and not np.isnan(res.start).any()
  assert np.all(res.start >= res.arrival) and np.all(res.finish > res.start)
  assert set(np.unique(res.replica)) <= {0, 1, 2}
  for k, r in enumerate(reps):
    mine = res.replica == k
    if not mine.any():
      continue
    starts, counts = np.unique(res.start[mine], return_counts=True)
    assert counts.max() <= r.max_batch
    # one batch at a time: a batch starts no earlier than the previous one finished
    fin = np.array([res.finish[mine][res.start[mine] == s][0] for s in starts])
    assert np.all(starts[1:] >= fin[:-1] - 1e-12)
    assert np.allclose(fin - starts, r.service[counts])


def test_hand_checked_timeline():
  r = dsp.ReplicaState(np.array([0.0, 1.0, 1.5]), 2)
  res = dsp.simulate([0.0, 0.1, 0.2, 0.3], [r], dsp.RoundRobin())
  # batch {0} at 0 -> 1; batch {1, 2} at 1 -> 2.5; batch {3} at 2.5 -> 3.5
  assert res.start.tolist() == [0.0, 1.0, 1.0, 2.5]
  assert res.finish.tolist() == [1.0, 2.5, 2.5, 3.5]
  assert res.attainment(2.3) == 0.5 and res.deadline_for(1.0) == pytest.approx(3.2)


def test_shortest_completion_beats_round_robin_on_uneven_replicas():
  arr = dsp.poisson_arrivals(2.5, 1000, seed=0)
  rr = dsp.simulate(arr, replicas(), dsp.RoundRobin())
  sc = dsp.simulate(arr, replicas(), dsp.ShortestExpectedCompletion())
  assert sc.deadline_for(0.99) < rr.deadline_for(0.99)
  assert sc.attainment(6.0) > rr.attainment(6.0)


def test_deterministic_per_seed():
  a = dsp.sweep(replicas(), [1.0, 2.0], 5.0, 'shortest_completion', 300, seed=4)
  b = dsp.sweep(replicas(), [1.0, 2.0], 5.0, 'shortest_completion', 300, seed=4)
  c = dsp.sweep(replicas(), [1.0, 2.0], 5.0, 'shortest_completion', 300, seed=5)
  assert a == b and a != c


def test_bad_inputs():
  with pytest.raises(HetjaxError, match='service times for batches 1..4'):
    dsp.ReplicaState(np.ones(3), 4)
  with pytest.raises(HetjaxError, match='sorted'):
    dsp.simulate([1.0, 0.5], replicas(), dsp.RoundRobin())
  with pytest.raises(HetjaxError, match='unknown dispatch policy'):
    dsp.make_policy('random')
  with pytest.raises(HetjaxError, match='rate > 0'):
    dsp.poisson_arrivals(0.0, 10)


def test_max_rate_bisection_brackets_the_99pct_point():
  reps = replicas()
  r = dsp.max_rate(reps, 6.0, 'shortest_completion', 0.99, num_requests=300, seed=0)
  at = lambda rate: dsp.simulate(dsp.poisson_arrivals(rate, 300, 0), reps, dsp.ShortestExpectedCompletion()).attainment(6.0)
  assert 0 < r < 1024 and at(r) >= 0.99 and at(r * 1.05) < 0.99
