"""Compressed DP gradients across processes: two replicas in two processes (gloo), each replica's
two stages inside its own process, so what crosses between the processes is the DP reduction.
Each process counts the TCP bytes it really sent to the other (the kernel's tcpi_bytes_sent,
summed over its sockets to the other process) over the measured steps; then checkpoints the error memory, which
the two processes hold half each, and restores it."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from hetjax.compression import grad as gradc

pytestmark = pytest.mark.slow  # multi-process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WARM, MEASURED = 2, 3  # steps before the byte count starts (compiles, connections), steps counted

MEMBER = f'''
import json, os, socket, struct, sys
sys.path.insert(0, {ROOT!r})
from hetjax import distributed
distributed.initialize()
import jax
from hetjax.parallel.exchange import PairPermuteTransport
from hetjax.parallel.pipeline import Pipeline
from tests.test_dp_grads import batches, model_config
from tests.test_dp_grads_multicontroller import process_plan
from tests.test_aqsgd_pipeline import tcfg

def tcp_bytes_sent():
  """Bytes sent on this process's TCP sockets to other processes (gloo also joins devices of one
  process over loopback: those sockets, whose peer is one of ours, are left out)."""
  sockets = []  # (own address, peer address, tcpi_bytes_sent)
  for fd in os.listdir('/proc/self/fd'):
    try:
      if not os.readlink(f'/proc/self/fd/{{fd}}').startswith('socket:'):
        continue
      with socket.fromfd(int(fd), socket.AF_INET, socket.SOCK_STREAM) as s:
        info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 232)
        sockets.append((s.getsockname(), s.getpeername(), struct.unpack_from('Q', info, 200)[0]))
    except OSError:  # not a connected TCP socket, or gone
      continue
  ours = {{own for own, _, _ in sockets}}
  return sum(sent for _, peer, sent in sockets if peer not in ours)

pipe = Pipeline(process_plan(), model_config(), tcfg(), transport=PairPermuteTransport(),
                grad_bits=int(sys.argv[1]))
data = batches({WARM + MEASURED})
metrics = [pipe.step(b) for b in data[:{WARM}]]
before = tcp_bytes_sent()
metrics += [pipe.step(b) for b in data[{WARM}:]]
sent = tcp_bytes_sent() - before

# Checkpoint: each process writes its replica's error memory; a fresh run restores it and takes
# the same next step.
import numpy as np
from hetjax.checkpoint.manager import Checkpointer
from hetjax.models.model import build_model
from hetjax.parallel.trainer import PipelineTrainState
from tests.test_aqsgd_pipeline import data as iterator

def state(p):
  return PipelineTrainState(p, build_model(model_config(), 0), iterator(8, samples=64))

def rows(p):
  return [np.asarray(x.data) for r in p.runners for e in jax.tree.leaves(r.dp_error)
          for x in e.addressable_shards]

ckpt = Checkpointer(sys.argv[2], every=1, keep=1, async_save=False)
state(pipe).save(ckpt)
fresh = Pipeline(process_plan(), model_config(), tcfg(), transport=PairPermuteTransport(),
                 grad_bits=int(sys.argv[1]))
state(fresh).restore(ckpt)
ckpt.close()
restored = all(np.array_equal(a, b) for a, b in zip(rows(pipe), rows(fresh)))
next_step = [p.step(data[0])['loss'] for p in (pipe, fresh)]
print('RESULT ' + json.dumps({{'losses': [m['loss'] for m in metrics],
                               'dp_bytes_sent': [m['dp_bytes_sent'] for m in metrics],
                               'tcp_bytes_per_step': sent / {MEASURED},
                               'restored': restored, 'next_step': next_step}}), flush=True)
'''


def process_plan():
  """Replica r on process r's 3 devices: stage 0 (TP 1), stage 1 (TP 2)."""
  from hetjax.plan import Plan, Replica, Stage
  from tests.test_dp_grads import BATCH, DP, LAYERS, MICRO
  return Plan([Replica([Stage(0, 1, [3 * r]), Stage(1, 2, [3 * r + 1, 3 * r + 2])]) for r in range(DP)],
              num_layers=LAYERS, micro_batches=MICRO, micro_batch_size=BATCH // MICRO // DP)


def run_two_processes(bits, tmp_path):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  r = subprocess.run([sys.executable, '-m', 'hetjax.launch', '-n', '2', '--devices=3', '--grace=30',
                      '--timeout=400', f'--logs={tmp_path / f"logs{bits}"}', '--', sys.executable,
                      '-c', MEMBER, str(bits), str(tmp_path / f'ckpt{bits}')], cwd=ROOT, env=env, capture_output=True, text=True,
                     timeout=500)
  assert r.returncode == 0, r.stderr[-3000:]
  out = {}
  for line in r.stdout.splitlines():
    if 'RESULT ' in line:
      out[line.split(']')[0].lstrip('[')] = json.loads(line.split('RESULT ', 1)[1])
  assert sorted(out) == ['p0', 'p1'], r.stdout[-2000:]
  return out


def test_compressed_dp_gradients_send_fewer_bytes_across_processes(tmp_path):
  from configs import base
  from hetjax.parallel.pipeline import Pipeline
  from tests.test_aqsgd_pipeline import tcfg
  from tests.test_dp_grads import DP, MICRO, batches, model_config, parts
  fp32, q8 = run_two_processes(0, tmp_path), run_two_processes(8, tmp_path)
  # The same training as in one process (the plan on 8 devices there).
  single = Pipeline(process_plan(), model_config(), tcfg(), grad_bits=8)
  want = [single.step(b)['loss'] for b in batches(WARM + MEASURED)]
  for p in ('p0', 'p1'):
    np.testing.assert_allclose(q8[p]['losses'], want, atol=1e-4)
  # Per process (one replica: stage 0 on 1 device, stage 1 on 2): fp32 all-reduces every
  # micro-batch, 2 (dp-1)/dp x 4 bytes per value and device; 8-bit gathers one payload per step.
  per_process = {0: 0, 8: 0}
  for s, g in enumerate(single.groups):
    whole, split = parts(single, s)
    per_process[0] += g.tp * MICRO * 2 * (DP - 1) * 4 * (whole + split) // DP
    per_process[8] += g.tp * (DP - 1) * sum(gradc.payload_bytes(n, 8, 512) for n in (whole, split))
  assert fp32['p0']['dp_bytes_sent'][-1] == DP * per_process[0]
  assert q8['p0']['dp_bytes_sent'][-1] == DP * per_process[8]
  measured = {bits: np.mean([run[p]['tcp_bytes_per_step'] for p in run])
              for bits, run in ((0, fp32), (8, q8))}
  print(f'TCP bytes per process and step: fp32 {measured[0]:,.0f} (formula {per_process[0]:,.0f}), '
        f'8-bit {measured[8]:,.0f} (formula {per_process[8]:,.0f}); '
        f'ratio {measured[0] / measured[8]:.2f} (formula {per_process[0] / per_process[8]:.2f})')
  # What really crossed is the formula's bytes plus a little (scalars, coordination traffic).
  for bits in (0, 8):
    assert per_process[bits] <= measured[bits] < 1.1 * per_process[bits] + 20_000, measured
  assert measured[0] / measured[8] > 6
  # The error memory, split over the two processes, is checkpointed and restored exactly.
  for p in ('p0', 'p1'):
    assert q8[p]['restored'] and q8[p]['next_step'][0] == q8[p]['next_step'][1], q8[p]
