"""The Plan a training run executes: loaded from plan.json, or searched over a cluster now."""

from __future__ import annotations

import os

from hetjax.compression.codecs import make_codec
from hetjax.errors import HetjaxError
from hetjax.models.config import ModelConfig
from hetjax.plan import Plan


def training_plan(pcfg, tcfg, mcfg: ModelConfig, model_name: str, seed: int, print_fn=print) -> Plan:
  if pcfg.plan == 'search':
    plan = search_plan(pcfg, tcfg, mcfg, model_name, seed)
    print_fn(plan.table(_cluster(pcfg)))
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


def search_plan(pcfg, tcfg, mcfg: ModelConfig, model_name: str, seed: int) -> Plan:
  from hetjax.costmodel.training import TrainSetup
  from hetjax.search.planner import SearchConfig, plan_training
  bits = make_codec(pcfg.codec).bits
  setup = TrainSetup(global_batch=tcfg.batch_size, seq_len=tcfg.seq_len,
                     micro_batch_size=pcfg.micro_batch_size, schedule=pcfg.schedule,
                     activation_bits=min(bits, 16))
  search = SearchConfig(evaluations=pcfg.search_evaluations, population=30, screen_evaluations=30)
  return plan_training(_cluster(pcfg), mcfg, setup, search, seed=seed, model_name=model_name)
