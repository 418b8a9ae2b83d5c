"""EMULATION ONLY: per-link one-way latency added in user space around a real transport.

The kernel here has no netem, so the launcher's --emulate cannot delay packets. Instead the
receiving side of each transfer sees the data the link's one-way delay after it arrived: once per
`move` (one message, however many leaves its pytree has), never once per leaf. With an
asynchronous transport (a Deferred message) the delay runs from the arrival, alongside whatever
the receiver computes meanwhile, as a delayed packet would; a blocking transport sleeps it after
the transfer. Bandwidth stays
shaped by tc tbf in the kernel. The delays come from the cluster's delay matrix between processes,
which the launcher exports as HETJAX_LINK_DELAY_MS (a JSON matrix, ms, indexed by process).
"""

from __future__ import annotations

import json
import os
import time
from typing import Callable

import jax
import numpy as np

from hetjax.errors import HetjaxError
from hetjax.parallel.exchange import Deferred

ENV = 'HETJAX_LINK_DELAY_MS'


class EmulatedLatencyTransport:
  """Wraps a transport with `.move(wire, wire_shape, src, dst)`; `delay_s(src, dst)` is the
  emulated one-way delay in seconds between two devices."""

  def __init__(self, inner, delay_s, sleep=time.sleep):
    self.inner, self.delay_s, self.sleep = inner, delay_s, sleep
    self.name = f'{inner.name}+emulated_latency'
    self.waited_s = 0.0  # total emulated delay this process waited

  def move(self, wire, wire_shape, src, dst):
    got = self.inner.move(wire, wire_shape, src, dst)
    if dst.process_index != jax.process_index() or got is None:
      return got
    wait = self.delay_s(src, dst)
    if wait <= 0:
      return got
    if isinstance(got, Deferred):  # asynchronous: the data is usable one delay after it arrived
      return Deferred(lambda: self._after_delay(got, wait))
    self.sleep(wait)  # blocking transport: the receiver sees the data one delay later
    self.waited_s += wait
    return got

  def _after_delay(self, got: Deferred, wait: float):
    value = got.result()
    arrived = got.arrived_s if got.arrived_s is not None else time.perf_counter()
    left = arrived + wait - time.perf_counter()
    if left > 0:
      self.sleep(left)
      self.waited_s += left
    return value


def process_delays(matrix_ms) -> Callable:
  """delay_s(src, dst) from a per-process matrix of one-way delays in ms."""
  m = np.asarray(matrix_ms, float)
  if m.ndim != 2 or m.shape[0] != m.shape[1] or not np.all(np.isfinite(m)) or np.any(m < 0):
    raise HetjaxError(f'{ENV} must be a square matrix of non-negative delays in ms')
  return lambda src, dst: float(m[src.process_index, dst.process_index]) / 1000.0


def from_environment(transport, say=print):
  """The transport wrapped with the launcher's emulated delays, or unchanged without --emulate."""
  raw = os.environ.get(ENV)
  if not raw:
    return transport
  try:
    matrix = json.loads(raw)
  except json.JSONDecodeError:
    raise HetjaxError(f'{ENV} is not JSON: {raw[:60]!r}') from None
  delays = process_delays(matrix)
  if len(matrix) < jax.process_count():
    raise HetjaxError(f'{ENV} covers {len(matrix)} processes but {jax.process_count()} are running')
  say(f'EMULATED latency (user space, not the kernel): the receiver of each transfer waits the '
      f'one-way delay {np.asarray(matrix).tolist()} ms')
  return EmulatedLatencyTransport(transport, delays)


def with_environment(make_transport, say=print):
  """A transport factory whose transports are wrapped by `from_environment`."""
  return lambda: from_environment(make_transport(), say)
