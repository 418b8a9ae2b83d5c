"""Cluster model: devices (GPU type, host, region), GPU catalog, N x N delay/bandwidth matrices.

A `Cluster` is what the cost models and planners read. Build one from a scenario name
(`get_cluster('dtfm_case5')`), a JSON file in configs/clusters/, or the local CPU devices.

Units: delay in milliseconds, bandwidth in Gbit/s, compute in TFLOP/s, memory in GB (1e9 bytes).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Optional, Sequence

import numpy as np

from hetjax import checks
from hetjax.errors import HetjaxError

MAX_DEVICES = 1024  # N x N link matrices and O(N^2) planners: larger clusters are refused
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER_DIR = os.path.join(REPO_ROOT, 'configs', 'clusters')
V100 = 'V100-SXM2-32GB'


# ---------------------------------------------------------------- GPU catalog
@dataclasses.dataclass(frozen=True)
class GPUSpec:
  name: str
  tflops: float                 # dense fp16/bf16 peak
  memory_gb: float
  mem_bw_gbs: float
  price_per_hour: Optional[float] = None


def load_catalog(path: str = os.path.join(CLUSTER_DIR, 'gpus.json')) -> dict[str, GPUSpec]:
  with open(path) as f:
    raw = json.load(f)['gpus']
  return {name: GPUSpec(name=name, **spec) for name, spec in raw.items()}


GPU_CATALOG: dict[str, GPUSpec] = load_catalog()


def gpu_spec(name: str) -> GPUSpec:
  if name not in GPU_CATALOG:
    raise HetjaxError(f'unknown GPU type {name!r}; known: {", ".join(GPU_CATALOG)}')
  return GPU_CATALOG[name]


# ---------------------------------------------------------------- devices and cluster
@dataclasses.dataclass(frozen=True)
class Device:
  id: int
  gpu: str                       # a GPU_CATALOG key
  host: str
  region: str
  tflops: Optional[float] = None     # measured/overridden peak; None -> catalog
  memory_gb: Optional[float] = None  # overridden capacity; None -> catalog
  mem_bw_gbs: Optional[float] = None  # measured memory bandwidth, GB/s; None -> catalog
  # Measured by mode=calibrate on the pipeline runtime (None -> 0: datasheet clusters have none):
  op_overhead_s: Optional[float] = None       # host seconds per stage op beyond its compute
  update_s_per_layer: Optional[float] = None  # a training step's epilogue per layer of a stage


@dataclasses.dataclass
class Cluster:
  """Devices plus symmetric delay (ms) and bandwidth (Gbit/s) matrices. Diagonals are ignored.
  `measured`: the TFLOP/s are achieved rates from mode=calibrate, not datasheet peaks."""
  name: str
  devices: list[Device]
  delay_ms: np.ndarray
  bandwidth_gbps: np.ndarray
  measured: bool = False

  def __post_init__(self):
    checks.text(self.name, 'cluster name')
    checks.sequence(self.devices, f'cluster {self.name!r} devices', 1, MAX_DEVICES)
    for what in ('delay_ms', 'bandwidth_gbps'):
      try:
        m = np.array(getattr(self, what), dtype=np.float64)
      except (TypeError, ValueError, OverflowError):
        raise HetjaxError(f'cluster {self.name!r}: {what} must be a matrix of numbers') from None
      setattr(self, what, m)
    self.validate()
    np.fill_diagonal(self.delay_ms, 0.0)
    np.fill_diagonal(self.bandwidth_gbps, np.inf)

  # ---- checks
  def validate(self) -> 'Cluster':
    n = len(self.devices)
    if n == 0:
      raise HetjaxError(f'cluster {self.name!r} has no devices')
    if n > MAX_DEVICES:
      raise HetjaxError(f'cluster {self.name!r} has {n} devices; at most {MAX_DEVICES} are supported')
    try:
      for i, d in enumerate(self.devices):
        checks.integer(d.id, f'device {i} id')
        if d.id != i:
          raise HetjaxError(f'device ids must be 0..{n - 1} in order, got {d.id} at {i}')
        for name in ('gpu', 'host', 'region'):
          checks.text(getattr(d, name), f'device {i} {name}')
        gpu_spec(d.gpu)
        for name in ('tflops', 'memory_gb', 'mem_bw_gbs'):
          if getattr(d, name) is not None:
            checks.real(getattr(d, name), f'device {i} {name}', 0, 1e9, lo_open=True)
        for name in ('op_overhead_s', 'update_s_per_layer'):
          if getattr(d, name) is not None:
            checks.real(getattr(d, name), f'device {i} {name}', 0, 1e6)
    except HetjaxError as e:
      raise HetjaxError(f'cluster {self.name!r}: {e}') from None
    for what, m in (('delay_ms', self.delay_ms), ('bandwidth_gbps', self.bandwidth_gbps)):
      if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise HetjaxError(f'cluster {self.name!r}: {what} must be a square matrix, got shape {m.shape}')
      if m.shape[0] != n:
        raise HetjaxError(f'cluster {self.name!r}: {what} is {m.shape[0]}x{m.shape[1]} but there are {n} devices')
      off = m[~np.eye(n, dtype=bool)]
      if not np.all(np.isfinite(off)):
        raise HetjaxError(f'cluster {self.name!r}: {what} has non-finite off-diagonal entries')
      if not np.allclose(m[~np.eye(n, dtype=bool)], m.T[~np.eye(n, dtype=bool)]):
        i, j = np.argwhere(~np.isclose(m, m.T))[0]
        raise HetjaxError(f'cluster {self.name!r}: {what} is not symmetric ({i},{j}): {m[i, j]} vs {m[j, i]}')
    if np.any(self.delay_ms[~np.eye(n, dtype=bool)] < 0):
      raise HetjaxError(f'cluster {self.name!r}: negative delay')
    bad = np.argwhere((self.bandwidth_gbps <= 0) & ~np.eye(n, dtype=bool))
    if len(bad):
      i, j = bad[0]
      raise HetjaxError(f'cluster {self.name!r}: bandwidth between devices {i} and {j} must be positive, '
                        f'got {self.bandwidth_gbps[i, j]}')
    return self

  # ---- queries
  @property
  def n(self) -> int:
    return len(self.devices)

  def spec(self, i: int) -> GPUSpec:
    return gpu_spec(self.devices[i].gpu)

  def tflops(self, i: int) -> float:
    d = self.devices[i]
    return d.tflops if d.tflops is not None else self.spec(i).tflops

  def memory_bytes(self, i: int) -> float:
    d = self.devices[i]
    return 1e9 * (d.memory_gb if d.memory_gb is not None else self.spec(i).memory_gb)

  def mem_bw_gbs(self, i: int) -> float:
    d = self.devices[i]
    return d.mem_bw_gbs if d.mem_bw_gbs is not None else self.spec(i).mem_bw_gbs

  def op_overhead_s(self, i: int) -> float:
    return self.devices[i].op_overhead_s or 0.0

  def update_s_per_layer(self, i: int) -> float:
    return self.devices[i].update_s_per_layer or 0.0

  def tflops_array(self) -> np.ndarray:
    return np.array([self.tflops(i) for i in range(self.n)])

  def memory_array(self) -> np.ndarray:
    return np.array([self.memory_bytes(i) for i in range(self.n)])

  def hosts(self) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for d in self.devices:
      out.setdefault(d.host, []).append(d.id)
    return out

  def regions(self) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for d in self.devices:
      out.setdefault(d.region, []).append(d.id)
    return out

  def same_host(self, ids: Sequence[int]) -> bool:
    return len({self.devices[i].host for i in ids}) <= 1

  def transfer_time(self, nbytes: float, i=None, j=None):
    """Seconds to send nbytes: delay + bytes/bandwidth. Whole matrix if i, j are None; 0 on the diagonal."""
    t = self.delay_ms / 1e3 + nbytes * 8.0 / (self.bandwidth_gbps * 1e9)
    return t if i is None else t[i, j]

  def summary(self) -> str:
    kinds: dict[str, int] = {}
    for d in self.devices:
      kinds[d.gpu] = kinds.get(d.gpu, 0) + 1
    gpus = ', '.join(f'{v}x{k}' for k, v in kinds.items())
    off = ~np.eye(self.n, dtype=bool)
    bw = self.bandwidth_gbps[off] if self.n > 1 else np.array([0.0])
    dl = self.delay_ms[off] if self.n > 1 else np.array([0.0])
    return (f'{self.name}: {self.n} devices ({gpus}), {len(self.hosts())} hosts, {len(self.regions())} regions, '
            f'bandwidth {bw.min():.3g}-{bw.max():.3g} Gbit/s, delay {dl.min():.3g}-{dl.max():.3g} ms')

  def subset(self, ids: Sequence[int], name: Optional[str] = None) -> 'Cluster':
    """A cluster of the given devices, re-numbered 0..k-1 in the given order."""
    ids = list(ids)
    devs = [dataclasses.replace(self.devices[i], id=k) for k, i in enumerate(ids)]
    return Cluster(name or f'{self.name}[{len(ids)}]', devs, self.delay_ms[np.ix_(ids, ids)],
                   self.bandwidth_gbps[np.ix_(ids, ids)], self.measured)

  # ---- (de)serialisation
  def to_dict(self) -> dict[str, Any]:
    bw = self.bandwidth_gbps.copy()
    np.fill_diagonal(bw, 0.0)
    return {'name': self.name,
            'devices': [{k: v for k, v in dataclasses.asdict(d).items() if v is not None} for d in self.devices],
            'delay_ms': self.delay_ms.tolist(), 'bandwidth_gbps': bw.tolist(),
            **({'measured': True} if self.measured else {})}

  @classmethod
  def from_dict(cls, d: dict[str, Any], name: str = 'cluster') -> 'Cluster':
    """Full form (devices + matrices) or compact form (device groups + link rules); see configs/clusters/."""
    checks.mapping(d, f'cluster {name!r}')
    if 'delay_ms' in d or 'bandwidth_gbps' in d:
      try:
        raw = checks.sequence(d['devices'], f'cluster {name!r} devices', 1, MAX_DEVICES)
        devs = [Device(**{**checks.mapping(dv, f'cluster {name!r} device {i}'), 'id': i})
                for i, dv in enumerate(raw)]
        measured = d.get('measured', False)
        if not isinstance(measured, bool):
          raise HetjaxError(f'cluster {name!r}: measured must be true or false, got {measured!r}')
        return cls(d.get('name', name), devs, d['delay_ms'], d['bandwidth_gbps'], measured)
      except (KeyError, TypeError, ValueError) as e:
        raise HetjaxError(f'cluster {name!r}: malformed cluster file ({e})') from None
    return _from_compact(d, name)

  def save(self, path: str) -> None:
    with open(path, 'w') as f:
      json.dump(self.to_dict(), f)

  @classmethod
  def load(cls, path: str) -> 'Cluster':
    try:
      with open(path) as f:
        d = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
      raise HetjaxError(f'cannot read cluster file {path}: {e}') from None
    return cls.from_dict(d, name=os.path.splitext(os.path.basename(path))[0])


def _link(value, what: str) -> tuple[float, float]:
  """[delay_ms >= 0, gbps > 0]."""
  delay, gbps = checks.sequence(value, what, 2, 2)
  return (checks.real(delay, f'{what} delay_ms', 0, 1e7),
          checks.real(gbps, f'{what} gbps', 0, 1e7, lo_open=True))


def _from_compact(d: dict[str, Any], name: str) -> Cluster:
  """Compact form: {"devices": [{"gpu", "host", "region", "count"}], "links": {...}}.

  links: intra_host / intra_region / inter_region_default: [delay_ms, gbps];
         inter_region: {"A-B": [delay_ms, gbps]} between named regions of the devices.
  Devices with count > 1 on a host get hosts named host, or host-0, host-1... with per_host.
  """
  try:
    devs: list[Device] = []
    groups = checks.sequence(checks.mapping(d, 'the file').get('devices'), 'devices', 1, MAX_DEVICES)
    for g, grp in enumerate(groups):
      grp = checks.mapping(grp, f'device group {g}')
      unknown = set(grp) - {'gpu', 'host', 'region', 'count', 'per_host', 'tflops', 'memory_gb',
                          'mem_bw_gbs', 'op_overhead_s', 'update_s_per_layer'}
      if unknown:
        raise HetjaxError(f'device group {g} has unknown field(s) {sorted(unknown)}')
      count = checks.integer(grp.get('count', 1), f'device group {g} count', 1, MAX_DEVICES)
      if len(devs) + count > MAX_DEVICES:
        raise HetjaxError(f'more than {MAX_DEVICES} devices (the most supported)')
      per_host = checks.integer(grp.get('per_host', count), f'device group {g} per_host', 1, count)
      host = checks.text(grp.get('host'), f'device group {g} host')
      region = checks.text(grp.get('region', 'default'), f'device group {g} region')
      for k in range(count):
        devs.append(Device(len(devs), checks.text(grp.get('gpu'), f'device group {g} gpu'),
                           host if count == per_host else f'{host}-{k // per_host}', region,
                           grp.get('tflops'), grp.get('memory_gb'), grp.get('mem_bw_gbs'),
                           grp.get('op_overhead_s'), grp.get('update_s_per_layer')))
    links = checks.mapping(d.get('links'), 'links')
    unknown = set(links) - {'intra_host', 'intra_region', 'inter_region', 'inter_region_default'}
    if unknown:
      raise HetjaxError(f'links has unknown field(s) {sorted(unknown)}')
    regions = [dv.region for dv in devs]
    pair = {}
    for key, val in checks.mapping(links.get('inter_region', {}), 'links.inter_region').items():
      ends = key.split('-')
      if len(ends) != 2 or not all(ends) or ends[0] == ends[1]:
        raise HetjaxError(f'links.inter_region key {key!r} must be "A-B" for two regions')
      pair[tuple(ends)] = pair[tuple(ends[::-1])] = _link(val, f'links.inter_region[{key!r}]')
    # A link table may list more regions than these devices use, but a device's region must be
    # in it (a misspelt region would silently get the default link).
    named = {r for a, b in pair for r in (a, b)}
    if pair and not set(regions) <= named:
      unknown = sorted(set(regions) - named)
      raise HetjaxError(f'region(s) {", ".join(map(repr, unknown))} of the devices appear in no '
                        f'links.inter_region key ({", ".join(sorted(named))})')
    kinds = {k: _link(links[k], f'links.{k}') if k in links else None
             for k in ('intra_host', 'intra_region', 'inter_region_default')}
    n = len(devs)
    delay, bw = np.zeros((n, n)), np.zeros((n, n))
    for i in range(n):
      for j in range(n):
        if devs[i].host == devs[j].host:
          kind = 'intra_host'
        elif regions[i] == regions[j]:
          kind = 'intra_region'
        elif (regions[i], regions[j]) in pair:
          delay[i, j], bw[i, j] = pair[(regions[i], regions[j])]
          continue
        else:
          kind = 'inter_region_default'
        if kinds[kind] is None:
          raise HetjaxError(f'links.{kind} is needed (devices {i} and {j})')
        delay[i, j], bw[i, j] = kinds[kind]
  except HetjaxError as e:
    raise HetjaxError(f'cluster {name!r}: {e}') from None
  return Cluster(checks.text(d.get('name', name), 'cluster name'), devs, delay, bw)


# ---------------------------------------------------------------- scenario builders
def _facts() -> dict:
  path = os.path.join(CLUSTER_DIR, 'dtfm_scenarios.json')
  with open(path) as f:
    return json.load(f)


def _split(n: int, parts: int) -> list[int]:
  """Group index of each of n devices split into `parts` near-equal contiguous groups."""
  return [min(i * parts // n, parts - 1) for i in range(n)]


def _from_regions(name, gpus, hosts, regions, link: Callable[[int, int], tuple[float, float]]) -> Cluster:
  n = len(gpus)
  delay, bw = np.zeros((n, n)), np.ones((n, n))
  for i in range(n):
    for j in range(i + 1, n):
      dl, b = link(i, j)
      delay[i, j] = delay[j, i] = dl
      bw[i, j] = bw[j, i] = b
  devs = [Device(i, gpus[i], hosts[i], regions[i]) for i in range(n)]
  return Cluster(name, devs, delay, bw)


def dtfm_case(case: int, n: int = 64, gpu: str | Sequence[str] = V100) -> Cluster:
  """DT-FM's network scenarios 1-5 (paper's 64 V100s by default), at any device count n.

  `gpu` may be one type or a per-region list (mixed-GPU variants). Intra-region delay is the
  lower end (5 ms) of the paper's 5-10 ms range, as in DT-FM's scheduler scripts.
  """
  cases = _facts()['cases']
  if case == 1:   # 8 GPUs per instance, NVLink inside, 3.125 Gbit/s between instances
    c = cases['1_datacenter_on_demand']
    per = max(1, min(n // 2, 8))
    hosts = [f'instance{i // per}' for i in range(n)]
    regions = ['datacenter'] * n
    intra, inter = c['intra_instance'], c['inter_instance']
    link = lambda i, j: ((intra['delay'], intra['bandwidth']) if hosts[i] == hosts[j]
                         else (inter['delay'], inter['bandwidth']))
  elif case == 2:  # first half on 4-GPU instances, second half single-GPU instances
    c = cases['2_datacenter_spot']
    half = n // 2
    hosts = [f'spot{i // 4}' if i < half else f'single{i}' for i in range(n)]
    regions = ['datacenter'] * n
    intra, inter = c['intra_instance'], c['inter_instance']
    link = lambda i, j: ((intra['delay'], intra['bandwidth']) if hosts[i] == hosts[j]
                         else (inter['delay'], inter['bandwidth']))
  elif case == 3:
    c = cases['3_multi_universities']
    names = ['Ohio', 'Virginia']
    regions = [names[g] for g in _split(n, 2)]
    hosts = [f'{regions[i]}{i}' for i in range(n)]
    intra, inter = c['intra_region'], c['inter_region']
    link = lambda i, j: ((intra['delay'], intra['bandwidth']) if regions[i] == regions[j]
                         else (inter['delay'], inter['bandwidth']))
  elif case in (4, 5):
    c = cases['4_regional_geo_distributed' if case == 4 else '5_worldwide_geo_distributed']
    names = (['Virginia', 'Oregon', 'California', 'Ohio'] if case == 4 else
             ['Oregon', 'Virginia', 'Ohio', 'Tokyo', 'Seoul', 'London', 'Frankfurt', 'Ireland'])
    pairs = c['inter_region'] if case == 4 else c['inter_region_pairs']
    table = {}
    for key, (dl, b) in pairs.items():
      a, b2 = key.split('-')
      table[(a, b2)] = table[(b2, a)] = (dl, b)
    regions = [names[g] for g in _split(n, len(names))]
    hosts = [f'{regions[i]}{i}' for i in range(n)]
    intra = (min(c['intra_region']['delay']), c['intra_region']['bandwidth'])
    link = lambda i, j: intra if regions[i] == regions[j] else table[(regions[i], regions[j])]
  else:
    raise HetjaxError(f'DT-FM has scenarios 1-5, got {case}')
  if isinstance(gpu, str):
    gpus = [gpu] * n
  else:  # one type per region, cycling
    order = list(dict.fromkeys(regions))
    gpus = [gpu[order.index(r) % len(gpu)] for r in regions]
  return _from_regions(f'dtfm_case{case}', gpus, hosts, regions, link)


MIXED_WORLD_GPUS = ('A100-40GB-SXM', 'V100-SXM2-32GB', 'RTX3090', 'T4')


def mixed_worldwide(n: int = 64) -> Cluster:
  """DT-FM's world-wide case with A100/V100/RTX3090/T4 by region and 4-GPU hosts (100 Gbit/s inside)."""
  base = dtfm_case(5, n, gpu=MIXED_WORLD_GPUS)
  hosts = []
  for r, ids in base.regions().items():
    hosts += [f'{r}-h{k // 4}' for k in range(len(ids))]
  bw, delay = base.bandwidth_gbps.copy(), base.delay_ms.copy()
  for i in range(n):
    for j in range(n):
      if i != j and hosts[i] == hosts[j]:
        bw[i, j], delay[i, j] = 100.0, 0.0
  devs = [dataclasses.replace(d, host=hosts[d.id]) for d in base.devices]
  np.fill_diagonal(bw, 0)
  return Cluster('mixed_worldwide', devs, delay, bw)


def mixed_datacenter(n: int = 64) -> Cluster:
  """One datacenter, 8-GPU hosts of A100 / V100 / RTX3090 / T4 (a quarter each); 600 Gbit/s
  NVLink inside A100 hosts, 100 inside the others, 10 Gbit/s and 0.1 ms between hosts."""
  per = max(1, min(8, n // 4))
  kinds = [MIXED_WORLD_GPUS[g] for g in _split(n, 4)]
  hosts = [f'{kinds[i]}-h{i // per}' for i in range(n)]
  regions = ['datacenter'] * n
  def link(i, j):
    if hosts[i] != hosts[j]:
      return 0.1, 10.0
    return 0.0, 600.0 if kinds[i].startswith('A100') else 100.0
  return _from_regions('mixed_datacenter', kinds, hosts, regions, link)


def probe_tflops(devices, probe_size: int = 512, reps: int = 3) -> list[float]:
  """TFLOP/s of each (addressable) device, from a short f32 matmul; one device at a time, since
  devices may share the host CPU."""
  import time
  import jax
  import jax.numpy as jnp

  f = jax.jit(lambda a, b: a @ b)
  tflops = []
  for dev in devices:
    a = jax.device_put(jnp.ones((probe_size, probe_size), jnp.float32), dev)
    f(a, a).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(reps):
      f(a, a).block_until_ready()
    dt = (time.perf_counter() - t0) / reps
    tflops.append(2 * probe_size ** 3 / dt / 1e12)
  return tflops


def _host_memory_gb(num_devices: int) -> Optional[float]:
  try:
    return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 1e9 / num_devices
  except (ValueError, OSError):
    return None


def local_cluster(n: Optional[int] = None, probe_size: int = 512, reps: int = 3) -> Cluster:
  """This machine's JAX devices, each with TFLOP/s measured by a short f32 matmul probe and the
  link measured by a device-to-device copy. Devices share the host CPU, so probes run one at a time."""
  import time
  import jax
  import jax.numpy as jnp

  devices = jax.devices()[:n] if n else jax.devices()
  tflops = probe_tflops(devices, probe_size, reps)
  delay_ms, gbps = 0.01, 10.0
  if len(devices) > 1:
    x = jax.device_put(jnp.ones((1 << 21,), jnp.float32), devices[0])  # 8 MB
    small = jax.device_put(jnp.ones((1,), jnp.float32), devices[0])
    jax.device_put(x, devices[1]).block_until_ready()
    t0 = time.perf_counter()
    jax.device_put(small, devices[1]).block_until_ready()
    delay_ms = max(1e-3, (time.perf_counter() - t0) * 1e3)
    t0 = time.perf_counter()
    jax.device_put(x, devices[1]).block_until_ready()
    gbps = x.nbytes * 8 / max(time.perf_counter() - t0, 1e-9) / 1e9
  mem_gb = _host_memory_gb(len(devices))
  kind = 'CPU' if devices[0].platform == 'cpu' else 'H100-SXM'
  devs = [Device(i, kind, 'localhost', 'local', tflops=tflops[i], memory_gb=mem_gb if kind == 'CPU' else None)
          for i in range(len(devices))]
  k = len(devices)
  return Cluster('local', devs, np.full((k, k), delay_ms), np.full((k, k), gbps))


def processes_cluster(tflops: Sequence[Sequence[float]], kind: str = 'CPU',
                      delay_ms: float = 0.01, gbps: float = 10.0) -> Cluster:
  """Devices of several processes, one host each (process p's devices on host 'p<p>'), with the
  probed TFLOP/s per device (probe_tflops). Links are not measured: every pair gets local_cluster's
  defaults (delay_ms, gbps). CPU devices get an equal share of this machine's memory."""
  counts = [len(t) for t in tflops]
  mem_gb = _host_memory_gb(max(1, sum(counts))) if kind == 'CPU' else None
  devs = [Device(0, kind, f'p{p}', 'local', tflops=float(t), memory_gb=mem_gb)
          for p, ts in enumerate(tflops) for t in ts]
  devs = [dataclasses.replace(d, id=i) for i, d in enumerate(devs)]
  k = len(devs)
  return Cluster('processes', devs, np.full((k, k), delay_ms), np.full((k, k), gbps))


SCENARIOS: dict[str, Callable[..., Cluster]] = {
    **{f'dtfm_case{c}': (lambda n=64, c=c: dtfm_case(c, n)) for c in range(1, 6)},
    'mixed_worldwide': mixed_worldwide,
    'mixed_datacenter': mixed_datacenter,
    'local': lambda n=None: local_cluster(n),
}


def get_cluster(spec: str, num_devices: Optional[int] = None) -> Cluster:
  """A scenario name (see SCENARIOS), a file name in configs/clusters/, or a path to a JSON file."""
  if spec in SCENARIOS:
    if num_devices is not None and num_devices <= 0:
      raise HetjaxError(f'num_devices must be positive, got {num_devices}')
    return SCENARIOS[spec](num_devices) if num_devices else SCENARIOS[spec]()
  for path in (spec, os.path.join(CLUSTER_DIR, spec), os.path.join(CLUSTER_DIR, spec + '.json')):
    if os.path.isfile(path) and path.endswith('.json') and not path.endswith('gpus.json'):
      cluster = Cluster.load(path)
      if num_devices and num_devices > cluster.n:
        raise HetjaxError(f'cluster {spec!r} has {cluster.n} devices, asked for {num_devices}')
      if num_devices and num_devices < cluster.n:
        cluster = cluster.subset(range(num_devices))
      return cluster
  files = sorted(f[:-5] for f in os.listdir(CLUSTER_DIR)
                 if f.endswith('.json') and f not in ('gpus.json', 'dtfm_scenarios.json'))
  raise HetjaxError(f'unknown cluster {spec!r}; choose a scenario ({", ".join(SCENARIOS)}), '
                    f'a file in configs/clusters ({", ".join(files)}) or a path to a .json file')
