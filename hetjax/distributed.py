"""Multi-controller JAX start-up: one process per host, joined by jax.distributed.

`hetjax.launch` sets HETJAX_COORDINATOR / HETJAX_NUM_PROCESSES / HETJAX_PROCESS_ID for local runs.
On a real cluster leave them unset: under SLURM or Open MPI `jax.distributed.initialize()` reads the
scheduler's variables itself. CPU runs use gloo collectives.
"""

from __future__ import annotations

import os

import jax

HEARTBEAT_TIMEOUT_S = 20  # a dead peer is noticed within about this long


def lost_processes() -> list[int]:
  """Processes an earlier attempt of this job lost (`hetjax.launch --on_failure=replan` restarts
  the job without them and says so in HETJAX_LOST, e.g. '2' or '2,0'); empty on a first attempt."""
  lost = os.environ.get('HETJAX_LOST', '')
  return [int(x) for x in lost.split(',') if x]


def launched() -> bool:
  return 'HETJAX_NUM_PROCESSES' in os.environ


def on_cluster_scheduler() -> bool:
  return 'SLURM_JOB_ID' in os.environ or 'OMPI_COMM_WORLD_SIZE' in os.environ


def initialize() -> bool:
  """Join the other processes if this one was launched as part of a group; returns whether it did."""
  if not (launched() or on_cluster_scheduler()):
    return False
  if os.environ.get('JAX_PLATFORMS', '').startswith('cpu') or not _has_gpu():
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if launched():
    jax.distributed.initialize(
        coordinator_address=os.environ['HETJAX_COORDINATOR'],
        num_processes=int(os.environ['HETJAX_NUM_PROCESSES']),
        process_id=int(os.environ['HETJAX_PROCESS_ID']),
        heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S, initialization_timeout=120)
  else:
    jax.distributed.initialize(heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S)
  return True


def _has_gpu() -> bool:
  try:
    import importlib.util
    return importlib.util.find_spec('jax_cuda13_plugin') is not None or \
        importlib.util.find_spec('jax_cuda12_plugin') is not None
  except Exception:  # pragma: no cover
    return False


BARRIER_TIMEOUT_S = 1800  # a checkpoint of a large stage may take this long to write


def barrier(name: str) -> None:
  """Wait until every process reaches the barrier `name` (unique per use). The coordinator's
  barrier, not a device collective: it works with any number of devices per process."""
  from jax._src import distributed
  client = distributed.global_state.client
  if client is not None:
    client.wait_at_barrier(name, timeout_in_ms=BARRIER_TIMEOUT_S * 1000)


def is_leader() -> bool:
  """Process 0 writes the run's files (metrics, plan, config)."""
  return jax.process_index() == 0
