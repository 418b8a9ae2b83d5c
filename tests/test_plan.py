"""Plan: JSON round trip, hand-written plans, validation errors."""
import pytest

from hetjax.cluster import dtfm_case
from hetjax.errors import HetjaxError
from hetjax.models.config import get_model_config
from hetjax.plan import Plan


def _hand(**kw):
  d = {'replicas': [{'stages': [{'layers': [0, 3], 'devices': [0, 1]}, {'layers': [3, 4], 'devices': [2]}]},
                    {'stages': [{'layers': [0, 3], 'devices': [3]}, {'layers': [3, 4], 'devices': [4]}]}],
       'model': 'tiny_gpt', 'schedule': 'gpipe', 'micro_batches': 4}
  d.update(kw)
  return Plan.from_dict(d)


def test_hand_written_plan_and_round_trip(tmp_path):
  p = _hand()
  p.validate(dtfm_case(1, n=8), get_model_config('tiny_gpt'))
  s0 = p.replicas[0].stages[0]
  assert (s0.tp, s0.embed, s0.head, p.num_layers, p.dp, p.num_stages) == (2, True, False, 4, 2, 2)
  assert p.stage_groups()[1] == [[2], [4]] and p.locate(4) == (1, 1)
  p.prediction = {'total': 1.5}
  p.search = {'method': 'hand', 'history': [3.0, 2.0]}
  path = tmp_path / 'plan.json'
  p.save(str(path))
  assert Plan.load(str(path)) == p
  assert 'stage' in p.table()


@pytest.mark.parametrize('change,msg', [
    (dict(version=99), 'version'),
    (dict(schedule='zigzag'), 'schedule'),
    (dict(replicas=[{'stages': [{'layers': [0, 2], 'devices': [0]}, {'layers': [3, 4], 'devices': [1]}]}]), 'must start at 2'),
    (dict(replicas=[{'stages': [{'layers': [0, 4], 'devices': [0]}]}, {'stages': [{'layers': [0, 4], 'devices': [0]}]}]), 'used twice'),
    (dict(replicas=[{'stages': [{'layers': [0, 2], 'devices': [0]}, {'layers': [2, 4], 'devices': [1]}]},
                    {'stages': [{'layers': [0, 3], 'devices': [2]}, {'layers': [3, 4], 'devices': [3]}],
                     'weight': 2}]), 'not into whole micro-batches'),
    (dict(replicas=[{'stages': [{'layers': [0, 4], 'devices': [0, 1, 2]}]}]), 'tp=3 does not divide'),
    (dict(replicas=[{'stages': [{'layers': [0, 4], 'devices': [9]}]}]), 'not in cluster'),
    (dict(bogus=1), 'unknown field'),
    (dict(replicas=[{'stages': [{'layers': [0, 'abc'], 'devices': [0]}]}], num_layers=4), 'end must be an integer'),
    (dict(replicas=[{'stages': [{'layers': [0, 4], 'devices': [-1]}]}]), 'device id must be >= 0'),
    (dict(replicas=[{'stages': [{'layers': [0, 4], 'devices': [0]}], 'weight': float('nan')}]), 'finite'),
    (dict(micro_batches=2.5), 'micro_batches must be an integer'),
    (dict(micro_batches=10 ** 9), 'micro_batches must be <= '),
    (dict(replicas='x'), 'replicas must be a list'),
])
def test_invalid_plans(change, msg):
  with pytest.raises(HetjaxError, match=msg):
    _hand(**change).validate(dtfm_case(1, n=8), get_model_config('tiny_gpt'))


def test_malformed_json():
  with pytest.raises(HetjaxError, match='invalid plan'):
    Plan.from_json('{"replicas": [{"stages": [{"devices": [0]}]}]}')


def test_plan_for_another_model_is_refused():
  with pytest.raises(HetjaxError, match="made for model 'tiny_gpt', not 'tiny_llama'"):
    _hand().check_model('tiny_llama')
  assert _hand().check_model('tiny_gpt').model == 'tiny_gpt'
