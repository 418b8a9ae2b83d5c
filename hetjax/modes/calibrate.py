"""mode=calibrate: measure each device's per-layer compute rate and the links between them, and
write a calibrated cluster file (see hetjax/calibration.py for the method).

One process: the first calibrate.devices local devices, links over DevicePutTransport. Several
processes (hetjax.launch): one device per process, links over SocketTransport (as training), with the
launcher's emulated latency (if any) applied as in training. The fitted efficiency of each device
(measured rate / catalog peak) is reported; the file's `tflops` are the measured rates and it says
`measured: true`, so mode=plan and plan=search use efficiency 1.0 over it. `measure` is also what
training with --config.pipeline.calibrate=true runs before its search."""

import os
import time

import jax
import numpy as np

from hetjax import calibration
from hetjax.cluster import Cluster, get_cluster, gpu_spec
from hetjax import distributed
from hetjax.distributed import is_leader
from hetjax.errors import HetjaxError
from hetjax.metrics import write_json
from hetjax.models.config import model_config_from


def _devices(ccfg):
  if jax.process_count() > 1:
    return [next(d for d in jax.devices() if d.process_index == p) for p in range(jax.process_count())]
  if not 1 <= ccfg.devices <= len(jax.local_devices()):
    raise HetjaxError(f'calibrate.devices must be in 1..{len(jax.local_devices())}, got {ccfg.devices}')
  return jax.local_devices()[:ccfg.devices]


def _gather(values: np.ndarray) -> np.ndarray:
  """Element-wise max over processes of arrays each process filled where it measured (else -inf)."""
  if jax.process_count() == 1:
    return values
  from jax.experimental import multihost_utils
  return np.max(np.asarray(multihost_utils.process_allgather(values)), axis=0)


def measure(mcfg, micro_batch: int, seq_len: int, reps: int, sizes: tuple[int, int], devices,
            base: Cluster | None = None, base_ids=None, seed: int = 0, say=print,
            name: str = 'calibrated') -> dict:
  """Measure `devices` (device i stands for `base` device base_ids[i], whose GPU name, host,
  region and memory it keeps) and the links between them; the calibrated cluster dict."""
  from hetjax.parallel.emulated_link import from_environment
  from hetjax.parallel.exchange import DevicePutTransport
  from hetjax.parallel.socket_transport import SocketTransport
  n = len(devices)
  load = os.getloadavg()[0]
  say(f'calibrating {n} device(s) at micro-batch {micro_batch} x seq {seq_len}; machine load '
      f'{load:.1f} on {os.cpu_count()} cores (measurements share it)')

  mine = [i for i, d in enumerate(devices) if d.process_index == jax.process_index()]
  fwd, bwd, flops, cores = (np.full(n, -np.inf) for _ in range(4))
  op_s, update_s = np.full(n, -np.inf), np.full(n, -np.inf)
  for i in mine:
    r = calibration.measure_layer(mcfg, micro_batch, seq_len, devices[i], reps, seed)
    fwd[i], bwd[i], flops[i], cores[i] = r.forward_s, r.backward_s, r.forward_flops, r.cores
    say(f'timing the pipeline runtime on device {i} (its host time per op and per step) ...')
    o = calibration.measure_runtime(mcfg, micro_batch, seq_len, devices[i], r, reps, seed)
    op_s[i], update_s[i] = o.op_s, o.update_s_per_layer
  # Slow devices finish much later; the coordinator's barrier waits for them (gloo's first
  # collective would give up after 30 s).
  distributed.barrier('calibrate/devices_measured')
  fwd, bwd, flops, cores = _gather(fwd), _gather(bwd), _gather(flops), _gather(cores)
  op_s, update_s = _gather(op_s), _gather(update_s)
  rates = 3 * flops / (fwd + bwd) / 1e12

  multi = jax.process_count() > 1
  # The transport training uses by default (pipeline.transport=auto), so links are measured as used.
  transport = from_environment(SocketTransport() if multi else DevicePutTransport(), say)
  times = np.full((2, n, n), -np.inf)
  for i in range(n):
    for j in range(i + 1, n):
      for k, size in enumerate(sizes):
        t = calibration.ping_pong(transport, devices[i], devices[j], size, reps)
        if t is not None:
          times[k, i, j] = times[k, j, i] = t
  times = _gather(times)
  delay, bw, links = np.zeros((n, n)), np.zeros((n, n)), {}
  for i in range(n):
    for j in range(i + 1, n):
      fit = calibration.fit_link(sizes, (times[0, i, j], times[1, i, j]))
      delay[i, j] = delay[j, i] = fit.latency_s * 1e3
      bw[i, j] = bw[j, i] = fit.bandwidth_gbps
      links[f'{i}-{j}'] = {'one_way_ms': [t * 1e3 for t in fit.one_way_s], 'bytes': list(sizes)}

  ids = list(base_ids) if base is not None else []
  gpus = [base.devices[k].gpu for k in ids] if base else ['CPU'] * n
  memory = [base.memory_bytes(k) / 1e9 for k in ids] if base else [gpu_spec('CPU').memory_gb] * n
  efficiency = [rates[i] / gpu_spec(gpus[i]).tflops for i in range(n)]
  details = {'micro_batch_size': micro_batch, 'seq_len': seq_len,
             'layer_forward_s': fwd.tolist(), 'layer_backward_s': bwd.tolist(),
             'layer_forward_flops': flops.tolist(), 'fitted_efficiency': efficiency,
             'achieved_cores': cores.tolist(), 'links': links, 'load_average': load,
             'op_overhead_s': op_s.tolist(), 'update_s_per_layer': update_s.tolist(),
             'processes': jax.process_count()}
  cluster = calibration.calibrated_cluster(
      name, rates, delay, bw, gpus, memory, time.strftime('%Y-%m-%d %H:%M:%S'), details,
      hosts=[base.devices[k].host for k in ids] if base else None,
      regions=[base.devices[k].region for k in ids] if base else None, op_overhead_s=op_s,
      update_s_per_layer=update_s)
  Cluster.from_dict(cluster)  # what is written must load as a cluster

  say(f'{"device":>7} {"fwd ms/layer":>13} {"bwd ms/layer":>13} {"TFLOP/s":>9} {"efficiency":>10} '
      f'{"cores got":>9} {"ms/op":>7} {"update ms/layer":>15}')
  for i in range(n):
    say(f'{i:>7} {fwd[i] * 1e3:>13.3f} {bwd[i] * 1e3:>13.3f} {rates[i]:>9.4f} {efficiency[i]:>10.3f} '
        f'{cores[i]:>9.2f} {op_s[i] * 1e3:>7.2f} {update_s[i] * 1e3:>15.2f}')
  say('cores got = process CPU time / wall while timing: the TFLOP/s above are what each device '
      'achieved (a CFS quota caps a process; it cannot reserve a core on a shared machine)')
  say(f'{"link":>7} {"latency ms":>13} {"Gbit/s":>13}')
  for i in range(n):
    for j in range(i + 1, n):
      say(f'{f"{i}-{j}":>7} {delay[i, j]:>13.3f} {bw[i, j]:>13.3f}')
  return cluster


def run(cfg, workdir: str) -> None:
  say = print if is_leader() else (lambda *a, **k: None)
  ccfg, mcfg = cfg.calibrate, model_config_from(cfg)
  devices = _devices(ccfg)
  n = len(devices)
  base = get_cluster(cfg.cluster) if cfg.cluster else None
  if base is not None and len(base.hosts()) < n:
    raise HetjaxError(f'cluster {cfg.cluster!r} has {len(base.hosts())} hosts; {n} devices measured')
  leaders = [h[0] for h in base.hosts().values()][:n] if base else None
  cluster = measure(mcfg, ccfg.micro_batch_size, ccfg.seq_len, ccfg.reps,
                    (int(ccfg.small_bytes), int(ccfg.large_bytes)), devices, base, leaders,
                    cfg.seed, say, f'calibrated_{cfg.model}')
  cluster['calibration']['model'] = cfg.model
  if is_leader():
    for path in filter(None, (os.path.join(workdir, 'cluster.json'), ccfg.out)):
      write_json(path, cluster)
      print(f'wrote {path}')
