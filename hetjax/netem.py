"""Emulated slow links between local processes: network namespaces, veth pairs, tc tbf shaping.

Process i runs in namespace `hj<pid>n<i>` with address 10.77.<k>.<i+1> on its loopback. Every pair of
processes gets its own veth link, shaped on both ends with tbf to the cluster's bandwidth between
their hosts (times a scale factor, since this machine cannot emulate every rate). netem is not
available here: latency is emulated in user space by the transport (hetjax/parallel/emulated_link.py).
The hostname resolves to the namespace's own address inside it (gloo binds to that address).
Needs root; everything is removed on exit, also after a failure.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess

import numpy as np

from hetjax.errors import HetjaxError


def _sh(*args: str) -> None:
  r = subprocess.run(args, capture_output=True, text=True)
  if r.returncode:
    raise HetjaxError(f'network emulation: `{" ".join(args)}` failed: {r.stderr.strip()}')


BURST_S = 0.001      # tbf bucket: 1 ms at the link's rate ...
MIN_BURST = 4096     # ... but at least a few full-size (1500 B) packets


def burst_bytes(rate_mbit: float) -> int:
  """tbf's bucket size. A message up to this size leaves at line rate, so a large bucket makes a
  link look faster than its rate and biases a latency fit low by burst / rate (a 32 KB bucket at 20
  Mbit/s: 13 ms). One millisecond at the rate keeps that bias near 1 ms; GSO packets larger than
  the bucket are segmented by tbf, so a small bucket still passes them."""
  return max(MIN_BURST, int(rate_mbit * 1e6 / 8 * BURST_S))


def host_bandwidths(cluster, n: int) -> np.ndarray:
  """Gbit/s between the first n hosts of the cluster (one process per host)."""
  hosts = list(cluster.hosts().values())
  if len(hosts) < n:
    raise HetjaxError(f'cluster {cluster.name!r} has {len(hosts)} hosts; cannot emulate {n} processes')
  leaders = [h[0] for h in hosts[:n]]
  return cluster.bandwidth_gbps[np.ix_(leaders, leaders)]


class EmulatedNetwork:

  def __init__(self, bandwidth_gbps: np.ndarray, scale: float = 1.0):
    if os.geteuid() != 0:
      raise HetjaxError('--emulate needs root (network namespaces and tc); run as root or drop --emulate')
    for tool in ('ip', 'tc'):
      if shutil.which(tool) is None:
        raise HetjaxError(f'--emulate needs the `{tool}` command (Debian package iproute2)')
    self.n = len(bandwidth_gbps)
    self.rates_mbit = np.asarray(bandwidth_gbps, float) * scale * 1000.0
    tag = os.getpid() % 200 + 20
    self.namespaces = [f'hj{os.getpid()}n{i}' for i in range(self.n)]
    self.addresses = [f'10.77.{tag}.{i + 1}' for i in range(self.n)]
    self._made: list[str] = []

  @classmethod
  def for_cluster(cls, spec: str, n: int, scale: float = 1.0) -> 'EmulatedNetwork':
    from hetjax.cluster import get_cluster
    return cls(host_bandwidths(get_cluster(spec), n), scale)

  def __enter__(self) -> 'EmulatedNetwork':
    try:
      self._build()
    except BaseException:
      self.close()
      raise
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def _build(self) -> None:
    hostname = socket.gethostname()
    for ns, addr in zip(self.namespaces, self.addresses):
      _sh('ip', 'netns', 'add', ns)
      self._made.append(ns)
      _sh('ip', '-n', ns, 'link', 'set', 'lo', 'up')
      _sh('ip', '-n', ns, 'addr', 'add', f'{addr}/32', 'dev', 'lo')
      os.makedirs(f'/etc/netns/{ns}', exist_ok=True)
      with open(f'/etc/netns/{ns}/hosts', 'w') as f:
        f.write(f'127.0.0.1 localhost\n{addr} {hostname}\n')
    for i in range(self.n):
      for j in range(i + 1, self.n):
        a, b = f'v{i}x{j}', f'v{j}x{i}'
        _sh('ip', 'link', 'add', a, 'netns', self.namespaces[i], 'type', 'veth', 'peer', 'name', b,
            'netns', self.namespaces[j])
        for (ns, dev, src, dst) in ((self.namespaces[i], a, self.addresses[i], self.addresses[j]),
                                    (self.namespaces[j], b, self.addresses[j], self.addresses[i])):
          _sh('ip', '-n', ns, 'link', 'set', dev, 'up')
          _sh('ip', '-n', ns, 'route', 'add', f'{dst}/32', 'dev', dev, 'src', src)
          rate = self.rates_mbit[i, j]
          if np.isfinite(rate):
            _sh('ip', 'netns', 'exec', ns, 'tc', 'qdisc', 'add', 'dev', dev, 'root', 'tbf',
                'rate', f'{rate:.3f}mbit', 'burst', str(burst_bytes(rate)), 'latency', '500ms')

  def wrap(self, i: int, command: list[str]) -> list[str]:
    return ['ip', 'netns', 'exec', self.namespaces[i], *command]

  def close(self) -> None:
    for ns in self._made:
      subprocess.run(['ip', 'netns', 'del', ns], capture_output=True)
      shutil.rmtree(f'/etc/netns/{ns}', ignore_errors=True)
    self._made = []
