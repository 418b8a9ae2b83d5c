"""Emulated heterogeneous compute for the launcher: one CPU quota per process, pinned, via cgroups.

Process i emulates host i of the cluster (its first device's speed). Quotas are proportional to the
speeds, each at most one core, and they are packed onto whole cores (first fit, fastest first) so
that the quotas on any core sum to at most one: no process ever waits for another's core. The sum
stays within the budget (--cpus, default the cores this process may use).

cgroup v1 (`cpu.cfs_quota_us` + `cpuset`) and v2 (`cpu.max` + `cpuset.cpus`) are supported. Groups
are named hetjax-<launcher pid>-p<i>; they are removed on exit, and groups (and network namespaces)
left by a launcher that was killed (SIGKILL) are removed by the next launcher that starts.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shutil
import subprocess
import time

import numpy as np

from hetjax.errors import HetjaxError

CGROUP_ROOT = '/sys/fs/cgroup'
# CFS throttles per period: a process runs at full speed until its quota of the period is spent.
# A short period keeps that burstiness below a layer's time, so the quota reads as a slower device.
PERIOD_US = 10_000
MIN_QUOTA = 0.1  # cores; CFS refuses quotas under 1 ms
PREFIX = 'hetjax-'


@dataclasses.dataclass
class Share:
  quota: float      # cores (CPU-seconds per second)
  core: int         # the one core it is pinned to


def plan_quotas(speeds, cpus: float, cores: list[int]) -> list[Share]:
  """Quotas proportional to `speeds`, each <= 1 core, summing to <= `cpus`, packed first-fit onto
  `cores` so that each core carries at most 1 core of quota. The largest common scale that fits."""
  speeds = np.asarray(speeds, float)
  if speeds.ndim != 1 or len(speeds) == 0 or not np.all(np.isfinite(speeds)) or np.any(speeds <= 0):
    raise HetjaxError(f'testbed: device speeds must be positive numbers, got {speeds.tolist()}')
  if not (math.isfinite(cpus) and cpus > 0):
    raise HetjaxError(f'--cpus must be a positive number, got {cpus}')
  if not cores:
    raise HetjaxError('testbed: no CPU cores available')
  scale = min(1.0 / speeds.max(), cpus / speeds.sum())
  order = np.argsort(-speeds, kind='stable')
  for _ in range(200):
    quotas = speeds * scale
    load = [0.0] * len(cores)
    placed = {}
    for i in order:
      slot = next((c for c in range(len(cores)) if load[c] + quotas[i] <= 1.0 + 1e-9), None)
      if slot is None:
        break
      load[slot] += quotas[i]
      placed[i] = slot
    else:
      if quotas.min() < MIN_QUOTA:
        raise HetjaxError(f'testbed: speeds {speeds.tolist()} need a quota under {MIN_QUOTA} core; '
                          f'raise --cpus or narrow the speed range')
      return [Share(float(quotas[i]), cores[placed[i]]) for i in range(len(speeds))]
    scale *= 0.97
  raise HetjaxError(f'testbed: cannot pack {len(speeds)} processes onto {len(cores)} cores')


def host_speeds(cluster, n: int) -> np.ndarray:
  """TFLOP/s of the first device of each of the first n hosts (one process per host)."""
  hosts = list(cluster.hosts().values())
  if len(hosts) < n:
    raise HetjaxError(f'cluster {cluster.name!r} has {len(hosts)} hosts; cannot emulate {n} processes')
  return np.array([cluster.tflops(h[0]) for h in hosts[:n]])


def host_delays_ms(cluster, n: int) -> np.ndarray:
  leaders = [h[0] for h in list(cluster.hosts().values())[:n]]
  return cluster.delay_ms[np.ix_(leaders, leaders)]


def cgroup_version() -> int:
  """2 for a unified hierarchy, 1 for v1 with cpu and cpuset mounted, else 0."""
  if os.path.exists(f'{CGROUP_ROOT}/cgroup.controllers'):
    return 2
  if os.path.isdir(f'{CGROUP_ROOT}/cpu') and os.path.isdir(f'{CGROUP_ROOT}/cpuset'):
    return 1
  return 0


def why_unavailable() -> str:
  """'' when quotas can be applied here, else the one-line reason."""
  if os.geteuid() != 0:
    return 'compute emulation needs root (cgroups); run as root or drop --emulate'
  if not cgroup_version():
    return f'compute emulation needs cgroups (v1 cpu+cpuset or v2) under {CGROUP_ROOT}'
  return ''


def _separate_cpuacct() -> bool:
  acct = f'{CGROUP_ROOT}/cpuacct'
  return os.path.isdir(acct) and os.path.realpath(acct) != os.path.realpath(f'{CGROUP_ROOT}/cpu')


def _write(path: str, value: str) -> None:
  try:
    with open(path, 'w') as f:
      f.write(value)
  except OSError as e:
    raise HetjaxError(f'testbed: cannot write {value!r} to {path}: {e}') from None


def _read(path: str) -> str:
  with open(path) as f:
    return f.read().strip()


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _remove_group(path: str) -> None:
  """Kill what is left inside, then rmdir (retried briefly while the kernel reaps the tasks)."""
  procs = os.path.join(path, 'cgroup.procs')
  for _ in range(50):
    try:
      pids = [int(p) for p in _read(procs).split()]
    except OSError:
      return
    for pid in pids:
      try:
        os.kill(pid, 9)
      except ProcessLookupError:
        pass
    try:
      os.rmdir(path)
      return
    except OSError:
      time.sleep(0.05)


def sweep_stale() -> list[str]:
  """Remove groups and network namespaces of launchers that are no longer running."""
  gone = []
  for base in (f'{CGROUP_ROOT}/cpu', f'{CGROUP_ROOT}/cpuset', f'{CGROUP_ROOT}/cpuacct', CGROUP_ROOT):
    if not os.path.isdir(base):
      continue
    for name in os.listdir(base):
      m = re.fullmatch(rf'{PREFIX}(\d+)-p\d+', name)
      if m and not _alive(int(m.group(1))):
        _remove_group(os.path.join(base, name))
        gone.append(os.path.join(base, name))
  if shutil.which('ip'):
    out = subprocess.run(['ip', 'netns', 'list'], capture_output=True, text=True).stdout
    for ns in re.findall(r'^(hj(\d+)n\d+)', out, re.M):
      if not _alive(int(ns[1])):
        subprocess.run(['ip', 'netns', 'del', ns[0]], capture_output=True)
        shutil.rmtree(f'/etc/netns/{ns[0]}', ignore_errors=True)
        gone.append(f'netns {ns[0]}')
  return gone


class ComputeQuotas:
  """Creates one cgroup per process with its quota and core; `wrap` makes a command join it."""

  def __init__(self, shares: list[Share]):
    reason = why_unavailable()
    if reason:
      raise HetjaxError(reason)
    self.shares, self.version = shares, cgroup_version()
    self.groups: list[list[str]] = []  # per process: its group folders

  def __enter__(self) -> 'ComputeQuotas':
    sweep_stale()
    try:
      for i, share in enumerate(self.shares):
        self.groups.append([])  # filled as folders are made: a failure half-way is cleaned up too
        self._make(f'{PREFIX}{os.getpid()}-p{i}', share, self.groups[-1])
    except BaseException:
      self.close()
      raise
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def _make(self, name: str, share: Share, made: list[str]) -> None:
    quota_us = max(1000, int(round(share.quota * PERIOD_US)))  # >= MIN_QUOTA by plan_quotas
    if self.version == 2:
      path = f'{CGROUP_ROOT}/{name}'
      _write(f'{CGROUP_ROOT}/cgroup.subtree_control', '+cpu +cpuset')
      os.makedirs(path)
      made.append(path)
      _write(f'{path}/cpu.max', f'{quota_us} {PERIOD_US}')
      _write(f'{path}/cpuset.cpus', str(share.core))
      return
    cpu, cpuset = f'{CGROUP_ROOT}/cpu/{name}', f'{CGROUP_ROOT}/cpuset/{name}'
    paths = [cpu, cpuset]
    if _separate_cpuacct():  # CPU time used; where cpuacct is mounted with cpu, cpu/ has it
      paths.append(f'{CGROUP_ROOT}/cpuacct/{name}')
    for path in paths:
      os.makedirs(path)
      made.append(path)
    _write(f'{cpu}/cpu.cfs_period_us', str(PERIOD_US))
    _write(f'{cpu}/cpu.cfs_quota_us', str(quota_us))
    _write(f'{cpuset}/cpuset.mems', _read(f'{CGROUP_ROOT}/cpuset/cpuset.mems'))
    _write(f'{cpuset}/cpuset.cpus', str(share.core))

  def used(self, i: int) -> tuple[float, float]:
    """(CPU seconds used, seconds throttled by the quota) of process i's group so far."""
    paths = self.groups[i]
    try:
      if self.version == 2:
        stat = dict(l.split() for l in _read(f'{paths[0]}/cpu.stat').splitlines())
        return int(stat['usage_usec']) / 1e6, int(stat.get('throttled_usec', 0)) / 1e6
      acct = next(p for p in paths if os.path.exists(f'{p}/cpuacct.usage'))
      stat = dict(l.split() for l in _read(f'{paths[0]}/cpu.stat').splitlines())
      return int(_read(f'{acct}/cpuacct.usage')) / 1e9, int(stat.get('throttled_time', 0)) / 1e9
    except (OSError, StopIteration, KeyError, ValueError):
      return float('nan'), float('nan')

  def wrap(self, i: int, command: list[str]) -> list[str]:
    """`command` run inside process i's groups (a shell joins them, then execs the command)."""
    join = '; '.join(f'echo $$ > {g}/cgroup.procs' for g in self.groups[i])
    return ['sh', '-c', f'{join} && exec "$@"', 'sh', *command]

  def close(self) -> None:
    for made in self.groups:
      for path in made:
        _remove_group(path)
    self.groups = []


class Testbed:
  """Network namespaces and shaped links (hetjax.netem) plus compute quotas: what launch() needs
  (`addresses`, `wrap`) for an emulated cluster."""

  def __init__(self, network, quotas: ComputeQuotas, delays_ms: np.ndarray):
    self.network, self.quotas, self.delays_ms = network, quotas, delays_ms
    self.n = network.n
    self.addresses = network.addresses

  def wrap(self, i: int, command: list[str]) -> list[str]:
    # Join the cgroups first: `ip netns exec` remounts /sys, hiding the cgroup folders.
    return self.quotas.wrap(i, self.network.wrap(i, command))

  def usage_table(self, wall_s: float) -> str:
    """What each process actually got over the run: CPU time / wall against its quota, and how
    long the quota throttled it. Below the quota and never throttled: other work on the machine
    took the rest (quotas cap; they do not reserve)."""
    lines = [f'{"process":>8} {"quota":>6} {"CPU s":>7} {"cores got":>9} {"throttled s":>11}  '
             f'(over {wall_s:.1f} s wall)']
    for i, s in enumerate(self.quotas.shares):
      cpu, throttled = self.quotas.used(i)
      lines.append(f'{"p" + str(i):>8} {s.quota:>6.3f} {cpu:>7.2f} {cpu / wall_s:>9.3f} {throttled:>11.2f}')
    return '\n'.join(lines)

  def table(self) -> str:
    """What was applied: processes (quota, core) and links (bandwidth, latency)."""
    lines = [f'{"process":>8} {"quota (cores)":>14} {"core":>5}']
    for i, s in enumerate(self.quotas.shares):
      lines.append(f'{"p" + str(i):>8} {s.quota:>14.3f} {s.core:>5}')
    lines.append(f'{"link":>8} {"Mbit/s (tbf)":>14} {"one-way ms (user-space emulation)":>34}')
    rates = self.network.rates_mbit
    for i in range(self.n):
      for j in range(i + 1, self.n):
        lines.append(f'{f"p{i}-p{j}":>8} {rates[i, j]:>14.1f} {self.delays_ms[i, j]:>34.3f}')
    return '\n'.join(lines)
