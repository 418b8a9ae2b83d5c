"""Heterogeneous data-parallel replicas (other layer splits, TP degrees, weights) train exactly as
one device does: losses, gradient norms (so the clip) and every replica's parameters."""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from hetjax.errors import HetjaxError
from hetjax.models.config import get_model_config
from hetjax.models.model import build_model, merge_states
from hetjax.optim import make_optimizer
from hetjax.parallel.replicas import HeteroReplicas
from hetjax.plan import Plan, Replica, Stage
from hetjax.train import train_step
from tests.test_pipeline import batches, train_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3


def reference(cfg, data):
  """Single-device training: losses, gradient norms and final parameters."""
  graphdef, params = nnx.split(build_model(cfg, seed=0))
  opt = make_optimizer(train_config())
  opt_state = opt.init(params)
  losses, norms = [], []
  for b in data:
    params, opt_state, m = train_step(graphdef, opt, params, opt_state, b)
    losses.append(float(m['loss']))
    norms.append(float(m['grad_norm']))
  return losses, norms, jax.tree.map(np.asarray, params)


def assert_same_training(pipe, data, ref):
  ref_losses, ref_norms, ref_params = ref
  metrics = [pipe.step(b) for b in data]
  np.testing.assert_allclose([m['loss'] for m in metrics], ref_losses, rtol=1e-5)
  np.testing.assert_allclose([m['grad_norm'] for m in metrics], ref_norms, rtol=1e-4)
  assert ref_norms[0] > train_config().clip_norm  # the clip is exercised
  for replica in pipe.replicas:  # every replica's copy, not only the one checkpoints see
    got = merge_states(replica.stage_params())
    assert jax.tree.structure(got) == jax.tree.structure(ref_params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref_params)):
      np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)


def two_shapes_plan(**kw):
  # Replica 0: layer 0 on one device, layers 1-3 on a TP pair; replica 1: layers 0-2 on a TP pair,
  # layer 3 on one device.
  return Plan([Replica([Stage(0, 1, [0]), Stage(1, 4, [1, 2])]),
               Replica([Stage(0, 3, [3, 4]), Stage(3, 4, [5])])],
              num_layers=4, schedule='1f1b', micro_batches=2, micro_batch_size=2, **kw)


@pytest.mark.slow
def test_replicas_with_other_splits_and_tp_match_single_device():
  """Equal micro-batch counts; GPT-2's tied table lives on both ends of each replica."""
  cfg = get_model_config('tiny_gpt', num_layers=4)
  data = batches(STEPS + 1, 8)
  pipe = HeteroReplicas(two_shapes_plan(), cfg, train_config(), seed=0)
  assert pipe.micro == [2, 2]
  assert [[g.tp for g in r.groups] for r in pipe.replicas] == [[1, 2], [2, 1]]
  assert_same_training(pipe, data[:STEPS], reference(cfg, data[:STEPS]))
  for replica in pipe.replicas:
    first, last = replica.stage_params()[0], replica.stage_params()[-1]
    np.testing.assert_array_equal(first['token_embed']['embedding'][...],
                                  last['token_embed']['embedding'][...])

  # A non-finite gradient in one replica skips the step on every replica.
  poisoned = pipe.replicas[1].runners[0]
  poisoned.params = jax.tree.map(lambda x: x * np.float32('nan'), poisoned.params)
  state = lambda: [jax.tree.map(np.asarray, (r.params, r.opt_state))
                   for p in pipe.replicas for r in p.runners]
  before = state()
  assert not np.isfinite(pipe.step(data[STEPS])['loss'])
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state())):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_weighted_replicas_take_shares_of_the_batch_and_match_single_device():
  """Weights 3:1: replica 0 runs 3 micro-batches over three stages, replica 1 one micro-batch on
  one TP-4 stage; the gradient is still the whole batch's mean."""
  cfg = get_model_config('tiny_llama', num_layers=4)
  plan = Plan([Replica([Stage(0, 1, [0]), Stage(1, 2, [1, 2]), Stage(2, 4, [3])], weight=3),
               Replica([Stage(0, 4, [4, 5, 6, 7])], weight=1)],
              num_layers=4, schedule='gpipe', micro_batches=2, micro_batch_size=2)
  data = batches(STEPS, 8)
  pipe = HeteroReplicas(plan, cfg, train_config(), seed=0)
  assert pipe.micro == [3, 1]
  assert_same_training(pipe, data, reference(cfg, data))
  assert 0.5 < pipe.evaluate(data[0]) < 10


@pytest.mark.parametrize('weights, batch_args, message', [
    ((2, 1), dict(micro_batches=1, micro_batch_size=1), 'into 1.33333 + 0.666667, not into whole'),
    ((3, 1), dict(micro_batches=1, micro_batch_size=2), 'micro-batches of 2 sequences'),
])
def test_weights_must_split_the_batch_into_whole_micro_batches(weights, batch_args, message):
  plan = Plan([Replica([Stage(0, 4, [0])], weight=weights[0]),
               Replica([Stage(0, 2, [1]), Stage(2, 4, [2])], weight=weights[1])],
              num_layers=4, **batch_args)
  with pytest.raises(HetjaxError, match=re.escape(message)):
    plan.validate()


def test_symmetric_pipeline_refuses_heterogeneous_replicas():
  from hetjax.parallel.meshes import build_stage_groups
  with pytest.raises(HetjaxError, match='run through HeteroReplicas'):
    build_stage_groups(two_shapes_plan(), get_model_config('tiny_gpt', num_layers=4))


def _run(tmp_path, plan, *args):
  plan.save(str(tmp_path / 'plan.json'))
  cmd = [sys.executable, 'run.py', '--config=configs/train.py', f'--config.workdir={tmp_path / "w"}',
         f'--config.pipeline.plan={tmp_path / "plan.json"}', '--config.model=tiny_gpt',
         '--config.model_overrides.num_layers=4', '--config.train.seq_len=32',
         '--config.train.eval_every=0', '--config.train.log_every=1', *args]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_run_refuses_weights_that_do_not_split_the_batch(tmp_path):
  plan = two_shapes_plan()
  plan.replicas[0].weight = 2
  r = _run(tmp_path, plan, '--config.train.steps=1', '--config.train.batch_size=8')
  assert r.returncode == 2, r.stderr
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: invalid plan: replica weights 2:1'), r.stderr


@pytest.mark.slow
def test_run_trains_a_heterogeneous_plan(tmp_path):
  plan = two_shapes_plan()
  plan.replicas[0].weight = 3
  r = _run(tmp_path, plan, '--config.train.steps=2', '--config.train.batch_size=8')
  assert r.returncode == 0, r.stderr
  assert 'M=3+1x2' in r.stdout  # the plan table shows each replica's micro-batches
  records = [json.loads(l) for l in open(tmp_path / 'w' / 'metrics.jsonl')]
  losses = [x['loss'] for x in records if 'loss' in x]
  assert len(losses) == 2 and all(np.isfinite(losses))


@pytest.mark.slow
def test_checkpoint_of_heterogeneous_replicas_resumes_every_replica(tmp_path):
  """Saved from replica 0's stages, restored into each replica's own stages: the next step matches."""
  from hetjax import data as data_lib
  from hetjax.checkpoint.manager import Checkpointer
  from hetjax.parallel.replicas import HeteroTrainState, make_pipeline, train_state
  cfg = get_model_config('tiny_gpt', num_layers=4)
  data = batches(2, 8)

  def state():
    model = build_model(cfg, seed=0)
    it = data_lib.BatchIterator(data_lib.load_corpus()[:200_000], 8, 32, seed=0)
    return train_state(make_pipeline(two_shapes_plan(), cfg, train_config(),
                                     init_state=nnx.state(model)), model, it)

  a = state()
  assert isinstance(a, HeteroTrainState)
  a.train_step(data[0])
  a.step = 1
  ckpt = Checkpointer(str(tmp_path / 'ckpt'))
  a.save(ckpt)
  ckpt.close()
  b = state()
  b.restore(Checkpointer(str(tmp_path / 'ckpt'), read_only=True))
  assert b.step == 1
  for pa, pb in zip(a.pipe.replicas, b.pipe.replicas):
    for x, y in zip(jax.tree.leaves(merge_states(pa.stage_params())),
                    jax.tree.leaves(merge_states(pb.stage_params()))):
      np.testing.assert_array_equal(x, y)
  np.testing.assert_allclose(b.train_step(data[1])['loss'], a.train_step(data[1])['loss'], rtol=1e-6)
  for pa, pb in zip(a.pipe.replicas, b.pipe.replicas):  # the optimizer state came back too
    for x, y in zip(jax.tree.leaves(merge_states(pa.stage_params())),
                    jax.tree.leaves(merge_states(pb.stage_params()))):
      np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
