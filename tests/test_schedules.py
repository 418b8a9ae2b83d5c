"""Pipeline schedules, without JAX."""

import itertools

import pytest

from hetjax.errors import HetjaxError
from hetjax.parallel.schedules import decode, global_order, in_flight, stage_programs


@pytest.mark.parametrize('name', ['gpipe', '1f1b'])
@pytest.mark.parametrize('stages, micro', [(1, 1), (1, 4), (3, 4), (4, 2), (4, 8), (2, 5)])
def test_every_op_once_forward_before_backward(name, stages, micro):
  programs = stage_programs(name, stages, micro)
  for s, prog in enumerate(programs):
    assert sorted((o.kind, o.micro) for o in prog) == sorted(
        itertools.product('FB', range(micro)))
    seen = set()
    for op in prog:
      if op.kind == 'B':
        assert ('F', op.micro) in seen
      seen.add((op.kind, op.micro))
    # Backwards leave each stage in micro-batch order (gradient accumulation order is fixed).
    assert [o.micro for o in prog if o.kind == 'B'] == list(range(micro))


@pytest.mark.parametrize('stages, micro', [(3, 4), (4, 8), (2, 2)])
def test_in_flight_limits(stages, micro):
  gpipe = stage_programs('gpipe', stages, micro)
  one = stage_programs('1f1b', stages, micro)
  for s in range(stages):
    assert in_flight(gpipe[s]) == micro
    assert in_flight(one[s]) == min(stages - s, micro)


@pytest.mark.parametrize('name', ['gpipe', '1f1b'])
def test_global_order_respects_dependencies(name):
  stages, micro = 4, 6
  order = global_order(stage_programs(name, stages, micro))
  tick = {(o.kind, o.stage, o.micro): o.tick for o in order}
  assert len(order) == 2 * stages * micro
  for (kind, s, m), t in tick.items():
    if kind == 'F' and s > 0:
      assert tick[('F', s - 1, m)] < t
    if kind == 'B':
      assert tick[('F', s, m)] < t
      if s < stages - 1:
        assert tick[('B', s + 1, m)] < t
  # One op per stage per tick.
  assert len({(o.stage, o.tick) for o in order}) == len(order)
  assert [o.tick for o in order] == sorted(o.tick for o in order)


def test_gpipe_makespan_has_the_textbook_bubble():
  stages, micro = 4, 8
  order = global_order(stage_programs('gpipe', stages, micro))
  # Forward wave M + S - 1 ticks, then backward wave M + S - 1 ticks.
  assert order[-1].tick + 1 == 2 * (micro + stages - 1)
  one = global_order(stage_programs('1f1b', stages, micro))
  assert one[-1].tick + 1 == 2 * (micro + stages - 1)


def test_bad_schedule():
  with pytest.raises(HetjaxError, match='unknown schedule'):
    stage_programs('zigzag', 2, 2)
  with pytest.raises(HetjaxError):
    stage_programs('gpipe', 0, 2)


@pytest.mark.parametrize('stages, groups', [(1, 2), (3, 2), (3, 4)])
def test_a_continuing_decode_hands_the_last_token_back_to_stage_0(stages, groups):
  """hand_back: stage 0 ends with one 'K' op per group, after that group's last-step op of the
  last stage (a message when they are different stages); without it, the last step goes nowhere."""
  tokens = 3
  order = global_order(decode(stages, groups, tokens, prefill=False, hand_back=True))
  keeps = [op for op in order if op.kind == 'K']
  assert [(op.stage, op.micro, op.deps) for op in keeps] == [
      (0, m, (('D', stages - 1, m, tokens - 1),)) for m in range(groups)]
  ticks = {op.id: op.tick for op in order}
  assert all(op.tick > ticks[op.deps[0]] for op in keeps)
  plain = global_order(decode(stages, groups, tokens, prefill=False))
  assert len(order) == len(plain) + groups and not any(op.kind == 'K' for op in plain)
