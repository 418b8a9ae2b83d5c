"""Local multi-controller launcher: N processes, one coordinator, optional emulated slow links.

  python -m hetjax.launch -n 3 --devices=1,2,4 -- python run.py --config=configs/pipeline.py

Each process gets its own CPU device count (--devices, one number for all or one per process) and
the HETJAX_* variables that hetjax.distributed reads. Output lines are prefixed with [pN]; gloo's
per-rank "connected" chatter is dropped. Every line of every process is kept in <logs>/pN.log
(--logs; default <workdir>/launch when the command sets --config.workdir, else runs/launch-<time>).

Failures. The launcher polls each process's state (its heartbeat, from the OS) every 0.2 s. When a
process exits with an error, is killed, or stays frozen (SIGSTOP) for --stall seconds, the group
has failed: the process named is the first to go silent (not the first to exit: a frozen process
makes its healthy peers exit first). The others get --grace seconds, then are killed; their
follow-on errors (gloo/gRPC "peer lost" noise) go only to the logs, and the launcher prints one
summary line per failed process. Exit code: 2 if the first failure exited with 2 (bad input),
else 1; --timeout stops a group that runs too long (exit code 124).

--on_failure=replan: after a lost process (killed by a signal, or frozen; a crash signal such as
SIGSEGV or an exit with an error code is a bug and stops the job) the launcher restarts the job on
the remaining processes, renumbered 0..n-2, with HETJAX_LOST naming the original processes that are
gone; a training job then re-plans over the remaining devices with the training planner and resumes
from its last checkpoint (hetjax/modes/replan.py).

--emulate=CLUSTER runs each process in its own network namespace joined by veth links shaped to the
cluster's bandwidth matrix (see hetjax/netem.py); it needs root, and prints what it shaped.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

POLL_S = 0.2
CRASH_SIGNALS = {signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS, signal.SIGFPE, signal.SIGILL}
GLOO_CHATTER = re.compile(r'^\[Gloo\] Rank \d+ is connected to \d+ peer ranks')


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def parse_devices(spec: str, n: int) -> list[int]:
  try:
    counts = [int(x) for x in spec.split(',') if x.strip()]
  except ValueError:
    counts = []
  if len(counts) == 1:
    counts *= n
  if len(counts) != n or min(counts) < 1:
    raise SystemExit(f'error: --devices needs 1 or {n} positive counts, got {spec!r}')
  return counts


def os_state(pid: int) -> str:
  """The process's state letter from /proc ('R', 'S', 'T' stopped, 'Z', ...); '' if unknown."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[0]
  except (OSError, IndexError):
    return ''


def signal_name(sig: int) -> str:
  try:
    return signal.Signals(sig).name
  except ValueError:
    return f'signal {sig}'


class Member:
  """One launched process: its output (shown and logged), and when it was last seen alive."""

  def __init__(self, index: int, proc: subprocess.Popen, log_path: str, failing: threading.Event,
               group_failed, out=sys.stdout, err=sys.stderr):
    """group_failed(): whether any process of the group has exited with an error (checked before
    showing a line, so that peers' first reactions to a death are not shown either)."""
    self.index, self.proc, self.log_path, self.failing = index, proc, log_path, failing
    self.group_failed = group_failed
    self.log = open(log_path, 'w')
    self.lock = threading.Lock()
    self.last_alive = time.monotonic()
    self.stopped_since: float | None = None
    self.killed_by_launcher = False
    self.error = ''  # its own last `error:` line
    self.threads = [threading.Thread(target=self._forward, args=(stream, sink), daemon=True)
                    for stream, sink in ((proc.stdout, out), (proc.stderr, err))]
    for t in self.threads:
      t.start()

  def _forward(self, stream, sink) -> None:
    for line in iter(stream.readline, ''):
      if not line.endswith('\n'):  # a last line without one: keep the next writer's lines apart
        line += '\n'
      with self.lock:
        if self.log.closed:  # the launcher stopped waiting for this stream
          return
        self.log.write(line)
        self.log.flush()
      if line.startswith('error:'):
        self.error = line.strip()
      if GLOO_CHATTER.match(line):
        continue
      # After a failure only a process's own error lines are shown; the rest is peer-lost noise.
      if not self.failing.is_set() and self.group_failed():
        self.failing.set()
      if self.failing.is_set() and not line.startswith('error:'):
        continue
      sink.write(f'[p{self.index}] {line}')
      sink.flush()

  def poll(self, now: float) -> int | None:
    """Exit code or None; updates the liveness record."""
    code = self.proc.poll()
    if code is None:
      if os_state(self.proc.pid) in ('T', 't'):
        self.stopped_since = self.stopped_since or now
      else:
        self.stopped_since = None
        self.last_alive = now
    return code

  def kill(self) -> None:
    if self.proc.poll() is None:
      self.killed_by_launcher = True
      try:
        os.killpg(self.proc.pid, signal.SIGKILL)
      except ProcessLookupError:
        pass

  def close(self) -> None:
    for t in self.threads:
      t.join(timeout=10)  # a stream may stay open in a leftover grandchild: do not wait forever
    with self.lock:
      self.log.close()

  def was_lost(self, code: int | None) -> bool:
    """Lost, as a host is lost: frozen, or killed by a signal that is not a crash of its own
    (SIGKILL, SIGTERM, ...; not SIGSEGV, SIGABRT, SIGBUS, SIGFPE, SIGILL, which point at a bug)."""
    if self.stopped_since is not None and self.killed_by_launcher:
      return True
    return (not self.killed_by_launcher and code is not None and code < 0
            and -code not in CRASH_SIGNALS)

  def describe(self, code: int | None) -> str:
    if self.stopped_since is not None and self.killed_by_launcher:
      return 'was frozen (stopped, e.g. by SIGSTOP)'
    if self.killed_by_launcher:
      return 'was killed by the launcher'
    if code is not None and code < 0:
      return f'was killed by signal {-code} ({signal_name(-code)})'
    return f'exited with code {code}'


def default_logs(command: list[str]) -> str:
  for arg in command:
    if arg.startswith('--config.workdir='):
      return os.path.join(arg.split('=', 1)[1], 'launch')
  return os.path.join('runs', f'launch-{time.strftime("%Y%m%d-%H%M%S")}-{os.getpid()}')


def launch(command: list[str], n: int, devices: list[int], grace_s: float = 5.0,
           network=None, timeout_s: float = 0, stall_s: float = 10.0, logs: str = '',
           out=sys.stdout, err=sys.stderr, extra_env=None, lost: list | None = None) -> int:
  """Run `command` as n cooperating processes; returns the exit code for the group (see the
  module doc). timeout_s > 0 stops the whole group after that long (exit code 124). `extra_env`
  goes to every process; the failed process (the first to go silent) is appended to `lost` if it
  was lost (Member.was_lost), not if it exited with an error."""
  addresses = network.addresses if network else ['127.0.0.1'] * n
  coordinator = f'{addresses[0]}:{free_port()}'
  logs = logs or default_logs(command)
  os.makedirs(logs, exist_ok=True)
  failing = threading.Event()
  members = []
  group_failed = lambda: any(m.proc.poll() not in (None, 0) or os_state(m.proc.pid) in ('T', 't')
                             for m in list(members))
  for i in range(n):
    env = {**os.environ, 'HETJAX_COORDINATOR': coordinator, 'HETJAX_NUM_PROCESSES': str(n),
           'HETJAX_PROCESS_ID': str(i), 'JAX_PLATFORMS': 'cpu',
           'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices[i]}',
           'PYTHONUNBUFFERED': '1', **(extra_env or {})}
    argv = network.wrap(i, command) if network else command
    try:
      p = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, start_new_session=True)
    except OSError as e:   # e.g. no such program: nothing started stays behind
      for m in members:
        m.kill()
        m.proc.wait()
      print(f'error: cannot start {command[0]!r}: {e.strerror}', file=err)
      return 2
    members.append(Member(i, p, os.path.join(logs, f'p{i}.log'), failing, group_failed, out, err))
  try:
    return _supervise(members, logs, grace_s, timeout_s, stall_s, failing, err, lost)
  except BaseException:  # stopped (SIGTERM, Ctrl-C): the group goes too, then the clean-up above us
    for m in members:
      m.kill()
    for m in members:
      m.proc.wait()
    raise


def _supervise(members, logs, grace_s, timeout_s, stall_s, failing, err, lost) -> int:
  """Watch the group until it ends; its exit code (see `launch`)."""
  first, deadline, timed_out = None, None, False
  started = time.monotonic()
  while True:
    now = time.monotonic()
    codes = [m.poll(now) for m in members]
    if timeout_s and not timed_out and now - started > timeout_s:
      timed_out, deadline = True, now
    if first is None:
      down = [m for m, c in zip(members, codes) if c not in (None, 0)
              or (m.stopped_since is not None and now - m.stopped_since > stall_s)]
      if down:
        # The first to go silent: a frozen process stops beating before its peers exit.
        silent = [m for m, c in zip(members, codes) if c not in (None, 0) or m.stopped_since]
        first = min(silent, key=lambda m: m.last_alive)
        failing.set()
        for m in members:
          if m.stopped_since is not None:
            m.kill()  # a frozen process never exits by itself
        deadline = now + grace_s
    if all(c is not None for c in codes):
      break
    if deadline is not None and now > deadline:
      for m in members:
        m.kill()
    time.sleep(POLL_S)
  codes = [m.proc.wait() for m in members]
  for m in members:
    m.close()
  if timed_out:
    print(f'error: the group did not finish within {timeout_s:g} s and was stopped '
          f'(logs: {logs})', file=err)
    return 124
  if first is None:
    return 0
  code = codes[first.index]
  if lost is not None and first.was_lost(code):
    lost.append(first.index)
  own = f': {first.error}' if first.error else ''
  print(f'error: process {first.index} {first.describe(code)} and was the first to go silent'
        f'{own}; the group was stopped (logs: {logs})', file=err)
  for m, c in zip(members, codes):
    if m is not first and (c != 0 or m.killed_by_launcher):
      own = f'; its error: {m.error}' if m.error else ''
      print(f'  process {m.index} {m.describe(c)} after process {first.index} stopped{own}',
            file=err)
  return 2 if code == 2 else 1


def launch_replanning(command: list[str], devices: list[int], logs: str = '', err=sys.stderr,
                      **options) -> int:
  """launch(), and after each lost process (killed or frozen; not one that exited with an error,
  not a timeout) once more on the survivors, telling the job which of the original processes are
  gone (HETJAX_LOST) and how many devices each original process had (HETJAX_ORIGINAL_DEVICES)."""
  alive, gone = list(range(len(devices))), []
  logs = logs or default_logs(command)
  while True:
    lost = []
    attempt_logs = os.path.join(logs, f'replan{len(gone)}') if gone else logs
    env = {'HETJAX_LOST': ','.join(map(str, gone)),
           'HETJAX_ORIGINAL_DEVICES': ','.join(map(str, devices))}
    code = launch(command, len(alive), [devices[i] for i in alive], logs=attempt_logs, err=err,
                  extra_env=env, lost=lost, **options)
    if code in (0, 2, 124) or len(alive) == 1:
      return code
    if not lost:
      print('not replanning: the first process to stop failed by itself (an error exit or a crash '
            'signal: a bug, not a lost process)', file=err, flush=True)
      return code
    gone.append(alive.pop(lost[0]))
    print(f'replanning: original process {gone[-1]} is lost; restarting the job on processes '
          f'{", ".join(map(str, alive))} (as 0..{len(alive) - 1})', file=err, flush=True)


def describe_network(network, cluster: str, scale: float) -> str:
  """One line: what --emulate shaped."""
  rates = network.rates_mbit
  pairs = [(i, j) for i in range(network.n) for j in range(i + 1, network.n)]
  if len(pairs) <= 6:
    shaped = ', '.join(f'p{i}-p{j} {rates[i, j]:.0f}' for i, j in pairs)
  else:
    off = [rates[i, j] for i, j in pairs]
    shaped = f'{min(off):.0f}-{max(off):.0f}'
  return (f'emulating {cluster}: {network.n} network namespaces, each pair of processes on its own '
          f'link shaped with tc tbf to {shaped} Mbit/s (bandwidth x{scale:g}); latency is '
          f'emulated in user space by the transport (not by the kernel)')


def launch_emulated(command: list[str], args, devices: list[int], options: dict) -> int:
  """--emulate: shaped links (netem), per-process CPU quotas (testbed) and the one-way delays that
  the transport waits in user space (HETJAX_LINK_DELAY_MS, read by hetjax.parallel.emulated_link)."""
  import json
  from hetjax import netem, testbed
  from hetjax.cluster import get_cluster
  from hetjax.errors import HetjaxError
  n = args.num_processes
  try:
    cluster = get_cluster(args.emulate)
    cpus = args.cpus or len(os.sched_getaffinity(0))
    shares = testbed.plan_quotas(testbed.host_speeds(cluster, n), cpus,
                                 sorted(os.sched_getaffinity(0)))
    delays = testbed.host_delays_ms(cluster, n)
    with netem.EmulatedNetwork.for_cluster(args.emulate, n, args.bandwidth_scale) as network, \
        testbed.ComputeQuotas(shares) as quotas:
      bed = testbed.Testbed(network, quotas, delays)
      print(describe_network(network, args.emulate, args.bandwidth_scale), flush=True)
      print(f'emulating {args.emulate} compute: {cpus:g} cores shared in proportion to device speed',
            flush=True)
      print(bed.table(), flush=True)
      os.environ['HETJAX_LINK_DELAY_MS'] = json.dumps(delays.tolist())
      start = time.monotonic()
      try:
        return launch(command, n, devices, network=bed, **options)
      finally:
        os.environ.pop('HETJAX_LINK_DELAY_MS', None)
        print(bed.usage_table(time.monotonic() - start), flush=True)
  except HetjaxError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m hetjax.launch', description=__doc__.split('\n\n')[0],
      epilog='Everything after -- is the command each process runs.')
  parser.add_argument('-n', '--num_processes', type=int, required=True)
  parser.add_argument('--devices', default='1', help='CPU devices per process: N or N1,N2,...')
  parser.add_argument('--grace', type=float, default=5.0,
                      help='seconds the others get to exit after one process fails')
  parser.add_argument('--stall', type=float, default=10.0,
                      help='a process frozen (stopped) this many seconds has failed')
  parser.add_argument('--timeout', type=float, default=0,
                      help='stop the whole group after this many seconds (0: no limit)')
  parser.add_argument('--logs', default='',
                      help='folder for each process\'s full output (default: <workdir>/launch)')
  parser.add_argument('--on_failure', choices=['stop', 'replan'], default='stop',
                      help='replan: when a process is lost, restart the job on the others '
                           '(it re-plans and resumes from its last checkpoint)')
  parser.add_argument('--emulate', default='', help='cluster whose links to emulate (needs root)')
  parser.add_argument('--bandwidth_scale', type=float, default=1.0,
                      help='multiply the cluster\'s Gbit/s by this before shaping')
  parser.add_argument('--cpus', type=float, default=0,
                      help='with --emulate: total CPU cores shared out as per-process quotas in '
                           'proportion to device speed (default: all cores this launcher may use)')
  args, rest = parser.parse_known_args(argv)
  # SIGTERM unwinds like Ctrl-C, so the group is stopped and namespaces and cgroups are removed.
  signal.signal(signal.SIGTERM, lambda sig, frame: sys.exit(128 + sig))
  if rest and rest[0] == '--':
    rest = rest[1:]
  elif rest and rest[0].startswith('-'):
    parser.error(f'unknown option {rest[0]} (the command to run goes after --)')
  if not rest:
    parser.error('give the command to run after --')
  if not 1 <= args.num_processes <= 1024:
    parser.error('-n must be in 1..1024')
  devices = parse_devices(args.devices, args.num_processes)
  options = dict(grace_s=args.grace, timeout_s=args.timeout, stall_s=args.stall, logs=args.logs)
  if args.on_failure == 'replan':
    if args.emulate:
      parser.error('--on_failure=replan does not combine with --emulate')
    return launch_replanning(rest, devices, **options)
  if not args.emulate:
    return launch(rest, args.num_processes, devices, **options)
  return launch_emulated(rest, args, devices, options)

if __name__ == '__main__':
  sys.exit(main())
