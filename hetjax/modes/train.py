"""mode=train: train on the shipped corpus, on one device or through the pipeline runtime over a
Plan (--config.pipeline.plan), then (if generate.max_new_tokens > 0) print a sample."""

import dataclasses
import os

import jax
import numpy as np
from flax import nnx

from hetjax.checkpoint.manager import load_model
from hetjax.compression.codecs import make_codec
from hetjax.data import ByteTokenizer
from hetjax.distributed import is_leader, lost_processes
from hetjax.errors import HetjaxError
from hetjax.models.config import model_config_from
from hetjax.modes.generate import parse_prompt, sample
from hetjax.train import train


def pipeline_state_factory(cfg, mcfg, workdir):
  """make_state for hetjax.train.train that runs the configured Plan, or None for one device."""
  pcfg = cfg.get('pipeline')
  if pcfg is None or not pcfg.plan:
    return None
  from hetjax.parallel.exchange import DevicePutTransport, PairPermuteTransport
  from hetjax.parallel.pipeline import Pipeline
  from hetjax.modes.planning import training_plan
  from hetjax.parallel.trainer import PipelineTrainState
  say = print if is_leader() else (lambda *a, **k: None)
  plan = training_plan(pcfg, cfg.train, mcfg, cfg.model, cfg.seed, say,
                       workdir).check_model(cfg.model)
  if lost_processes():
    plan = replan_over_processes(plan)
    say(f're-planned over the {jax.process_count()} remaining processes:\n{plan.table()}')
  if is_leader():
    plan.save(os.path.join(workdir, 'plan.json'))
  transports = {'device_put': DevicePutTransport, 'pair': PairPermuteTransport}
  from hetjax.parallel.emulated_link import with_environment  # launcher --emulate: user-space latency
  transports = {k: with_environment(v, say) for k, v in transports.items()}
  kind = pcfg.transport if pcfg.transport != 'auto' else (
      'pair' if jax.process_count() > 1 else 'device_put')
  if kind not in transports:
    raise HetjaxError(f"pipeline.transport must be 'auto', 'device_put' or 'pair', got {pcfg.transport!r}")
  codec, grad_codec = make_codec(pcfg.codec, cfg.get('aqsgd')), make_codec(pcfg.grad_codec)

  stateful = any(getattr(c, 'stateful', False) for c in (codec, grad_codec))

  def make_state(model, data, seed):
    store, warmup = None, 0
    if stateful:  # AQ-SGD: buffers for every training sample, placed as cfg.aqsgd says
      from hetjax.compression.buffers import from_config
      store = from_config(cfg.aqsgd, data.num_samples, workdir, say)
      warmup = cfg.aqsgd.warmup_epochs
    pipe = Pipeline(plan, mcfg, cfg.train, codec=codec, grad_codec=grad_codec,
                    transport=transports[kind](), init_state=nnx.state(model), buffers=store,
                    warmup_epochs=warmup)
    return PipelineTrainState(pipe, model, data, seed, profile_every=pcfg.profile_every)
  return make_state


def replan_over_processes(plan):
  """The plan re-made for the processes this job has (after a lost one): one stage per process on
  all its devices, layers split evenly, one replica taking the same batch (so the same data
  order). This is an even split, not a search over the remaining devices."""
  from hetjax.plan import Replica, Stage
  devices = jax.devices()
  owned = [[i for i, d in enumerate(devices) if d.process_index == p]
           for p in range(jax.process_count())]
  cuts = [int(c[0]) for c in np.array_split(np.arange(plan.num_layers), len(owned))] + [plan.num_layers]
  stages = [Stage(cuts[p], cuts[p + 1], owned[p]) for p in range(len(owned))]
  return dataclasses.replace(plan, replicas=[Replica(stages)], micro_batches=plan.micro_batches * plan.dp,
                             cluster='', prediction={}, search={})


def record_replan(workdir: str) -> None:
  """One metrics.jsonl row for a restart after a lost process: who was lost, the new plan's
  stages [start, end, devices], the checkpoint the job resumes from and how many logged steps it
  redoes (from the newest checkpoint; one found damaged on restore makes that an underestimate)."""
  from hetjax.checkpoint.manager import Checkpointer, is_checkpoint
  from hetjax.metrics import MetricsLog
  from hetjax.plan import Plan
  log, directory = MetricsLog(workdir), os.path.join(workdir, 'checkpoints')
  resumed = Checkpointer(directory, read_only=True).latest_step() if is_checkpoint(directory) else 0
  logged = max([r['step'] for r in log.read() if 'loss' in r], default=0)
  stages = Plan.load(os.path.join(workdir, 'plan.json')).replicas[0].stages
  log.log(resumed, event='replan', lost_processes=lost_processes(), processes=jax.process_count(),
          resumed_from=resumed, steps_redone=logged - resumed,
          plan=[[s.start, s.end, list(s.devices)] for s in stages])


def run(cfg, workdir: str) -> None:
  mcfg = model_config_from(cfg)
  init_model = None
  if cfg.get('init_from'):  # fine-tuning: the checkpoint's architecture replaces the preset
    init_model, _ = load_model(cfg.init_from)
    mcfg = init_model.cfg
  gcfg = cfg.get('generate')
  if gcfg is not None and gcfg.max_new_tokens > 0:
    parse_prompt(gcfg)  # a bad prompt fails now, not after training
  if is_leader():
    source = f'from {cfg.init_from}' if init_model is not None else cfg.model
    print(f'model {source}: {mcfg.num_params():,} parameters; workdir {workdir}')
  make_state = pipeline_state_factory(cfg, mcfg, workdir)
  if lost_processes() and is_leader():
    record_replan(workdir)
  state = train(mcfg, cfg.train, workdir, seed=cfg.seed, ckpt_cfg=cfg.get('ckpt'),
                resume=cfg.get('resume'), make_state=make_state,
                corpus=cfg.data.path if 'data' in cfg else None, init_model=init_model)
  if make_state is not None:
    state.write_timeline(workdir)
  if gcfg is not None and gcfg.max_new_tokens > 0:
    if is_leader():
      print(f'--- sample ({gcfg.max_new_tokens} tokens, compiling first) ---', flush=True)
    if jax.process_count() == 1:
      ids = sample(state.model(), gcfg, cfg.seed)
    else:
      ids = sample_over_plan(state, gcfg, cfg.seed)
    if is_leader():
      print(gcfg.prompt + ByteTokenizer().decode(ids[0]))


def sample_over_plan(state, gcfg, seed: int):
  """A sample after a multi-controller run: generation over replica 0 of the training plan, each
  stage where it trained (no process holds the whole model)."""
  from hetjax.inference.engine import ServeEngine
  from hetjax.parallel.exchange import PairPermuteTransport
  pipe = state.pipe
  plan = dataclasses.replace(pipe.plan, kind='serve', replicas=[pipe.plan.replicas[0]])
  engine = ServeEngine(plan, pipe.cfg, pipe.stage_params(), transport=PairPermuteTransport())
  return engine.generate(parse_prompt(gcfg), gcfg.max_new_tokens, temperature=gcfg.temperature,
                         top_k=gcfg.top_k, top_p=gcfg.top_p, seed=seed)
