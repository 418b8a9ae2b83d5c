"""One runtime loop for every workload: walk a global op order, compute the ops of the stages this
process owns through a workload handler, and move each message between stages through an exchange
right after the op that produced it.

A message is the output of an op that an op of another stage depends on (schedules.py). The
handler says what it is (`Message`: channel, shape, dtype, codec-state key, sample ids), so the
receiving process knows it without seeing the data; the channel picks the exchange (and so the
codec): e.g. 'act' forward, 'grad' backward, 'token' for sampled ids.

A handler has two methods:
- `compute(op, received) -> output`: run `op` on its stage (`received`: dependency id -> array);
- `message(op, consumer) -> Message`: what `op` sends to `consumer`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from hetjax import distributed
from hetjax.parallel.exchange import Exchange, resolve
from hetjax.parallel.meshes import StageGroup
from hetjax.parallel.schedules import Op


@dataclasses.dataclass(frozen=True)
class Message:
  channel: str                 # which exchange carries it
  shape: tuple
  dtype: object = jnp.float32
  batch_sharded: bool = True   # rows split over the receiving stage's replicas
  key: object = None           # codec-state key (boundary, direction)
  ids: object = None           # sample ids of the rows, for codecs with per-sample state
  next_ids: object = None      # ids of the next message with this key (its state is prefetched)


def consumers(order: list[Op]) -> dict:
  """Producer op id -> the ops of other stages that depend on it."""
  out: dict = {}
  for op in order:
    for dep in op.deps:
      if dep[1] != op.stage:
        out.setdefault(dep, []).append(op)
  return out


class Runtime:

  def __init__(self, groups: list[StageGroup], exchanges: dict[str, Exchange]):
    self.groups, self.exchanges = groups, exchanges

  def run(self, order: list[Op], handler, profile: bool = False, clock_start: float | None = None):
    """Execute `order`. A received message is waited for only when the op that needs it runs (an
    asynchronous transport's message may still be on the wire until then). With `profile`, each
    op is waited for (which serialises a process's ops) and a timeline of this process's ops,
    {kind, stage, micro, step, tick, start_s, compute_end_s, end_s, wait_s, process}, is returned
    (wait_s: waiting for received messages, before start_s); otherwise an empty list."""
    t_start = time.perf_counter() if clock_start is None else clock_start
    sends_to = consumers(order)
    inbox: dict = {}
    events = []
    for op in order:
      group = self.groups[op.stage]
      t_wait = time.perf_counter()
      received = {d: resolve(inbox.pop((d, op.id))) for d in op.deps if (d, op.id) in inbox}
      t0 = time.perf_counter()
      out = handler.compute(op, received) if group.is_local else None
      if profile:
        jax.block_until_ready(out)
      t1 = time.perf_counter()
      for consumer in sends_to.get(op.id, ()):
        msg = handler.message(op, consumer)
        got = self.exchanges[msg.channel].send(out, group, self.groups[consumer.stage], msg.shape,
                                               msg.dtype, msg.batch_sharded, msg.key, msg.ids,
                                               msg.next_ids, lazy=True)
        if got is not None:
          inbox[(op.id, consumer.id)] = got
      if profile and group.is_local:  # only ops this process runs: others would time nothing
        events.append({'kind': op.kind, 'stage': op.stage, 'micro': op.micro, 'step': op.step,
                       'tick': op.tick, 'start_s': t0 - t_start, 'compute_end_s': t1 - t_start,
                       'end_s': time.perf_counter() - t_start, 'wait_s': t0 - t_wait,
                       'process': jax.process_index()})
    return events

  def bytes_sent(self) -> int:
    return sum(e.bytes_sent for e in set(self.exchanges.values()))


def gather_events(events: list[dict], name: str) -> list[dict]:
  """Every process's profiled events (runtime.run) on every process, in process order; `name`
  unique per use. Each process times from its own step start; steps start together (the previous
  step ends with a sum over processes)."""
  if jax.process_count() == 1:
    return events
  return [e for text in distributed.gather_text(name, json.dumps(events)) for e in json.loads(text)]


@functools.lru_cache(maxsize=1)
def _process_sum():
  """A mesh of each process's first device, and a jitted sum over it."""
  firsts = {}
  for d in jax.devices():
    firsts.setdefault(d.process_index, d)
  mesh = Mesh(np.array([firsts[i] for i in sorted(firsts)]), ('proc',))
  total = jax.jit(jax.shard_map(lambda x: jax.lax.psum(x, 'proc'), mesh=mesh, in_specs=P('proc'),
                                out_specs=P()))
  return mesh, total


def sum_over_processes(values: np.ndarray) -> np.ndarray:
  """Sum a small host vector over processes (which may own different numbers of devices)."""
  if jax.process_count() == 1:
    return values
  mesh, total = _process_sum()
  mine = jax.device_put(np.asarray(values, np.float32)[None], jax.local_devices()[0])
  arr = jax.make_array_from_single_device_arrays(
      (jax.process_count(), len(values)), NamedSharding(mesh, P('proc')), [mine])
  return np.asarray(total(arr).addressable_shards[0].data)[0]
