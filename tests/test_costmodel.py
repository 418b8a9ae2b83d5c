"""Training cost model: hand-computed DT-FM cost, step time pieces, memory check."""
import numpy as np
import pytest

from hetjax.cluster import Cluster, Device, dtfm_case
from hetjax.costmodel import training as cm
from hetjax.errors import HetjaxError
from hetjax.models.config import get_model_config
from hetjax.plan import Plan, Replica, Stage


def _cluster(n, gpu='V100-SXM2-32GB', delay=10.0, gbps=8.0):
  d = np.full((n, n), delay)
  b = np.full((n, n), gbps)
  return Cluster('hand', [Device(i, gpu, f'h{i}', 'r') for i in range(n)], d, b)


def test_dtfm_cost_by_hand():
  c = _cluster(4)
  c.bandwidth_gbps[0, 2] = c.bandwidth_gbps[2, 0] = 4.0
  out = cm.dtfm_cost(c, [[0, 1], [2, 3]], c_pp=2e9, c_dp=1e9)
  # dp: one peer each: 2 * (0.01 s + 1e9 B / (2 * 1 GB/s)) = 1.02
  assert out['dp'] == pytest.approx(1.02)
  # pp: the matching avoids the slow 0-2 link: 0.01 + 2 s = 2.01, sent forward and backward
  assert out['pp'] == pytest.approx(2 * 2.01)
  assert out['total'] == pytest.approx(1.02 + 4.02)
  assert sorted(map(tuple, out['replicas'])) in ([(0, 3), (1, 2)], [(2, 1), (3, 0)])


def test_wire_bytes_and_allreduce():
  assert cm.wire_bytes(256, 16) == 512
  assert cm.wire_bytes(256, 4, group=128, scale_bytes=4) == 128 + 2 * 4
  m = get_model_config('gpt3_xl')
  full = cm.boundary_bytes(m, cm.TrainSetup())
  q = cm.boundary_bytes(m, cm.TrainSetup(activation_bits=4))
  assert full == 2048 * 2048 * 2 and q / full == pytest.approx(4 / 16 + 4 / (128 * 2))
  c = _cluster(2, delay=1.0)
  assert cm.ring_allreduce_time(c, [0, 1], 1e9) == pytest.approx(2 * (0.001 + 0.5e9 * 8 / 8e9))


def test_pipeline_simulation():
  for sched in ('gpipe', '1f1b'):
    assert cm.simulate_pipeline([1] * 4, [2] * 4, [0] * 3, [0] * 3, [0] * 3, 8, sched) == (8 + 3) * 3
    # one micro-batch over two stages: f0, send, f1 + b1, send back, b0
    assert cm.simulate_pipeline([1, 1], [2, 2], [0.5], [0.5], [0.1], 1, sched) == pytest.approx(6 + 2 * 0.6)
  # a slow link dominates: 10 messages of 5 s each way
  t = cm.simulate_pipeline([1, 1], [1, 1], [5], [5], [0], 10, 'gpipe')
  assert t >= 2 * 10 * 5 and t == pytest.approx(cm.pipeline_time_approx([1, 1], [1, 1], [5], [5], [0], 10), rel=0.05)
  t = cm.simulate_pipeline([1, 1], [1, 1], [5], [5], [0], 10, '1f1b')  # both directions overlap
  assert 10 * 5 <= t < 100 and t == pytest.approx(cm.pipeline_time_approx([1, 1], [1, 1], [5], [5], [0], 10, '1f1b'), rel=0.1)
  order = cm.schedule_order('1f1b', 0, 4, 6)
  assert len(order) == 12 and order[:4] == [('F', 0), ('F', 1), ('F', 2), ('F', 3)] and order[4] == ('B', 0)


def test_step_time_by_hand():
  m = get_model_config('gpt3_xl')
  c = _cluster(2)
  setup = cm.TrainSetup(global_batch=4, seq_len=2048, efficiency=0.5)
  plan = Plan([Replica([Stage(0, 24, [0])]), Replica([Stage(0, 24, [1])])], 24, micro_batches=2,
              schedule='gpipe')
  out = cm.estimate(plan, c, m, setup)
  f = 2048 * (24 * m.block_flops_per_token(2048) + 2 * m.hidden * m.vocab_size) / (125e12 * 0.5)
  assert out['compute'] == pytest.approx(2 * 3 * f) and out['bubble'] == pytest.approx(0, abs=1e-12)
  grads = m.num_params() * 4 + 0 * m.embed_params()  # tied head holds no extra params when embed is local
  assert out['dp_comm'] == pytest.approx(2 * (0.01 + grads / 2 * 8 / 8e9))
  assert out['total'] == pytest.approx(out['compute'] + out['dp_comm'])


def test_tied_table_exchange_by_hand():
  """The tied table's gradient crosses the first-last link once each way, at the same time."""
  m = get_model_config('gpt3_xl')
  assert m.tie_embeddings
  c = _cluster(3)
  c.bandwidth_gbps[0, 2], c.delay_ms[2, 0] = 2.0, 30.0   # the slower direction decides
  setup = cm.TrainSetup(global_batch=4, seq_len=2048, efficiency=0.5)
  plan = Plan([Replica([Stage(0, 8, [0]), Stage(8, 16, [1]), Stage(16, 24, [2])])], 24,
              micro_batches=4)
  table = m.vocab_size * m.hidden * 4
  want = max(table * 8 / 2e9 + 0.01, table * 8 / 8e9 + 0.03)
  out = cm.estimate(plan, c, m, setup)
  assert out['tied_comm'] == pytest.approx(want)
  assert out['total'] == pytest.approx(out['pipeline'] + out['dp_comm'] + want)
  one_device = Plan([Replica([Stage(0, 24, [0])])], 24, micro_batches=4)
  untied = get_model_config('gpt3_xl', tie_embeddings=False)
  assert cm.estimate(one_device, c, m, setup)['tied_comm'] == 0.0
  assert cm.estimate(plan, c, untied, setup)['tied_comm'] == 0.0


def test_memory_check_rejects_overfull_plan():
  m = get_model_config('llama2_70b')
  c = _cluster(1, gpu='T4')
  plan = Plan([Replica([Stage(0, 80, [0])])], 80)
  with pytest.raises(HetjaxError, match=r'device 0 \(T4.*needs .* GB .*> 14.40 GB'):
    cm.check_memory(plan, c, m, cm.TrainSetup(seq_len=1024))
  ok = Plan([Replica([Stage(0, 4, [0])])], 4)
  rows = cm.check_memory(ok, c, get_model_config('tiny_gpt'), cm.TrainSetup(seq_len=256))
  assert rows[0]['ok'] and rows[0]['need'] > 0
  # 1F1B holds fewer micro-batches than GPipe
  assert cm.in_flight('1f1b', 0, 4, 32) == 4 and cm.in_flight('gpipe', 0, 4, 32) == 32


def test_dtfm_workload_matches_paper_scale():
  c_pp, c_dp = cm.dtfm_workload(get_model_config('gpt3_xl'), cm.TrainSetup(), 8, 8)
  assert c_dp / 1e9 == pytest.approx(0.604, rel=0.01)     # paper: 0.65 GB for 3 of 24 layers (fp32)
  assert c_pp == 128 * 2048 * 2048 * 2
  with pytest.raises(HetjaxError, match='does not split'):
    cm.TrainSetup(global_batch=100).micro_batches(8)
