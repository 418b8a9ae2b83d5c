"""Re-planning a training job after a lost process (`hetjax.launch --on_failure=replan`): the
training planner searches the cluster without the lost processes' devices.

The new plan keeps the run's global batch (train.batch_size) and micro-batch size, so every step
reads the same sequences as before the loss; only the plan changes. Process 0 searches and sends the
plan to the others (a probed cluster differs between processes, so each searching for itself
could disagree)."""

from __future__ import annotations

import json

from hetjax.cluster import Cluster, get_cluster
from hetjax.costmodel.training import TrainSetup
from hetjax.errors import HetjaxError
from hetjax.models.config import ModelConfig
from hetjax.plan import Plan
from hetjax.search.planner import SearchConfig, plan_training


def surviving_devices(counts: list[int], lost: list[int]) -> list[list[int]]:
  """Per surviving original process (in order), its devices' original global ids; devices are
  numbered process by process (counts: devices per original process)."""
  starts = [sum(counts[:p]) for p in range(len(counts))]
  return [list(range(starts[p], starts[p] + counts[p])) for p in range(len(counts)) if p not in lost]


def replan_setup(plan: Plan, tcfg) -> TrainSetup:
  """The old plan's workload: same global batch, micro-batch size, schedule and wire precision."""
  return TrainSetup(global_batch=tcfg.batch_size, seq_len=tcfg.seq_len,
                    micro_batch_size=plan.micro_batch_size, schedule=plan.schedule,
                    activation_bits=plan.activation_bits, recompute=True)  # as the runtime


def search_replan(cluster: Cluster, plan: Plan, mcfg: ModelConfig, tcfg, model_name: str,
                  seed: int, evaluations: int = 300) -> Plan:
  """The planner's plan over `cluster` (the survivors' devices, numbered as the restarted job
  numbers them) for the old plan's workload. Seeded: the same inputs give the same plan."""
  setup = replan_setup(plan, tcfg)
  search = SearchConfig(evaluations=evaluations, population=30, screen_evaluations=30)
  new = plan_training(cluster, mcfg, setup, search, seed=seed, model_name=model_name)
  batch = new.micro_batches * new.dp * new.micro_batch_size
  if batch != tcfg.batch_size:  # the planner splits global_batch exactly; keep the data order
    raise HetjaxError(f're-plan takes {batch} sequences per step, the run takes {tcfg.batch_size}')
  return new


def named_cluster(pcfg, plan: Plan, num_devices: int, say=print) -> Cluster | None:
  """The cluster the job was planned for (pipeline.cluster with plan=search, else the plan's own),
  if it names one that describes all `num_devices` devices of the original job; else None."""
  name = pcfg.cluster if pcfg.plan == 'search' else plan.cluster
  if not name or name == 'local':
    return None
  try:
    cluster = get_cluster(name)
  except HetjaxError as e:
    say(f're-plan: cannot use the plan\'s cluster ({e}); probing the remaining devices instead')
    return None
  if cluster.n != num_devices:
    say(f're-plan: cluster {name!r} has {cluster.n} devices but the job had {num_devices}; '
        'probing the remaining devices instead')
    return None
  return cluster


def replan_after_loss(plan: Plan, pcfg, tcfg, mcfg: ModelConfig, model_name: str, seed: int,
                      original_counts: list[int], lost: list[int], say=print) -> Plan:
  """The plan for this restarted job (run on every process; process 0 searches, the others
  receive its plan). original_counts: devices per original process (the launcher's
  HETJAX_ORIGINAL_DEVICES); lost: the original processes that are gone."""
  import jax
  from hetjax.cluster import probe_tflops, processes_cluster
  from hetjax.distributed import gather_text, leader_text
  survivors = surviving_devices(original_counts, lost)
  mine = [d for d in jax.devices() if d.process_index == jax.process_index()]
  if len(survivors) != jax.process_count() or len(survivors[jax.process_index()]) != len(mine):
    raise HetjaxError(f'the restarted job has {jax.process_count()} processes with '
                      f'{jax.local_device_count()} devices here; the launcher said the survivors own '
                      f'{[len(s) for s in survivors]}')
  cluster = named_cluster(pcfg, plan, sum(original_counts), say)
  if cluster is None:  # probe: each process its own devices, shared with all
    tflops = [json.loads(t) for t in gather_text('replan/tflops', json.dumps(probe_tflops(mine)))]
    kind = 'CPU' if mine[0].platform == 'cpu' else 'H100-SXM'
    cluster = processes_cluster(tflops, kind)
  else:
    name = f'{cluster.name}-without-p' + '-p'.join(map(str, lost))
    cluster = cluster.subset([d for s in survivors for d in s], name)
  make = lambda: search_replan(cluster, plan, mcfg, tcfg, model_name, seed,
                               pcfg.search_evaluations).to_json()
  return Plan.from_json(leader_text('replan/plan', make))
