"""Asynchronous point-to-point transfers between processes: host-staged, over TCP.

The pair-ppermute transport is a collective: sender and receiver meet at each transfer, so a
transfer waits for the busier of the two and blocks both; sends never overlap compute. Here the
sender hands the message to a background thread (which copies it to the host once it is computed
and writes it to a socket) and goes on with its next op. A reader thread on the receiving process
takes every message off the wire as it arrives, and `move` returns a `Deferred` that the consumer
resolves only when it needs the data. Transfers overlap compute, as the training cost model (and
DT-FM's) assume.

Both sides number the messages of each link (source device, destination device) in the order they
call `move`; every process walks the same global op order, so the numbers match.
"""

from __future__ import annotations

import itertools
import os
import queue
import socket
import struct
import threading
import time

import jax
import numpy as np

from hetjax import distributed
from hetjax.errors import HetjaxError
from hetjax.parallel.exchange import Deferred

_HEADER = struct.Struct('!iiqq')   # source device id, destination device id, sequence, payload bytes
_instances = itertools.count()     # transports are made in the same order on every process


def _own_address() -> str:
  """The address this process reaches the coordinator from (its own namespace's address under the
  launcher's --emulate, 127.0.0.1 for plain local runs), else the hostname's."""
  coordinator = os.environ.get('HETJAX_COORDINATOR', '')
  if coordinator:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
      s.connect((coordinator.rsplit(':', 1)[0], 9))  # UDP connect: picks a route, sends nothing
      return s.getsockname()[0]
  try:
    return socket.gethostbyname(socket.gethostname())
  except OSError:
    return '127.0.0.1'


def _recv_exactly(conn, view) -> bool:
  got = 0
  while got < len(view):
    n = conn.recv_into(view[got:])
    if not n:
      return False
    got += n
  return True


class SocketTransport:
  name = 'socket'

  def __init__(self):
    self._sequence: dict = {}            # (src id, dst id) -> messages moved so far
    self._inbox: dict = {}               # (src id, dst id, seq) -> (payload, arrival time)
    self._arrived = threading.Condition()
    self._closed_peers: set = set()
    self._outboxes: dict = {}            # peer process -> queue of messages for its sender thread
    self._send_error: BaseException | None = None
    self._listener = socket.create_server((_own_address(), 0))
    threading.Thread(target=self._accept, daemon=True).start()
    host, port = self._listener.getsockname()[:2]
    self._peers = [a.rsplit(':', 1) for a in
                   distributed.gather_text(f'socket_transport/{next(_instances)}', f'{host}:{port}')]

  # ---- sending
  def move(self, wire, wire_shape, src: jax.Device, dst: jax.Device):
    """Returns a Deferred of the pytree on `dst` where this process owns dst, else None; the
    sending process never waits."""
    me = jax.process_index()
    if me not in (src.process_index, dst.process_index):
      return None
    link = (src.id, dst.id)
    seq = self._sequence[link] = self._sequence.get(link, -1) + 1
    if src.process_index == dst.process_index:  # within this process
      return jax.device_put(wire, dst)
    if src.process_index == me:
      if self._send_error is not None:
        raise HetjaxError(f'socket transport: sending failed: {self._send_error}')
      leaves = jax.tree.leaves(wire)
      for leaf in leaves:
        leaf.copy_to_host_async()
      self._outbox(dst.process_index).put((src.id, dst.id, seq, leaves))
      return None
    incoming = Deferred(lambda: self._receive(link, seq, wire_shape, dst, incoming))
    return incoming

  def _outbox(self, peer: int):
    if peer not in self._outboxes:
      self._outboxes[peer] = queue.Queue()
      threading.Thread(target=self._send_loop, args=(peer, self._outboxes[peer]), daemon=True).start()
    return self._outboxes[peer]

  def _send_loop(self, peer: int, outbox: queue.Queue):
    try:
      host, port = self._peers[peer]
      conn = socket.create_connection((host, int(port)))
      conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
      while True:
        src, dst, seq, leaves = outbox.get()
        arrays = [np.ascontiguousarray(np.asarray(x)) for x in leaves]  # waits for the compute
        conn.sendall(_HEADER.pack(src, dst, seq, sum(a.nbytes for a in arrays)))
        for a in arrays:
          conn.sendall(memoryview(a.reshape(-1).view(np.uint8)))
    except BaseException as e:  # reported by the next move on the main thread
      self._send_error = e

  # ---- receiving
  def _accept(self):
    while True:
      conn, _ = self._listener.accept()
      threading.Thread(target=self._read_loop, args=(conn,), daemon=True).start()

  def _read_loop(self, conn):
    header = bytearray(_HEADER.size)
    src = None
    while _recv_exactly(conn, memoryview(header)):
      src, dst, seq, nbytes = _HEADER.unpack(header)
      payload = bytearray(nbytes)
      if not _recv_exactly(conn, memoryview(payload)):
        break
      with self._arrived:
        self._inbox[(src, dst, seq)] = (payload, time.perf_counter())
        self._arrived.notify_all()
    with self._arrived:  # the peer closed (or died): whoever waits for it must not wait forever
      self._closed_peers.add(src)
      self._arrived.notify_all()

  def _receive(self, link, seq, wire_shape, dst, incoming: Deferred):
    key = (*link, seq)
    with self._arrived:
      while key not in self._inbox:
        if link[0] in self._closed_peers:
          raise HetjaxError(f'socket transport: the process owning device {link[0]} closed its '
                            f'connection before message {seq} of link {link} arrived')
        self._arrived.wait(timeout=1.0)
      payload, arrived = self._inbox.pop(key)
    specs, offset, leaves = jax.tree.leaves(wire_shape), 0, []
    for spec in specs:
      count = int(np.prod(spec.shape))
      leaves.append(np.frombuffer(payload, spec.dtype, count, offset).reshape(spec.shape))
      offset += count * np.dtype(spec.dtype).itemsize
    incoming.arrived_s = arrived
    return jax.device_put(jax.tree.unflatten(jax.tree.structure(wire_shape), leaves), dst)
