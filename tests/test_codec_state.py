"""The exchange's codec-state hook: per-sample memory on both sides, kept bitwise identical."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hetjax.errors import HetjaxError
from hetjax.models.config import get_model_config
from hetjax.parallel.exchange import DevicePutTransport, Exchange, PairPermuteTransport
from hetjax.parallel.meshes import build_stage_groups, place
from hetjax.parallel.pipeline import Pipeline
from hetjax.plan import Plan, Replica, Stage
from tests.test_pipeline import batches, train_config


@dataclasses.dataclass(frozen=True)
class DeltaBF16:
  """A small stateful test codec: sends the change against the sample's memory m in bf16; both
  sides then set m <- m + wire, so their memories stay equal bit for bit. No memory yet: the
  piece travels in fp32 and becomes the memory."""
  stateful = True
  name = 'delta_bf16'

  def state_spec(self, piece_shape, dtype):
    return jax.ShapeDtypeStruct(piece_shape[1:], jnp.float32)

  def encode(self, x, state):
    if state is None:
      return x.astype(jnp.float32), x.astype(jnp.float32)
    wire = (x - state).astype(jnp.bfloat16)
    return wire, state + wire.astype(jnp.float32)

  def decode(self, wire, state, dtype=jnp.float32):
    new = wire.astype(jnp.float32) if state is None else state + wire.astype(jnp.float32)
    return new.astype(dtype), new


def two_stage_groups():
  plan = Plan([Replica([Stage(0, 2, [0]), Stage(2, 4, [1, 2])]),
               Replica([Stage(0, 2, [3]), Stage(2, 4, [4, 5])])], num_layers=4)
  return build_stage_groups(plan, get_model_config('tiny_gpt'))


@pytest.mark.parametrize('transport', [DevicePutTransport, PairPermuteTransport])
def test_sender_and_receiver_memories_stay_identical(transport):
  src, dst = two_stage_groups()
  ex = Exchange(transport(), DeltaBF16())
  rng = np.random.default_rng(0)
  shape = (4, 3, 8)  # 2 rows per replica
  sizes = []
  # Replica r gets rows 2r, 2r+1 (memory is per replica): [4, 5] are new to replica 0, [2, 3]
  # known to replica 1.
  for ids in ([0, 1, 2, 3], [0, 1, 2, 3], [4, 5, 2, 3], [4, 5, 2, 3]):
    x = rng.normal(size=shape).astype(np.float32)
    before = ex.bytes_sent
    got = ex.send(place(x, src.batch_sharding(3)), src, dst, shape, key=(0, 'fwd'), ids=ids)
    sizes.append(ex.bytes_sent - before)
    np.testing.assert_allclose(np.asarray(got), x, atol=0.05)
  for r in range(2):
    send, recv = ex.state((0, 'fwd'), r, 'send'), ex.state((0, 'fwd'), r, 'recv')
    assert send.rows.keys() == recv.rows.keys() and send.rows
    for i in send.rows:
      np.testing.assert_array_equal(np.asarray(send.rows[i]), np.asarray(recv.rows[i]))
  # A piece whose samples all have memory travels in bf16, half the fp32 bytes; the others in fp32.
  piece = 2 * 3 * 8
  assert sizes == [2 * piece * 4, 2 * piece * 2, piece * 4 + piece * 2, 2 * piece * 2]


def test_stateful_codec_needs_ids():
  src, dst = two_stage_groups()
  ex = Exchange(DevicePutTransport(), DeltaBF16())
  x = place(np.zeros((4, 3, 8), np.float32), src.batch_sharding(3))
  with pytest.raises(HetjaxError, match='sample ids'):
    ex.send(x, src, dst, (4, 3, 8))


def test_pipeline_training_through_a_stateful_codec():
  """Training passes each micro-batch's sample ids to the codec; repeated samples travel as
  deltas, and the loss stays close to fp32 training."""
  cfg = get_model_config('tiny_gpt')
  plan = Plan([Replica([Stage(0, 2, [0]), Stage(2, 4, [1])])], num_layers=4, micro_batches=2,
              micro_batch_size=2)
  data = batches(4, 4)
  for k, b in enumerate(data):
    b['ids'] = np.arange(4) + 4 * (k % 2)   # steps 2 and 3 revisit the samples of steps 0 and 1
  plain = Pipeline(plan, cfg, train_config())
  delta = Pipeline(plan, cfg, train_config(), codec=DeltaBF16())
  want = [plain.step(b) for b in data]
  got = [delta.step(b) for b in data]
  full = 4 * 32 * cfg.hidden * 4  # one step's forward activations in fp32
  saved = [w['bytes_sent'] - g['bytes_sent'] for w, g in zip(want, got)]
  assert saved == [0, 0, full // 2, full // 2]  # first visits in fp32, revisits as bf16 deltas
  np.testing.assert_allclose([m['loss'] for m in got], [m['loss'] for m in want], rtol=2e-3)
