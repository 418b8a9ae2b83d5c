"""Local multi-controller launcher: N processes, one coordinator, optional emulated slow links.

  python -m hetjax.launch -n 3 --devices=1,2,4 -- python run.py --config=configs/pipeline.py

Each process gets its own CPU device count (--devices, one number for all or one per process) and
the HETJAX_* variables that hetjax.distributed reads. Output lines are prefixed with [pN]. If any
process fails, the others get --grace seconds to notice (jax.distributed's heartbeat), then are
stopped; the launcher exits non-zero with one line saying which process failed first. --timeout
stops a group that runs too long (exit code 124).

--emulate=CLUSTER runs each process in its own network namespace joined by veth links shaped to the
cluster's bandwidth matrix (see hetjax/netem.py); it needs root.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _forward(stream, prefix: str, out) -> None:
  for line in iter(stream.readline, ''):
    out.write(f'{prefix}{line}')
    out.flush()


def parse_devices(spec: str, n: int) -> list[int]:
  counts = [int(x) for x in spec.split(',') if x.strip()]
  if len(counts) == 1:
    counts *= n
  if len(counts) != n or min(counts) < 1:
    raise SystemExit(f'error: --devices needs 1 or {n} positive counts, got {spec!r}')
  return counts


def launch(command: list[str], n: int, devices: list[int], grace_s: float = 45.0,
           network=None, timeout_s: float = 0) -> int:
  """Run `command` as n cooperating processes; returns the exit code for the group.
  timeout_s > 0 stops the whole group after that long (exit code 124)."""
  addresses = network.addresses if network else ['127.0.0.1'] * n
  coordinator = f'{addresses[0]}:{free_port()}'
  procs = []
  for i in range(n):
    env = {**os.environ, 'HETJAX_COORDINATOR': coordinator, 'HETJAX_NUM_PROCESSES': str(n),
           'HETJAX_PROCESS_ID': str(i), 'JAX_PLATFORMS': 'cpu',
           'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices[i]}',
           'PYTHONUNBUFFERED': '1'}
    argv = network.wrap(i, command) if network else command
    p = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    for stream, out in ((p.stdout, sys.stdout), (p.stderr, sys.stderr)):
      threading.Thread(target=_forward, args=(stream, f'[p{i}] ', out), daemon=True).start()
    procs.append(p)
  first_failure = None
  deadline = None
  started = time.monotonic()
  timed_out = False
  while True:
    codes = [p.poll() for p in procs]
    if timeout_s and not timed_out and time.monotonic() - started > timeout_s:
      timed_out = True
      deadline = time.monotonic()
    if first_failure is None:
      for i, c in enumerate(codes):
        if c not in (None, 0):
          first_failure = (i, c)
          deadline = time.monotonic() + grace_s
          break
    if all(c is not None for c in codes):
      break
    if deadline is not None and time.monotonic() > deadline:
      for p in procs:
        if p.poll() is None:
          os.killpg(p.pid, signal.SIGKILL)
    time.sleep(0.2)
  time.sleep(0.3)  # let the output threads drain
  if timed_out:
    print(f'error: the group did not finish within {timeout_s:g} s and was stopped', file=sys.stderr)
    return 124
  if first_failure is not None:
    i, c = first_failure
    how = f'was killed by signal {-c}' if c < 0 else f'exited with code {c}'
    print(f'error: process {i} {how}; the group was stopped', file=sys.stderr)
    return 1
  return 0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m hetjax.launch', description=__doc__.split('\n\n')[0],
      epilog='Everything after -- is the command each process runs.')
  parser.add_argument('-n', '--num_processes', type=int, required=True)
  parser.add_argument('--devices', default='1', help='CPU devices per process: N or N1,N2,...')
  parser.add_argument('--grace', type=float, default=45.0,
                      help='seconds the others get to exit after one process fails')
  parser.add_argument('--timeout', type=float, default=0,
                      help='stop the whole group after this many seconds (0: no limit)')
  parser.add_argument('--emulate', default='', help='cluster whose links to emulate (needs root)')
  parser.add_argument('--bandwidth_scale', type=float, default=1.0,
                      help='multiply the cluster\'s Gbit/s by this before shaping')
  args, rest = parser.parse_known_args(argv)
  if rest and rest[0] == '--':
    rest = rest[1:]
  if not rest:
    parser.error('give the command to run after --')
  if args.num_processes < 1:
    parser.error('-n must be at least 1')
  devices = parse_devices(args.devices, args.num_processes)
  if not args.emulate:
    return launch(rest, args.num_processes, devices, args.grace, timeout_s=args.timeout)
  from hetjax import netem
  from hetjax.errors import HetjaxError
  try:
    with netem.EmulatedNetwork.for_cluster(args.emulate, args.num_processes,
                                           args.bandwidth_scale) as network:
      return launch(rest, args.num_processes, devices, args.grace, network, args.timeout)
  except HetjaxError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2


if __name__ == '__main__':
  sys.exit(main())
