"""Generation over serve plans on the one runtime equals single-device generation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hetjax.errors import HetjaxError
from hetjax.inference.engine import ServeEngine
from hetjax.inference.generate import generate
from hetjax.models.config import get_model_config
from hetjax.models.model import build_model
from hetjax.plan import Plan, Replica, Stage


def lively_model(name):
  """A random model whose weights are scaled up, so greedy outputs depend on the context (at the
  default init, every row repeats one token and a broken cache would go unnoticed)."""
  cfg = get_model_config(name)
  model = build_model(cfg, seed=0)
  graphdef, state = nnx.split(model)
  state = jax.tree.map(lambda x: x * 4.0 if x.ndim == 2 else x, state)
  return cfg, nnx.merge(graphdef, state)


def serve_plan(*replicas):
  return Plan([Replica([Stage(a, b, devs) for a, b, devs in r]) for r in replicas], num_layers=4,
              kind='serve')


PLANS = {
    # Two replicas of different shapes: [0:1] TP 2 -> [1:4] TP 1, and [0:2] TP 4 -> [2:4] TP 1.
    'two_replicas': serve_plan([(0, 1, [0, 1]), (1, 4, [2])], [(0, 2, [3, 4, 5, 6]), (2, 4, [7])]),
    # One replica, TP 4 -> 2 -> 1 over uneven layers.
    'tp_4_2_1': serve_plan([(0, 1, [0, 1, 2, 3]), (1, 2, [4, 5]), (2, 4, [6])]),
    # Four stages; one device for the whole model.
    'four_stages': serve_plan([(0, 1, [0]), (1, 2, [1]), (2, 3, [2, 3]), (3, 4, [4])]),
    'one_device': serve_plan([(0, 4, [5])]),
}


@pytest.mark.parametrize('name, plan', [('tiny_gpt', 'four_stages'), ('tiny_gpt', 'two_replicas'),
                                        ('tiny_llama', 'tp_4_2_1'), ('tiny_llama', 'two_replicas')])
def test_greedy_ids_equal_single_device(name, plan):
  cfg, model = lively_model(name)
  prompts = np.random.default_rng(1).integers(0, cfg.vocab_size, (5, 7)).astype(np.int32)
  want = generate(model, prompts, 6)
  assert len({tuple(r) for r in want}) > 1 and any(len(set(r)) > 1 for r in want)  # not degenerate
  engine = ServeEngine(PLANS[plan], cfg, nnx.state(model))
  np.testing.assert_array_equal(engine.generate(prompts, 6), want)


def test_prompts_of_different_lengths_equal_each_served_alone():
  cfg, model = lively_model('tiny_llama')
  rng = np.random.default_rng(2)
  prompts = [rng.integers(0, cfg.vocab_size, n).astype(np.int32) for n in (3, 9, 5, 1)]
  engine = ServeEngine(PLANS['two_replicas'], cfg, nnx.state(model))
  got = engine.generate(prompts, 5)
  for p, row in zip(prompts, got):
    np.testing.assert_array_equal(row, generate(model, p[None], 5)[0])


def test_pipelined_decode_keeps_every_stage_busy():
  cfg, model = lively_model('tiny_gpt')
  engine = ServeEngine(PLANS['four_stages'], cfg, nnx.state(model))
  batches = [[engine_batch(np.full((1, 4), g + 1)) for g in range(4)]]
  tokens, events = engine.run(batches, 5, profile=True)
  assert len(tokens[0]) == 4 and tokens[0][0].shape == (1, 5)
  ticks = {}
  for e in events:
    ticks.setdefault(e['tick'], set()).add(e['stage'])
  # After the fill (3 ticks) and before the drain, all 4 stages run in every tick.
  steady = [t for t in sorted(ticks) if 3 <= t < max(ticks) - 2]
  assert steady and all(ticks[t] == {0, 1, 2, 3} for t in steady)


def engine_batch(prompts):
  from hetjax.inference.engine import pad_prompts
  return pad_prompts(list(np.asarray(prompts, np.int32)))


def test_bad_inputs():
  cfg, model = lively_model('tiny_gpt')
  engine = ServeEngine(PLANS['one_device'], cfg, nnx.state(model))
  with pytest.raises(HetjaxError, match='max length'):
    engine.generate(np.zeros((1, 250), np.int32), 10)
  with pytest.raises(HetjaxError, match='token ids'):
    engine.generate(np.full((1, 3), 300), 2)
  with pytest.raises(HetjaxError, match='layers'):
    ServeEngine(serve_plan([(0, 6, [0])]), cfg, nnx.state(model))
  llama = get_model_config('tiny_llama')  # 4 KV heads
  with pytest.raises(HetjaxError, match='does not divide'):
    ServeEngine(Plan([Replica([Stage(0, 4, [0, 1, 2])])], num_layers=4, kind='serve'), llama,
                nnx.state(build_model(llama)))


@pytest.mark.parametrize('codec, bound', [('fp32', 1e-4), ('bf16', 0.05), (8, 0.05)])
def test_quantized_exchange_keeps_logits_within_a_bound(codec, bound):
  """Activations between stages through a lossy codec: the head's logits stay within `bound` (max
  abs difference, logits of std ~ 1 here) of single-device logits; fp32 is exact to rounding."""
  from hetjax.compression.codecs import make_codec
  from hetjax.inference.engine import pad_prompts
  cfg, model = lively_model('tiny_llama')
  prompts = np.random.default_rng(4).integers(0, cfg.vocab_size, (3, 6)).astype(np.int32)
  want = np.asarray(model(jnp.asarray(prompts))[0][:, -1])
  engine = ServeEngine(PLANS['tp_4_2_1'], cfg, nnx.state(model), codec=make_codec(codec))
  got = engine.prefill_logits([[pad_prompts(list(prompts))]])[(0, 0)]
  err = np.abs(got - want).max()
  assert err <= bound * max(1.0, np.abs(want).std()), (codec, err)
  if codec != 'fp32':
    assert err > 0  # the codec really is in the path
