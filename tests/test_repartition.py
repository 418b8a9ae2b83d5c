"""A checkpoint written under one stage plan restores under any other, optimizer state included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import base
from hetjax.checkpoint.manager import Checkpointer, StageSpec
from hetjax.checkpoint.repartition import flatten, repartition
from hetjax.models.config import get_model_config
from hetjax.models.model import build_model, build_stages, split_state
from hetjax.optim import make_optimizer

MCFG = get_model_config('tiny_gpt', num_layers=12, hidden=16, num_heads=2, num_kv_heads=2,
                        max_len=32)


def _stage_template(stage, optimizer):
  params = nnx.state(stage, nnx.Param)
  return {'params': params, 'opt_state': optimizer.init(params)}


@pytest.fixture(scope='module')
def trained():
  """The full model with an AdamW state whose moments are random (as after training) and whose
  step count is 7: re-partitioning only moves tensors, so their values just need to differ."""
  tcfg = base.train_fields()
  tcfg.update(steps=10, warmup_steps=1)
  optimizer = make_optimizer(tcfg)
  graphdef, params = nnx.split(build_model(MCFG, seed=0))
  rng = np.random.default_rng(0)
  opt_state = jax.tree.map(
      lambda x: (jnp.asarray(rng.standard_normal(x.shape), x.dtype)
                 if jnp.issubdtype(x.dtype, jnp.floating) else jnp.full_like(x, 7)),
      optimizer.init(params))
  return graphdef, optimizer, {'params': params, 'opt_state': opt_state}


def _assert_same(got, want):
  got, want = flatten(got), flatten(want)
  assert got.keys() == want.keys()
  for name in want:
    np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want[name]), err_msg=name)


@pytest.mark.parametrize('new_plan', [[0, 3, 8, 12], [0, 12], [0, 1, 2, 11, 12]])
def test_restore_under_another_plan(trained, tmp_path, new_plan):
  graphdef, optimizer, full = trained
  old = build_stages(MCFG, [0, 5, 12])
  # The old run's per-stage states: parameters cut with split_state, the rest by name.
  old_states = repartition([full], [_stage_template(s, optimizer) for s in old])
  for state, params in zip(old_states, split_state(full['params'], old)):
    _assert_same(state['params'], params)
  ckpt = Checkpointer(str(tmp_path))
  ckpt.save(2, [(StageSpec.of(s), state) for s, state in zip(old, old_states)], {})
  ckpt.close()

  new = build_stages(MCFG, new_plan, seed=99)  # different random weights, to be overwritten
  ckpt = Checkpointer(str(tmp_path), read_only=True)
  restored, _ = ckpt.restore([_stage_template(s, optimizer) for s in new])
  for stage, state, params in zip(new, restored, split_state(full['params'], new)):
    _assert_same(state['params'], params)
    want_opt = repartition([full], [{'opt_state': _stage_template(stage, optimizer)['opt_state']}])[0]
    _assert_same({'opt_state': state['opt_state']}, want_opt)
    assert int(jax.tree.leaves(state['opt_state'])[0]) == 7  # optax's step count
    nnx.update(stage, jax.tree.map(jnp.asarray, state['params']))

  # The restored stages, run in order, are the trained full model.
  ids = jnp.asarray(np.random.default_rng(1).integers(0, 256, size=(2, 8)), jnp.int32)
  x = ids
  for stage in new:
    x, _ = stage(x)
  np.testing.assert_allclose(np.asarray(x), np.asarray(nnx.merge(graphdef, full['params'])(ids)[0]),
                             atol=1e-5)


def test_one_stage_reads_only_its_tensors(trained, tmp_path):
  _, optimizer, full = trained
  old = build_stages(MCFG, [0, 5, 12])
  ckpt = Checkpointer(str(tmp_path))
  ckpt.save(2, [(StageSpec.of(s), st) for s, st in
                zip(old, repartition([full], [_stage_template(s, optimizer) for s in old]))], {})
  ckpt.close()
  middle = build_stages(MCFG, [0, 3, 8, 12])[1]
  ckpt = Checkpointer(str(tmp_path), read_only=True)
  (state,), _ = ckpt.restore([_stage_template(middle, optimizer)], whole_model=False)
  _assert_same(state['params'], split_state(full['params'], [middle])[0])
  with pytest.raises(Exception, match='has no place in the model'):
    ckpt.restore([_stage_template(middle, optimizer)])
