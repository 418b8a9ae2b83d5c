"""The Plan a training run executes: loaded from plan.json, or searched over a cluster now."""

from __future__ import annotations

import os

from hetjax.compression.codecs import make_codec
from hetjax.errors import HetjaxError
from hetjax.models.config import ModelConfig
from hetjax.plan import Plan


def training_plan(pcfg, tcfg, mcfg: ModelConfig, model_name: str, seed: int, print_fn=print,
                  workdir: str = '') -> Plan:
  if pcfg.plan == 'search':
    cluster = _cluster(pcfg)
    if pcfg.get('calibrate'):
      cluster = calibrate_now(pcfg, tcfg, mcfg, cluster, seed, print_fn, workdir)
    plan = search_plan(pcfg, tcfg, mcfg, model_name, seed, cluster)
    print_fn(plan.table(cluster))
  else:
    if not os.path.isfile(pcfg.plan):
      raise HetjaxError(f'plan file not found: {pcfg.plan}')
    plan = Plan.load(pcfg.plan)
    print_fn(plan.table())
  plan.validate(model=mcfg)
  if plan.kind != 'train':
    raise HetjaxError(f'{pcfg.plan}: a {plan.kind!r} plan cannot drive training')
  batch = plan.micro_batches * plan.dp * plan.micro_batch_size
  if batch != tcfg.batch_size:
    raise HetjaxError(f'the plan takes {plan.micro_batches} micro-batches x {plan.dp} replicas x '
                      f'{plan.micro_batch_size} = {batch} sequences per step; set '
                      f'--config.train.batch_size={batch}')
  return plan


def _cluster(pcfg):
  from hetjax.cluster import get_cluster
  return get_cluster(pcfg.cluster)


def calibrate_now(pcfg, tcfg, mcfg: ModelConfig, base, seed: int, print_fn, workdir: str):
  """--config.pipeline.calibrate: measure this run's devices at its shapes (hetjax.modes.calibrate)
  and return that cluster (written to <workdir>/calibrated_cluster.json). Multi-controller: one
  device per process, standing for the first device of each of the cluster's hosts; one process:
  the first base.n local devices, one per cluster device."""
  import jax
  from hetjax.cluster import Cluster
  from hetjax.metrics import write_json
  from hetjax.modes.calibrate import measure
  if jax.process_count() > 1:
    devices = [next(d for d in jax.devices() if d.process_index == p)
               for p in range(jax.process_count())]
    ids = [h[0] for h in base.hosts().values()][:len(devices)]
  else:
    devices, ids = jax.local_devices()[:base.n], list(range(base.n))
  if len(ids) != len(devices):
    raise HetjaxError(f'pipeline.calibrate: cluster {base.name!r} has {base.n} devices on '
                      f'{len(base.hosts())} hosts; this run measures {len(devices)} '
                      f'(one per process, or the local devices of one process)')
  found = measure(mcfg, pcfg.micro_batch_size, tcfg.seq_len, 3, (64 * 1024, 1 << 20), devices,
                  base, ids, seed, print_fn, f'calibrated_{base.name}')
  if workdir and jax.process_index() == 0:
    write_json(os.path.join(workdir, 'calibrated_cluster.json'), found)
    print_fn(f'wrote {os.path.join(workdir, "calibrated_cluster.json")}; planning over it')
  return Cluster.from_dict(found)


def search_plan(pcfg, tcfg, mcfg: ModelConfig, model_name: str, seed: int, cluster=None) -> Plan:
  from hetjax.costmodel.training import TrainSetup, efficiency_for
  from hetjax.search.planner import SearchConfig, plan_training
  cluster = cluster or _cluster(pcfg)
  bits = make_codec(pcfg.codec).bits
  setup = TrainSetup(global_batch=tcfg.batch_size, seq_len=tcfg.seq_len,
                     micro_batch_size=pcfg.micro_batch_size, schedule=pcfg.schedule,
                     efficiency=efficiency_for(cluster), act_bytes=4 if bits >= 32 else 2,
                     activation_bits=min(bits, 16), recompute=True)  # as the runtime's backward
  search = SearchConfig(evaluations=pcfg.search_evaluations, population=30, screen_evaluations=30)
  return plan_training(cluster, mcfg, setup, search, seed=seed, model_name=model_name)
