"""The pipeline runtime on 8 CPU devices equals plain single-device training."""

import jax
import numpy as np
import pytest
from flax import nnx

from configs import base
from hetjax import data as data_lib
from hetjax.errors import HetjaxError
from hetjax.models.config import get_model_config
from hetjax.models.model import build_model, merge_states
from hetjax.parallel.exchange import PairPermuteTransport
from hetjax.parallel.pipeline import Pipeline
from hetjax.plan import Plan, Replica, Stage
from hetjax.optim import make_optimizer
from hetjax.train import train_step

STEPS = 3


def train_config():
  t = base.train_fields()
  t.update(steps=10, warmup_steps=2, lr=1e-2)
  return t


def batches(n, batch, seq=32):
  it = data_lib.BatchIterator(data_lib.load_corpus()[:200_000], batch, seq, seed=0)
  return [next(it) for _ in range(n)]


def reference(cfg, data):
  """Single-device training on the same batches: losses and final parameters."""
  graphdef, params = nnx.split(build_model(cfg, seed=0))
  opt = make_optimizer(train_config())
  opt_state = opt.init(params)
  losses = []
  for b in data:
    params, opt_state, m = train_step(graphdef, opt, params, opt_state, b)
    losses.append(float(m['loss']))
  return losses, jax.tree.map(np.asarray, params)


def uneven_plan(schedule):
  # Layers 1/2/3 on TP groups of 1/2/4 devices.
  return Plan([Replica([Stage(0, 1, [0]), Stage(1, 3, [1, 2]), Stage(3, 6, [4, 5, 6, 7])])],
              num_layers=6, schedule=schedule, micro_batches=4, micro_batch_size=2)


def assert_same_training(pipe, data, ref_losses, ref_params):
  losses = [pipe.step(b)['loss'] for b in data]
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  got = merge_states(pipe.stage_params())
  assert jax.tree.structure(got) == jax.tree.structure(ref_params)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize('name', ['tiny_gpt', 'tiny_llama'])
def test_uneven_tp_stages_match_single_device(name):
  cfg = get_model_config(name, num_layers=6)
  data = batches(STEPS, 8)
  ref_losses, ref_params = reference(cfg, data)
  for schedule in ('gpipe', '1f1b'):
    pipe = Pipeline(uneven_plan(schedule), cfg, train_config(), seed=0)
    assert [g.tp for g in pipe.groups] == [1, 2, 4]
    assert_same_training(pipe, data, ref_losses, ref_params)
  # The tied token table (GPT-2) stays identical in its two copies.
  if cfg.tie_embeddings:
    first, last = pipe.stage_params()[0], pipe.stage_params()[-1]
    np.testing.assert_array_equal(first['token_embed']['embedding'][...],
                                  last['token_embed']['embedding'][...])


@pytest.mark.slow
def test_data_parallel_replicas_with_pair_permute_transport():
  cfg = get_model_config('tiny_llama', num_layers=4)
  plan = Plan([Replica([Stage(0, 1, [0]), Stage(1, 4, [1, 2])]),
               Replica([Stage(0, 1, [3]), Stage(1, 4, [4, 5])])],
              num_layers=4, schedule='1f1b', micro_batches=2, micro_batch_size=2)
  data = batches(STEPS, 8)
  ref_losses, ref_params = reference(cfg, data)
  pipe = Pipeline(plan, cfg, train_config(), seed=0, transport=PairPermuteTransport())
  assert pipe.groups[1].dp == 2 and pipe.groups[1].tp == 2
  assert_same_training(pipe, data, ref_losses, ref_params)


def test_quantized_exchange_counts_fewer_bytes():
  cfg = get_model_config('tiny_gpt', num_layers=2)
  plan = Plan([Replica([Stage(0, 1, [0]), Stage(1, 2, [1])])], num_layers=2, micro_batches=2,
              micro_batch_size=2)
  data = batches(1, 4)
  fp32 = Pipeline(plan, cfg, train_config()).step(data[0])
  from hetjax.compression.codecs import make_codec
  int4 = Pipeline(plan, cfg, train_config(), codec=make_codec(4), grad_codec=make_codec(8)).step(data[0])
  # Activations [2, 32, 128] per micro-batch, both directions, 2 micro-batches; plus the tied table
  # both ways in fp32.
  act = 2 * 32 * 128
  table = 2 * 256 * 128 * 4
  assert fp32['bytes_sent'] == 2 * 2 * act * 4 + table
  scales = 128 * 2 * 2  # a bf16 scale and zero point per hidden channel (of 128) per micro-batch
  assert int4['bytes_sent'] == 2 * (act // 2 + scales + act + scales) + table
  assert abs(int4['loss'] - fp32['loss']) < 0.05  # the forward loss sees 4-bit activations


@pytest.mark.parametrize('stages, message', [
    ([Stage(0, 3, [0]), Stage(3, 6, [0, 1])], 'used twice'),
    ([Stage(0, 3, [0]), Stage(4, 6, [1])], 'must start at 3'),
    ([Stage(0, 3, [0]), Stage(3, 5, [1])], 'covers layers'),
    ([Stage(0, 3, [0]), Stage(3, 6, [1, 2, 3])], 'does not divide'),
    ([Stage(0, 3, [0]), Stage(3, 6, [9])], 'only 8 devices'),
])
def test_bad_plans_rejected_before_anything_starts(stages, message):
  cfg = get_model_config('tiny_gpt', num_layers=6)
  with pytest.raises(HetjaxError, match=message):
    Pipeline(Plan([Replica(stages)], num_layers=6), cfg, train_config())


def test_pipeline_checkpoint_resumes_tied_stages_on_their_own_devices(tmp_path):
  """A GPT-2 plan (token table on the first and last stage) saves and resumes per stage."""
  from hetjax.checkpoint.manager import Checkpointer
  from hetjax.parallel.trainer import PipelineTrainState
  cfg = get_model_config('tiny_gpt', num_layers=4)
  plan = Plan([Replica([Stage(0, 2, [0, 1]), Stage(2, 4, [4, 5])])], num_layers=4,
              micro_batches=2, micro_batch_size=2)
  data = batches(3, 4)

  def state():
    model = build_model(cfg, seed=0)
    it = data_lib.BatchIterator(data_lib.load_corpus()[:200_000], 4, 32, seed=0)
    return PipelineTrainState(Pipeline(plan, cfg, train_config(), init_state=nnx.state(model)),
                              model, it)

  a = state()
  a.train_step(data[0])
  a.step = 1
  ckpt = Checkpointer(str(tmp_path / 'ckpt'))
  a.save(ckpt)
  ckpt.close()
  b = state()
  b.restore(Checkpointer(str(tmp_path / 'ckpt'), read_only=True))
  for group, runner in zip(b.pipe.groups, b.pipe.runners):
    table = runner.params['token_embed']['embedding'][...]
    assert table.sharding.device_set == set(group.mesh.devices.flat)
  np.testing.assert_allclose(b.train_step(data[1])['loss'], a.train_step(data[1])['loss'], rtol=1e-6)


def test_a_non_finite_step_leaves_parameters_and_optimizer_state_unchanged():
  cfg = get_model_config('tiny_gpt')
  plan = Plan([Replica([Stage(0, 2, [0]), Stage(2, 4, [1])])], num_layers=4, micro_batches=2,
              micro_batch_size=2)
  pipe = Pipeline(plan, cfg, train_config())
  data = batches(2, 4)
  pipe.step(data[0])
  first = pipe.runners[0]
  first.params = jax.tree.map(lambda x: x * np.float32('nan'), first.params)  # poison stage 0
  before = [jax.tree.map(np.asarray, (r.params, r.opt_state)) for r in pipe.runners]
  metrics = pipe.step(data[1])
  assert not np.isfinite(metrics['loss'])
  after = [jax.tree.map(np.asarray, (r.params, r.opt_state)) for r in pipe.runners]
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    np.testing.assert_array_equal(a, b)
