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


def original_device_counts() -> list[int]:
  """Devices per original process of the job (HETJAX_ORIGINAL_DEVICES, e.g. '2,2,4', set by
  `hetjax.launch --on_failure=replan`); empty if not set."""
  counts = os.environ.get('HETJAX_ORIGINAL_DEVICES', '')
  return [int(x) for x in counts.split(',') if x]


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


def _client():
  from jax._src import distributed
  return distributed.global_state.client


def gather_text(name: str, text: str) -> list[str]:
  """Every process's `text`, in process order, on every process (the coordinator's key-value store;
  `name` unique per use)."""
  client = _client()
  if client is None:
    return [text]
  client.key_value_set(f'hetjax/{name}/{jax.process_index()}', text)
  return [client.blocking_key_value_get(f'hetjax/{name}/{p}', BARRIER_TIMEOUT_S * 1000)
          for p in range(jax.process_count())]


def leader_text(name: str, make) -> str:
  """make() run on process 0 only; its string on every process (`name` unique per use)."""
  client = _client()
  if client is None:
    return make()
  if is_leader():
    text = make()
    client.key_value_set(f'hetjax/{name}', text)
    return text
  return client.blocking_key_value_get(f'hetjax/{name}', BARRIER_TIMEOUT_S * 1000)


def forget_text(name: str, leader: bool = False) -> None:
  """Deletes this process's key of gather_text(name), or with `leader` process 0's key of
  leader_text(name) (on process 0 only). Call it only once every process has read it."""
  client = _client()
  if client is None or (leader and not is_leader()):
    return
  client.key_value_delete(f'hetjax/{name}' if leader else f'hetjax/{name}/{jax.process_index()}')
