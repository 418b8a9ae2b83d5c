"""Moving tensors between stage groups, through a codec, with byte counting.

One replica at a time: replica r's slice leaves the sending stage's leader device r, is encoded
there, crosses to the receiving stage's leader device r, is decoded, then copied to the rest of that
replica's TP group. Two transports move the encoded pytree between the two leader devices:
- `DevicePutTransport`: one process sees all devices (`jax.device_put`);
- `PairPermuteTransport`: multi-controller; a jitted `ppermute` inside `shard_map` over a two-device
  "pair mesh", called only by the two processes that own the devices. It works within one process
  too, which is how the tests check it without spawning processes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from hetjax.compression.codecs import tree_nbytes
from hetjax.errors import HetjaxError
from hetjax.parallel.meshes import StageGroup
from hetjax.parallel.state import SampleState


class Deferred:
  """A value that arrives later (a message still on the wire): `result()` waits for it, once.
  `arrived_s` (perf_counter) is when its data arrived, where the transport knows it."""

  def __init__(self, make):
    self._make, self._value, self.arrived_s = make, None, None

  def result(self):
    if self._make is not None:
      self._value, self._make = self._make(), None
    return self._value


def resolve(x):
  """x's value: waits for a Deferred, returns anything else as it is."""
  return x.result() if isinstance(x, Deferred) else x


def _mine(device) -> bool:
  return device.process_index == jax.process_index()


class DevicePutTransport:
  name = 'device_put'

  def move(self, wire, wire_shape, src: jax.Device, dst: jax.Device):
    return jax.device_put(wire, dst)


@functools.lru_cache(maxsize=None)
def _pair_permute(src: jax.Device, dst: jax.Device):
  mesh = Mesh(np.array([src, dst]), ('pair',))
  permute = jax.shard_map(lambda x: jax.lax.ppermute(x, 'pair', [(0, 1)]), mesh=mesh,
                          in_specs=P('pair'), out_specs=P('pair'))
  return mesh, jax.jit(permute)


class PairPermuteTransport:
  name = 'pair_ppermute'

  def move(self, wire, wire_shape, src: jax.Device, dst: jax.Device):
    """`wire` is the pytree on `src` (None on a process that does not own src); `wire_shape` is its
    jax.ShapeDtypeStruct tree, known to both sides. Returns the pytree on `dst` (None elsewhere)."""
    if not (_mine(src) or _mine(dst)):
      return None  # only the two owners take part
    mesh, permute = _pair_permute(src, dst)
    sharding = NamedSharding(mesh, P('pair'))

    def one(x, spec):
      local = []
      if _mine(src):
        local.append(jax.device_put(x[None], src))
      if _mine(dst):
        local.append(jax.device_put(jnp.zeros((1, *spec.shape), spec.dtype), dst))
      out = permute(jax.make_array_from_single_device_arrays((2, *spec.shape), sharding, local,
                                                            dtype=spec.dtype))
      # Wait for it: collectives between processes must complete in the one global order, or
      # asynchronously dispatched transfers can meet out of order and deadlock.
      out.block_until_ready()
      if not _mine(dst):
        return None
      return next(s.data for s in out.addressable_shards if s.device == dst)[0]

    src_leaves = jax.tree.leaves(wire) if _mine(src) else [None] * len(jax.tree.leaves(wire_shape))
    leaves = [one(x, s) for x, s in zip(src_leaves, jax.tree.leaves(wire_shape))]
    return jax.tree.unflatten(jax.tree.structure(wire_shape), leaves) if _mine(dst) else None


@functools.lru_cache(maxsize=None)
def _coders(codec):
  return jax.jit(codec.encode), jax.jit(codec.decode, static_argnames='dtype')


def _state_batch_spec(codec, piece_shape, dtype):
  """Shapes of a stateful codec's state for one piece (its rows stacked), or None."""
  one = codec.state_spec(piece_shape, dtype)
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct((piece_shape[0], *a.shape), a.dtype), one)


@functools.lru_cache(maxsize=None)
def _wire_shape(codec, piece_shape, dtype, with_state=False):
  """Shapes and dtypes of the encoded pytree: what the receiver expects."""
  state = _state_batch_spec(codec, piece_shape, dtype) if with_state else None
  return jax.eval_shape(lambda a, s: codec.encode(a, s)[0], jax.ShapeDtypeStruct(piece_shape, dtype),
                        state)


class Exchange:
  """Sends stage outputs forward and activation gradients backward through a codec.

  A stateful codec (`codec.stateful`) keeps per-sample memory, keyed by the message's `key` (e.g.
  (boundary, direction)), the replica and the side: the sender's copy lives where the sender runs,
  the receiver's where the receiver runs, and both are updated identically. `ids` name the samples
  of the message's rows; a row with no memory yet makes the whole piece travel uncompressed (the
  codec is called with state None) and fills the memory on both sides."""

  def __init__(self, transport, codec, new_state=SampleState):
    self.transport, self.codec = transport, codec
    self.stateful = bool(getattr(codec, 'stateful', False))
    self.new_state = new_state
    self.states: dict = {}   # (key, replica, 'send' | 'recv') -> SampleState
    self.bytes_sent = 0  # by this process

  def state(self, key, replica: int, side: str):
    k = (key, replica, side)
    if k not in self.states:
      self.states[k] = self.new_state()
    return self.states[k]

  @staticmethod
  def _update(state, ids, new, next_ids) -> None:
    """Store the new rows, then start reading the next message's rows (where the state can)."""
    state.scatter(ids, new)
    if next_ids is not None and hasattr(state, 'prefetch'):
      state.prefetch(next_ids)

  def send(self, x, src: StageGroup, dst: StageGroup, shape, dtype=jnp.float32,
           batch_sharded: bool = True, key=None, ids=None, next_ids=None, lazy: bool = False):
    """Move global array `x` of `shape` (on src's mesh; None on processes without src devices) to
    dst's mesh. Batch-sharded arrays travel as one slice per replica; replicated ones travel whole
    to every replica. Returns the array on dst's mesh where this process owns dst devices (with
    `lazy` and a stateless codec, a Deferred of it: decoding waits until the consumer needs it, so
    an asynchronous transport's message can still be on the wire).
    `next_ids`: the samples of the next message with this key; each side that keeps state starts
    reading their rows now (a state with `prefetch`), overlapped with the compute in between."""
    encode, decode = _coders(self.codec)
    dp = dst.dp
    rows = shape[0] // dp if batch_sharded else shape[0]
    piece_shape = (rows, *shape[1:])
    if self.stateful and ids is None:
      raise HetjaxError(f'codec {self.codec.name} keeps per-sample state: its messages need sample ids')
    arriving = []  # (replica, what the transport returned, receiver's state rows, ids, next ids)
    for r in range(dp):
      s_dev, d_dev = src.leader(r), dst.leader(r)
      piece_ids = None if ids is None else np.asarray(ids)[r * rows:(r + 1) * rows]
      next_piece = None if next_ids is None else np.asarray(next_ids)[r * rows:(r + 1) * rows]
      send_state = recv_state = None
      if self.stateful:  # each side reads its own memory; the two hold the same rows
        if _mine(s_dev):
          send_state = self.state(key, r, 'send').gather(piece_ids)
        if _mine(d_dev):
          recv_state = self.state(key, r, 'recv').gather(piece_ids)
      with_state = (send_state if _mine(s_dev) else recv_state) is not None
      wire_shape = _wire_shape(self.codec, piece_shape, jnp.dtype(dtype), with_state)
      wire = None
      if _mine(s_dev):
        piece = next(p.data for p in x.addressable_shards if p.device == s_dev)
        wire, new = encode(piece, send_state)
        if self.stateful:
          self._update(self.state(key, r, 'send'), piece_ids, new, next_piece)
        self.bytes_sent += tree_nbytes(wire)
      got = self.transport.move(wire, wire_shape, s_dev, d_dev)
      if got is not None:
        arriving.append((r, got, recv_state, piece_ids, next_piece))
    if not dst.is_local:
      return None

    def receive():
      pieces = {}
      for r, got, recv_state, piece_ids, next_piece in arriving:
        pieces[r], new = decode(resolve(got), recv_state, dtype=dtype)
        if self.stateful:
          self._update(self.state(key, r, 'recv'), piece_ids, new, next_piece)
      sharding = dst.batch_sharding(len(shape)) if batch_sharded else dst.replicated
      local = [jax.device_put(pieces[r], d) for r in range(dp) for d in dst.replica_devices(r)
               if _mine(d)]
      return jax.make_array_from_single_device_arrays(tuple(shape), sharding, local)

    # A stateful codec's receiver decodes at once: its memory rows were read above, and the update
    # must start the next message's prefetch before that message's rows are read.
    return Deferred(receive) if lazy and not self.stateful else receive()
