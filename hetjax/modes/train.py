"""mode=train: train on the shipped corpus, on one device or through the pipeline runtime over a
Plan (--config.pipeline.plan), then (if generate.max_new_tokens > 0) print a sample."""

import dataclasses
import os

import jax
from flax import nnx

from hetjax.checkpoint.manager import load_model
from hetjax.compression.codecs import make_codec
from hetjax.data import ByteTokenizer
from hetjax.distributed import is_leader, lost_processes, original_device_counts
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
  from hetjax.parallel.socket_transport import SocketTransport
  from hetjax.modes.planning import training_plan
  from hetjax.parallel.replicas import make_pipeline, train_state  # heterogeneous replicas too
  say = print if is_leader() else (lambda *a, **k: None)
  plan = training_plan(pcfg, cfg.train, mcfg, cfg.model, cfg.seed, say,
                       workdir).check_model(cfg.model)
  if lost_processes():
    from hetjax.modes.replan import replan_after_loss
    plan = replan_after_loss(plan, pcfg, cfg.train, mcfg, cfg.model, cfg.seed,
                             original_device_counts(), lost_processes(), say).check_model(cfg.model)
    say(f're-planned over the {jax.process_count()} remaining processes:\n{plan.table()}')
  if is_leader():
    plan.save(os.path.join(workdir, 'plan.json'))
  transports = {'device_put': DevicePutTransport, 'pair': PairPermuteTransport,
                'socket': SocketTransport}
  from hetjax.parallel.emulated_link import with_environment  # launcher --emulate: user-space latency
  transports = {k: with_environment(v, say) for k, v in transports.items()}
  kind = pcfg.transport if pcfg.transport != 'auto' else (
      'socket' if jax.process_count() > 1 else 'device_put')
  if kind not in transports:
    raise HetjaxError(f"pipeline.transport must be 'auto', 'device_put', 'pair' or 'socket', got "
                      f"{pcfg.transport!r}")
  codec, grad_codec = make_codec(pcfg.codec, cfg.get('aqsgd')), make_codec(pcfg.grad_codec)
  grad_bits = dp_grad_bits(cfg)
  if grad_bits and plan.dp == 1:
    say(f'note: dp.grad_bits={grad_bits} has no effect: the plan has one data-parallel replica')

  stateful = any(getattr(c, 'stateful', False) for c in (codec, grad_codec))

  def make_state(model, data, seed):
    store, warmup = None, 0
    if stateful:  # AQ-SGD: buffers for every training sample, placed as cfg.aqsgd says
      from hetjax.compression.buffers import from_config
      store = from_config(cfg.aqsgd, data.num_samples, workdir, say)
      warmup = cfg.aqsgd.warmup_epochs
    pipe = make_pipeline(plan, mcfg, cfg.train, codec=codec, grad_codec=grad_codec,
                         transport=transports[kind](), init_state=nnx.state(model), buffers=store,
                         warmup_epochs=warmup, grad_bits=grad_bits)
    return train_state(pipe, model, data, seed, profile_every=pcfg.profile_every)
  return make_state


def dp_grad_bits(cfg) -> int:
  """--config.dp.grad_bits, checked: 0 (fp32 all-reduce) or 2, 4, 8 (compressed)."""
  bits = cfg.dp.grad_bits if 'dp' in cfg else 0
  if bits:
    from hetjax.compression.grad import check
    from hetjax.parallel.dp_grads import BUCKET
    check(bits, BUCKET)
  return bits


def record_replan(workdir: str) -> None:
  """One metrics.jsonl row for a restart after a lost process: who was lost, the new plan (replica
  0's stages [start, end, devices], its replica count, the cluster it was searched over and its
  predicted step time), the checkpoint the job resumes from and how many logged steps it
  redoes (from the newest checkpoint; one found damaged on restore makes that an underestimate)."""
  from hetjax.checkpoint.manager import Checkpointer, is_checkpoint
  from hetjax.metrics import MetricsLog
  from hetjax.plan import Plan
  log, directory = MetricsLog(workdir), os.path.join(workdir, 'checkpoints')
  resumed = Checkpointer(directory, read_only=True).latest_step() if is_checkpoint(directory) else 0
  logged = max([r['step'] for r in log.read() if 'loss' in r], default=0)
  plan = Plan.load(os.path.join(workdir, 'plan.json'))
  log.log(resumed, event='replan', lost_processes=lost_processes(), processes=jax.process_count(),
          resumed_from=resumed, steps_redone=logged - resumed,
          plan=[[s.start, s.end, list(s.devices)] for s in plan.replicas[0].stages],
          replicas=plan.dp, cluster=plan.cluster,
          predicted_step_s=plan.prediction.get('total'))


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
  if dp_grad_bits(cfg) and not (cfg.get('pipeline') and cfg.pipeline.plan) and is_leader():
    print(f'note: dp.grad_bits={cfg.dp.grad_bits} has no effect on one device '
          f'(it compresses the pipeline\'s data-parallel gradients)')
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
