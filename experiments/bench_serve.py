"""Serving benchmarks: decode vs Hugging Face and the memory roofline, pipelined decode, plans measured vs predicted.

Reproduces: no paper table; issue 10's section 4 (predicted vs measured per-batch decode latency of
serve plans) and section 6 (bench_serve) on this machine, with one small GPT-2-shaped model:
  a. single-device decode tokens/s of hetjax (inference/generate.py) vs Hugging Face transformers
     (torch CPU) with the same weights (a random HF model converted by checkpoint/hf.py), prompt
     128, 32 new tokens, batch 1 and 16, timed alternately; the ratio;
  b. decode vs the memory roofline: bytes of weights + KV cache read per step / this machine's
     copy bandwidth (numpy and jax copies, read + write bytes), over the measured step time;
  c. pipelined decode: S stages on S devices with M = S request groups in flight vs one device
     (ServeEngine), throughput ratio, next to the cost model's prediction;
  d. serving: tokens/s and p99 latency of the HexGen plan (search/hexgen.py, what mode=plan_inference
     runs) vs the symmetric plan on the same devices (inference/serving.Server, Poisson arrivals;
     with --clock=cpu every request arrives at 0);
  e. predicted vs measured per-batch decode latency of serve plans (1-3 stages, TP 1/2/4, batch 1
     and 8), the cost model calibrated once by a matmul probe (compute) and the copy probe (memory).
  f. continuous batching (inference/serving.ContinuousServer) with slot prefill (a refilled slot's
     prompt in one go) against one prompt token per step: time to first token and tokens/s of the
     same requests over one 2-stage plan, alternating; with --clock=cpu every request arrives at 0.
  g. (a GPU, experiments/gpu_serve_check.sh) decode tokens/s of --gpu_models at --gpu_batches with
     the stages colocated on the one GPU, the fraction of the HBM roofline, and the pipelined-decode
     ratio (2 colocated stages, 2 groups, vs 1 stage).
JAX's 8 CPU devices here are threads sharing this machine's cores, which the cost model knows
(costmodel/inference.SHARED_COMPUTE): TP and pipelining cannot add compute on one CPU. The GPU
checks are in experiments/gpu_serve_check.sh.

  python experiments/bench_serve.py                          # ~5-10 minutes on 2 loaded CPU cores
  python experiments/bench_serve.py --parts=a,b --batches=1,16

Writes bench_serve.csv (one row per measurement, column `part`) and bench_serve.png, prints the
tables last. Timings exclude compilation (one warm-up per shape) and keep the best of --repeats.
"""

import os
import sys

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import print_table, save_figure, wrote, write_csv  # (sets sys.path)
from absl import app, flags

import dataclasses
import tempfile
import time

import numpy as np

flags.DEFINE_string('out', 'runs/bench_serve/', 'Output folder (bench_serve.csv, bench_serve.png).')
flags.DEFINE_list('parts', ['a', 'b', 'c', 'd', 'e', 'f'], 'Which benchmarks to run (a-f, and g on a GPU; see the docstring).')
flags.DEFINE_integer('layers', 6, 'Model blocks (GPT-2 family).')
flags.DEFINE_integer('hidden', 512, 'Model width (heads of 64).')
flags.DEFINE_integer('vocab', 8192, 'Vocabulary size.')
flags.DEFINE_integer('prompt_len', 128, 'Prompt tokens.')
flags.DEFINE_integer('new_tokens', 32, 'Generated tokens per request.')
flags.DEFINE_list('batches', ['1', '16'], 'Batch sizes of parts a and b.')
flags.DEFINE_list('stages', ['2', '4'], 'Part c: pipeline depths S (M = S groups).')
flags.DEFINE_integer('group_batch', 4, 'Part c: requests per group.')
flags.DEFINE_integer('requests', 16, 'Part d: requests served per plan.')
flags.DEFINE_float('rate', 2.0, 'Part d: Poisson arrival rate (requests/s).')
flags.DEFINE_integer('serve_devices', 4, 'Part d: CPU devices the plans may use.')
flags.DEFINE_integer('serve_tokens', 16, 'Parts d and e: new tokens per request.')
flags.DEFINE_integer('serve_prompt', 32, 'Parts d and e: prompt tokens.')
flags.DEFINE_integer('repeats', 2, 'Timed runs per point (the best is kept).')
flags.DEFINE_integer('torch_threads', 1, 'Threads of torch (0: its default). On this loaded 2-core machine 1 thread was\n'
                     '~7x faster than 2 for transformers decode.')
flags.DEFINE_list('gpu_models', ['gpt2_medium', 'llama2_7b'], 'Part g: model presets (random bf16 weights).')
flags.DEFINE_list('gpu_batches', ['1', '16', '64'], 'Part g: decode batch sizes.')
flags.DEFINE_bool('gpu_on_cpu', False, 'Part g on CPU devices (a smoke test of the GPU script).')
flags.DEFINE_integer('seed', 0, 'Seed of weights, prompts and arrivals.')
flags.DEFINE_enum('clock', 'wall', ['wall', 'cpu'],
                  'Parts d, e, f and the link probe: "wall" times; or "cpu": the process pinned to one core and\n'
                  'timed in CPU seconds (its wall time on an idle core), for a machine shared with other jobs.')
FLAGS = flags.FLAGS


def say(msg):
  print(msg, flush=True)


def best_of(fn, repeats):
  fn()   # warm-up (compilation)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return min(times)


# ------------------------------------------------------------------ the model, in both libraries
def make_models(workdir, need_hf=True):
  """A random Hugging Face GPT-2, and the same weights in hetjax via checkpoint/hf.import_hf; or,
  where no part compares with transformers, (None, a random hetjax GPT-2 of the same shape)."""
  if not need_hf:
    from hetjax.models.config import get_model_config
    from hetjax.models.model import build_model
    h = FLAGS.hidden
    cfg = get_model_config('tiny_gpt', num_layers=FLAGS.layers, hidden=h, num_heads=h // 64,
                           num_kv_heads=h // 64, ffn=4 * h, vocab_size=FLAGS.vocab, norm_eps=1e-5,
                           max_len=max(256, FLAGS.prompt_len + FLAGS.new_tokens))
    return None, build_model(cfg, FLAGS.seed)
  import torch
  import transformers
  from hetjax.checkpoint import hf
  from hetjax.checkpoint.manager import load_model
  torch.manual_seed(FLAGS.seed)
  if FLAGS.torch_threads:
    torch.set_num_threads(FLAGS.torch_threads)
  hf_model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
      n_layer=FLAGS.layers, n_embd=FLAGS.hidden, n_head=FLAGS.hidden // 64, vocab_size=FLAGS.vocab,
      n_positions=max(256, FLAGS.prompt_len + FLAGS.new_tokens), layer_norm_epsilon=1e-5,
      bos_token_id=0, eos_token_id=0)).eval()
  src, dst = os.path.join(workdir, 'hf'), os.path.join(workdir, 'hetjax')
  hf_model.save_pretrained(src)
  hf.import_hf(src, dst, show_progress=False)
  model, _ = load_model(dst)
  return hf_model, model


def hf_decode(hf_model, prompt, new_tokens):
  """Greedy generation with the KV cache; returns (ids [B, N], decode seconds of steps 1..N-1)."""
  import torch
  with torch.no_grad():
    ids = torch.as_tensor(prompt, dtype=torch.long)
    out = hf_model(ids, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1].argmax(-1)
    past, toks = out.past_key_values, [token]
    t0 = time.perf_counter()
    for _ in range(new_tokens - 1):
      out = hf_model(token[:, None], past_key_values=past, use_cache=True)
      past, token = out.past_key_values, out.logits[:, -1].argmax(-1)
      toks.append(token)
    return torch.stack(toks, 1).numpy(), time.perf_counter() - t0


def copy_bandwidth(repeats: int = 9):
  """Bytes moved (read + write) per second by a 128 MB copy: numpy and jitted jax, the best of
  `repeats` (a loaded machine makes single probes slow; the best is the machine's)."""
  import jax
  import jax.numpy as jnp
  x = np.ones(1 << 25, np.float32)
  y = np.empty_like(x)
  t_np = min(_timed(lambda: np.copyto(y, x)) for _ in range(repeats))
  xj = jnp.asarray(x)
  f = jax.jit(lambda a: a * 1.0000001)
  f(xj).block_until_ready()
  t_jax = min(_timed(lambda: f(xj).block_until_ready()) for _ in range(repeats))
  return {'numpy': 2 * x.nbytes / t_np, 'jax': 2 * x.nbytes / t_jax}


def clock() -> float:
  """Seconds on --clock: wall time, or this process's CPU time (all its threads)."""
  if FLAGS.clock == 'cpu':
    import resource
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
  return time.perf_counter()


def _timed(fn):
  t0 = clock()
  fn()
  return clock() - t0


def part_ab(hf_model, model, bandwidth, rows):
  from hetjax.inference.generate import generate
  cfg = model.cfg
  P, N = FLAGS.prompt_len, FLAGS.new_tokens
  bw = max(bandwidth.values())
  for batch in map(int, FLAGS.batches):
    prompt = np.random.default_rng(FLAGS.seed).integers(0, cfg.vocab_size, (batch, P))
    generate(model, prompt, N)
    hf_decode(hf_model, prompt, N)                          # warm-ups
    ours, theirs = [], []
    for _ in range(FLAGS.repeats):                          # alternate the two libraries
      ids, t = generate(model, prompt, N, return_timing=True)
      ours.append(t['decode_s'])
      hf_ids, s = hf_decode(hf_model, prompt, N)
      theirs.append(s)
    same = float(np.mean(ids == hf_ids))
    tok_ours, tok_hf = batch * (N - 1) / min(ours), batch * (N - 1) / min(theirs)
    rows.append({'part': 'a', 'what': f'decode batch {batch}', 'hetjax': tok_ours, 'reference': tok_hf,
                 'ratio': tok_ours / tok_hf, 'unit': 'tokens/s (reference: HF transformers torch CPU)',
                 'note': f'greedy ids equal: {same:.0%}'})
    say(f'a. batch {batch}: hetjax {tok_ours:,.0f} tok/s, transformers {tok_hf:,.0f} tok/s, '
        f'ratio {tok_ours / tok_hf:.2f} (same greedy ids: {same:.0%})')
    # b. bytes read per decode step: every weight once + the KV cache at the mean context
    v = np.dtype(cfg.param_dtype).itemsize
    ctx = P + N / 2
    step_bytes = cfg.num_params() * v + cfg.num_layers * batch * ctx * cfg.kv_bytes_per_token(v)
    roof = step_bytes / bw
    step = min(ours) / (N - 1)
    rows.append({'part': 'b', 'what': f'decode batch {batch}', 'hetjax': step * 1e3, 'reference': roof * 1e3,
                 'ratio': roof / step, 'unit': 'ms per step (reference: memory roofline)',
                 'note': f'{step_bytes / 1e6:.0f} MB per step at {bw / 1e9:.1f} GB/s copy bandwidth'})
    say(f'b. batch {batch}: step {step * 1e3:.2f} ms, roofline {roof * 1e3:.2f} ms '
        f'({step_bytes / 1e6:.0f} MB / {bw / 1e9:.1f} GB/s): {roof / step:.0%} of the roofline')


# ------------------------------------------------------------------ plans on this machine's devices
def serve_plan(stage_devices, layers, max_batch=0, name='bench'):
  """One replica: stage k gets `layers[k]` blocks on devices `stage_devices[k]`."""
  from hetjax.plan import Plan, Replica, Stage
  pos, stages = 0, []
  for devs, n in zip(stage_devices, layers):
    stages.append(Stage(pos, pos + n, list(devs)))
    pos += n
  return Plan([Replica(stages, max_batch=max_batch)], num_layers=pos, kind='serve', model=name,
              cluster='local', seq_len=FLAGS.serve_prompt, gen_len=FLAGS.serve_tokens)


def local_machine(bandwidth):
  """This machine as a cluster: 8 CPU devices on one host, compute from the matmul probe of
  cluster.local_cluster (one device), memory bandwidth from the copy probe -- calibrated once."""
  from hetjax import cluster as hc
  local = hc.local_cluster(n=1, probe_size=1024)
  tflops, bw = local.tflops(0), max(bandwidth.values()) / 1e9
  import jax
  n = len(jax.devices())
  devices = [hc.Device(i, 'CPU', 'localhost', 'local', tflops=tflops, memory_gb=8.0, mem_bw_gbs=bw)
             for i in range(n)]
  delay_ms, gbps = _link_probe()
  c = hc.Cluster('local', devices, np.full((n, n), delay_ms), np.full((n, n), gbps))
  say(f'calibrated once: {tflops * 1e3:.1f} GFLOP/s (matmul probe), {bw:.1f} GB/s '
      f'(copy probe), links {delay_ms:.3f} ms (all-reduce probe) + {gbps:.1f} Gbit/s (device_put probe)')
  return c


def measured_setup(**kw):
  """The cost model's workload in fp32, with efficiencies 1: the probes measured achieved rates."""
  from hetjax.costmodel import inference as icm
  return icm.ServeSetup(bytes_per_value=4, compute_efficiency=1.0, memory_efficiency=1.0, **kw)


def _link_probe():
  """(alpha ms, beta Gbit/s) of the ring model between two devices. alpha: a chain of 12 (matmul,
  all-reduce) pairs on 2 devices minus the same chain without the all-reduces, per all-reduce over
  its 2 (t - 1) = 2 ring steps -- an all-reduce between computations, as in a TP layer; beta: a
  4 MB device_put."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  d = jax.devices()
  mesh = Mesh(np.array(d[:2]), ('tp',))

  def chain(reduce):
    def body(x, w):
      for _ in range(12):
        x = jnp.tanh(x @ w)
        x = jax.lax.psum(x, 'tp') if reduce else x
      return x
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P()), out_specs=P(), check_vma=False))
  x = jax.device_put(jnp.ones((1, 256), jnp.float32), NamedSharding(mesh, P()))
  w = jax.device_put(jnp.ones((256, 256), jnp.float32) / 256, NamedSharding(mesh, P()))
  with_ar, without = chain(True), chain(False)
  with_ar(x, w).block_until_ready(), without(x, w).block_until_ready()
  t_ar = min(_timed(lambda: with_ar(x, w).block_until_ready()) for _ in range(9))
  t_no = min(_timed(lambda: without(x, w).block_until_ready()) for _ in range(9))
  alpha = max(t_ar - t_no, 1e-7) / 12 / 2
  y = jax.device_put(jnp.ones((1 << 20,), jnp.float32), d[0])
  jax.device_put(y, d[1]).block_until_ready()
  big = min(_timed(lambda: jax.device_put(y, d[1]).block_until_ready()) for _ in range(3))
  return alpha * 1e3, y.nbytes * 8 / big / 1e9


def engine_for(plan, model):
  from flax import nnx
  from hetjax.inference.engine import ServeEngine
  return ServeEngine(plan, model.cfg, nnx.state(model))


def groups_of(cfg, groups, batch, prompt_len, seed):
  from hetjax.inference.engine import pad_prompts
  rng = np.random.default_rng(seed)
  return [pad_prompts(list(rng.integers(0, cfg.vocab_size, (batch, prompt_len)))) for _ in range(groups)]


def part_c(model, machine, rows):
  from hetjax.costmodel import inference as icm
  cfg, B, T, P = model.cfg, FLAGS.group_batch, FLAGS.serve_tokens, FLAGS.serve_prompt
  one = engine_for(serve_plan([[0]], [cfg.num_layers]), model)
  base = groups_of(cfg, 1, B, P, 1)
  t_one = best_of(lambda: one.run([base], T), FLAGS.repeats)
  setup = measured_setup(prompt_len=P, gen_len=T, batch=B)
  pred_one = icm.replica_cost(machine, cfg, [icm.StageLayout(cfg.num_layers, [0])], setup)
  for S in map(int, FLAGS.stages):
    from hetjax.search.layers import equal_layers
    layers = equal_layers(cfg.num_layers, S)
    eng = engine_for(serve_plan([[k] for k in range(S)], layers), model)
    groups = groups_of(cfg, S, B, P, 2)
    t_pipe = best_of(lambda: eng.run([groups], T), FLAGS.repeats)
    ratio = (S * B * T / t_pipe) / (B * T / t_one)
    pred = icm.replica_cost(machine, cfg, [icm.StageLayout(n, [k]) for k, n in enumerate(layers)], setup)
    pred_ratio = pred['tokens_per_s'] / pred_one['tokens_per_s']
    rows.append({'part': 'c', 'what': f'S={S} stages, M={S} groups of {B}', 'hetjax': S * B * T / t_pipe,
                 'reference': B * T / t_one, 'ratio': ratio, 'unit': 'tokens/s (reference: one device, one group)',
                 'note': f'cost model predicts {pred_ratio:.2f}'})
    say(f'c. S={S}: pipelined {S * B * T / t_pipe:,.0f} tok/s vs one device {B * T / t_one:,.0f} tok/s: '
        f'ratio {ratio:.2f} (predicted {pred_ratio:.2f})')


def part_d(model, machine, rows):
  from hetjax.inference import serving
  from hetjax.search import hexgen
  cfg = model.cfg
  machine = machine.subset(range(FLAGS.serve_devices))
  setup = measured_setup(prompt_len=FLAGS.serve_prompt, gen_len=FLAGS.serve_tokens)
  ref = hexgen.reference_latency(machine, cfg, setup)
  deadline = 8 * ref
  hcfg = hexgen.HexGenConfig(objective='rate', deadline=deadline, max_batch=16, population=16,
                             evaluations=200)
  rng = np.random.default_rng(FLAGS.seed)
  arrivals = np.cumsum(rng.exponential(1 / FLAGS.rate, FLAGS.requests))
  if FLAGS.clock == 'cpu':      # a CPU clock does not advance while waiting: every request at 0
    arrivals[:] = 0.0
  prompts = rng.integers(0, cfg.vocab_size, (FLAGS.requests, FLAGS.serve_prompt))
  for system, sym in (('hetjax', False), ('symmetric', True)):
    res = hexgen.plan_serving(machine, cfg, setup, dataclasses.replace(hcfg, symmetric=sym), FLAGS.seed, 'bench')
    plan = res.plan
    shape = ' | '.join('+'.join(f'{s.num_layers}L@tp{s.tp}' for s in r.stages) + f' b{r.max_batch}'
                       for r in plan.replicas)
    engine = engine_for(plan, model)
    for timed in (False, True):      # the first pass compiles every (replica, batch shape) it meets
      server = serving.Server(engine, 'shortest_completion', 16, {'temperature': 0.0}, FLAGS.seed,
                              clock=clock)
      reqs = [serving.Request(str(i), prompts[i], FLAGS.serve_tokens, float(a)) for i, a in enumerate(arrivals)]
      say(f'd. {system}: {"timed" if timed else "warm-up"} pass over {len(reqs)} requests')
      t0 = clock()
      server.serve(reqs, progress=lambda *a, **k: None)
    out = serving.summary(reqs, clock() - t0, deadline)
    for what, key in (('tokens/s', 'tokens_per_s'), ('p99 latency s', 'latency_p99_s')):
      rows.append({'part': 'd', 'what': f'{system}: {what}', 'hetjax': out[key],
                   'reference': res.plan.prediction['tokens_per_s'] if key == 'tokens_per_s' else deadline,
                   'ratio': float('nan'), 'unit': f'{what} (reference: predicted capacity / deadline)',
                   'note': shape})
    say(f'd. {system}: plan {shape}; {out["tokens_per_s"]:,.1f} tok/s, p99 {out["latency_p99_s"]:.2f} s, '
        f'SLO attainment {out.get("slo_attainment", float("nan")):.0%} at deadline {deadline:.2f} s')
  het, sym = [r for r in rows if r['part'] == 'd' and r['what'].endswith('tokens/s')][-2:]
  rows.append({'part': 'd', 'what': 'hetjax / symmetric tokens/s', 'hetjax': het['hetjax'],
               'reference': sym['hetjax'], 'ratio': het['hetjax'] / sym['hetjax'], 'unit': 'ratio', 'note': ''})


PLANS_E = [  # (stage devices, layer split): 1-3 stages, TP 1/2/4, asymmetric
    ([[0]], None),
    ([[0, 1]], None),
    ([[0, 1, 2, 3]], None),
    ([[0, 1], [2]], (2, 1)),
    ([[0], [1, 2, 3, 4], [5]], (1, 2, 1)),
]


def machine_with(machine, tflops=None, bw_gbs=None):
  """The same devices and links with another compute rate and/or memory bandwidth."""
  from hetjax import cluster as hc
  devices = [dataclasses.replace(d, tflops=tflops or d.tflops, mem_bw_gbs=bw_gbs or d.mem_bw_gbs)
             for d in machine.devices]
  return hc.Cluster(machine.name, devices, machine.delay_ms, machine.bandwidth_gbps)


PROBE_PLANS = {'probe: 1 stage': ([[0]], [2]), 'probe: 2 stages': ([[0], [1]], [1, 1]),
               'probe: TP 2': ([[0, 1]], [2])}


def overhead_probe_points():
  """The runtime probe: decode steps of a 2-layer model with a width of 64 (nothing to compute) as
  1 stage, 2 stages and 1 stage at TP 2; {(name, 1): (engine, groups)}, timed with part e's plans
  in the same interleaved rounds (see overhead_from)."""
  from hetjax.models.config import get_model_config
  from hetjax.models.model import build_model
  cfg = get_model_config('tiny_gpt', num_layers=2, hidden=64, num_heads=2, num_kv_heads=2, ffn=64,
                         vocab_size=64, max_len=128)
  tiny = build_model(cfg, 0)
  g = groups_of(cfg, 1, 1, 8, 4)
  return {(name, 1): (engine_for(serve_plan(devs, layers), tiny), g)
          for name, (devs, layers) in PROBE_PLANS.items()}


def overhead_from(measured):
  """Host time of the runtime per stage op (2 stages minus 1 stage) and per further device of a TP
  group (TP 2 minus TP 1), from the probe plans' measured steps."""
  one = measured[('probe: 1 stage', 1)]
  return (max(0.0, measured[('probe: 2 stages', 1)] - one),
          max(0.0, measured[('probe: TP 2', 1)] - one))


def head_probe(cfg, batch):
  """FLOP/s of the LM head alone (batch x hidden times the vocab x hidden table, then argmax) on
  one device, on --clock, the best of 20 rounds of 10: the head's achieved compute rate."""
  import jax
  import jax.numpy as jnp
  d = jax.devices()[0]
  table = jax.device_put(np.random.default_rng(0).normal(size=(cfg.vocab_size, cfg.hidden)).astype(np.float32), d)
  x = jax.device_put(np.ones((batch, cfg.hidden), np.float32), d)
  head = jax.jit(lambda h, e: jnp.argmax(h @ e.T, -1))
  head(x, table).block_until_ready()
  ten = lambda: [head(x, table).block_until_ready() for _ in range(10)]
  return 2 * batch * cfg.hidden * cfg.vocab_size / (min(_timed(ten) for _ in range(20)) / 10)


def part_e(model, machine, rows):
  """Measured vs predicted decode step of one batch. Two calibrations, each done once: the probes
  (matmul + copy), and one measured plan (the first: its batch-1 step fits the bandwidth, its
  batch-8 step the compute rate); the other plans then test the model's TP, stage and hop terms."""
  from hetjax.costmodel import inference as icm
  cfg, T, P = model.cfg, FLAGS.serve_tokens, FLAGS.serve_prompt
  layouts, points = {}, {}
  for devs, split in PLANS_E:
    weights = split or (1,)
    layers = [cfg.num_layers * w // sum(weights) for w in weights]
    layers[-1] += cfg.num_layers - sum(layers)
    eng = engine_for(serve_plan(devs, layers), model)
    name = ' + '.join(f'{n}L@tp{len(d)}' for d, n in zip(devs, layers))
    layouts[name] = [icm.StageLayout(n, d) for d, n in zip(devs, layers)]
    for batch in (1, 8):
      points[(name, batch)] = (eng, groups_of(cfg, 1, batch, P, 3))
  points.update(overhead_probe_points())
  for eng, g in points.values():
    for tokens in (T, 1):        # compiles both round lengths
      eng.run([g], tokens)
  # Rounds over all points (the runtime probe's too), interleaved, keeping each point's best: a
  # load that drifts during the run then hits every plan alike instead of whichever was measured
  # last.
  measured = {k: float('inf') for k in points}
  for i in range(FLAGS.repeats):
    for k, (eng, g) in points.items():
      step = (profiled_step_time(eng, g, T, repeats=1, warm=False) if FLAGS.clock == 'wall'
              else (_timed(lambda: eng.run([g], T)) - _timed(lambda: eng.run([g], 1))) / (T - 1))
      measured[k] = min(measured[k], step)
    say(f'e. round {i + 1}/{FLAGS.repeats} done (load {os.getloadavg()[0]:.1f})')
  for (name, batch), m in measured.items():
    say(f'e. {name} batch {batch}: measured {m * 1e3:.2f} ms per step')
  overhead, per_device = overhead_from(measured)
  measured = {k: m for k, m in measured.items() if k[0] not in PROBE_PLANS}
  say(f'e. runtime probe: {overhead * 1e3:.2f} ms of host time per stage op, {per_device * 1e3:.2f} ms '
      f'per further device of its TP group')
  head_rate = head_probe(cfg, 8)
  say(f'e. head probe: the LM head alone (batch 8) runs at {head_rate / 1e9:.1f} GFLOP/s')

  def predict(c, name, batch, **eff):
    setup = measured_setup(prompt_len=P, gen_len=T, batch=batch, op_overhead_s=overhead,
                           device_overhead_s=per_device)
    return icm.replica_cost(c, cfg, layouts[name], dataclasses.replace(setup, **eff), groups=1)['step']

  bw0, rate0 = machine.mem_bw_gbs(0), machine.tflops(0)
  probes = {k: predict(machine, *k) for k in measured}
  first = next(iter(layouts))
  # The calibration plan's batch-1 step fits the bandwidth, its batch-8 step the compute rate
  # (each after the op overhead, which one stage pays once per step).
  # The head's matmul runs at its probed rate, not the blocks' (a matmul's efficiency depends on
  # its shape): its time comes off both sides of the batch-8 fit.
  memory_only = predict(machine_with(machine, tflops=1e6), first, 1) - overhead
  compute_only = predict(machine_with(machine, bw_gbs=1e9), first, 8) - overhead
  head_flops = 2 * 8 * cfg.hidden * cfg.vocab_size
  bw_fit = bw0 * memory_only / (measured[(first, 1)] - overhead)
  rate_fit = rate0 * (compute_only - head_flops / (rate0 * 1e12)) / (
      measured[(first, 8)] - overhead - head_flops / head_rate)
  top = max(rate_fit, head_rate / 1e12)    # efficiencies are shares of the faster rate
  fitted = machine_with(machine, tflops=top, bw_gbs=bw_fit)
  eff = dict(compute_efficiency=rate_fit / top, head_compute_efficiency=head_rate / 1e12 / top)
  say(f'e. calibrated on {first}: {bw_fit:.1f} GB/s, {rate_fit * 1e3:.1f} GFLOP/s in the blocks '
      f'(probes: {bw0:.1f} GB/s, {rate0 * 1e3:.1f} GFLOP/s)')
  for (name, batch), m in measured.items():
    pred = predict(fitted, name, batch, **eff)
    tag = 'calibration plan' if name == first else ('within 20%' if abs(m / pred - 1) <= 0.2 else 'OUTSIDE 20%')
    rows.append({'part': 'e', 'what': f'{name}, batch {batch}', 'hetjax': m * 1e3, 'reference': pred * 1e3,
                 'ratio': m / pred, 'unit': 'ms per decode step of one batch (reference: cost model)',
                 'note': f'{tag}; probe-calibrated ratio {m / probes[(name, batch)]:.2f}'})
    say(f'e. {name} batch {batch}: measured {m * 1e3:.2f} ms, predicted {pred * 1e3:.2f} ms '
        f'(ratio {m / pred:.2f}; probe-calibrated {m / probes[(name, batch)]:.2f})')


def part_f(model, rows):
  """Continuous batching, slot prefill vs a prompt token per step: the same requests (--requests of
  --serve_prompt tokens, --serve_tokens new ones) over a 2-stage plan (4L@tp2 + 2L@tp1, groups of
  4), warmed up once per mode, then --repeats passes alternating the modes; each mode's best pass."""
  from hetjax.inference import serving
  cfg, P, T = model.cfg, FLAGS.serve_prompt, FLAGS.serve_tokens
  layers = [cfg.num_layers * 2 // 3, cfg.num_layers - cfg.num_layers * 2 // 3]
  engine = engine_for(serve_plan([[0, 1], [2]], layers, max_batch=4), model)
  rng = np.random.default_rng(FLAGS.seed)
  prompts = rng.integers(0, cfg.vocab_size, (FLAGS.requests, P))
  arrivals = (np.zeros(FLAGS.requests) if FLAGS.clock == 'cpu'
              else np.cumsum(rng.exponential(1 / FLAGS.rate, FLAGS.requests)))
  best, outputs = {}, {}
  for i in range(FLAGS.repeats + 1):        # pass 0 compiles
    for mode in ('token', 'slot'):
      reqs = [serving.Request(str(k), prompts[k], T, float(a)) for k, a in enumerate(arrivals)]
      server = serving.ContinuousServer(engine, 'round_robin', 4, {'temperature': 0.0}, FLAGS.seed,
                                        prefill=mode, clock=clock)
      t0 = clock()
      server.serve(reqs, progress=lambda *a, **k: None)
      out = serving.summary(reqs, clock() - t0, 0.0)
      out['ttft_mean_s'] = float(np.mean([r.first_token_s - r.arrival_s for r in reqs]))
      outputs[mode] = [r.output for r in reqs]
      if i and (mode not in best or out['seconds'] < best[mode]['seconds']):
        best[mode] = out
    say(f'f. pass {i}/{FLAGS.repeats} done (load {os.getloadavg()[0]:.1f})')
  same = float(np.mean([a == b for a, b in zip(outputs['slot'], outputs['token'])]))
  for key, what in (('ttft_p50_s', 'TTFT p50 s'), ('ttft_mean_s', 'TTFT mean s'),
                    ('tokens_per_s', 'tokens/s'), ('latency_p99_s', 'p99 latency s')):
    after, before = best['slot'][key], best['token'][key]
    rows.append({'part': 'f', 'what': what, 'hetjax': after, 'reference': before, 'ratio': after / before,
                 'unit': f'{what} on --clock={FLAGS.clock} (hetjax: slot prefill; reference: a token per step)',
                 'note': f'{FLAGS.requests} requests, prompt {P}, {T} new; same outputs: {same:.0%}'})
    say(f'f. {what}: slot prefill {after:.3g}, token per step {before:.3g} (ratio {after / before:.2f})')


def decode_step_time(eng, groups, T):
  """Seconds per decode step of a round: (T tokens - 1 token) / (T - 1), best of --repeats."""
  full = best_of(lambda: eng.run([groups], T), FLAGS.repeats)
  first = best_of(lambda: eng.run([groups], 1), FLAGS.repeats)
  return (full - first) / (T - 1)


def profiled_step_time(eng, groups, T, repeats=None, warm=True):
  """Median seconds between consecutive decode tokens of one group on the head stage, from the
  runtime's per-op timeline (one group: the ops run one after another anyway); the median of the
  T - 2 gaps and the best of `repeats` (--repeats) runs, robust to a loaded machine's spikes."""
  if warm:
    eng.run([groups], T)
  best = float('inf')
  for _ in range(repeats or FLAGS.repeats):
    _, events = eng.run([groups], T, profile=True)
    head = max(e['stage'] for e in events)
    ends = sorted(e['end_s'] for e in events if e['stage'] == head)
    best = min(best, float(np.median(np.diff(ends[1:]))))   # gaps between decode steps
  return best


def part_g(rows):
  """GPU checks: one device, stages colocated (ServeEngine(colocate=True))."""
  import jax
  from flax import nnx
  from hetjax.inference.engine import ServeEngine
  from hetjax.models.config import get_model_config
  from hetjax.models.model import build_model
  if jax.devices()[0].platform != 'gpu' and not FLAGS.gpu_on_cpu:
    say('g. no GPU on this machine: part g skipped (run experiments/gpu_serve_check.sh where there is one)')
    return
  say(f'g. device: {jax.devices()[0].device_kind}')
  hbm = copy_bandwidth()['jax']
  T, P = FLAGS.new_tokens, FLAGS.prompt_len
  for name in FLAGS.gpu_models:
    cfg = get_model_config(name, dtype='bfloat16', param_dtype='bfloat16',
                           max_len=max(P + T, get_model_config(name).max_len))
    model = build_model(cfg, FLAGS.seed)
    state = nnx.state(model)
    one = ServeEngine(serve_plan([[0]], [cfg.num_layers]), cfg, state, colocate=True)
    for batch in map(int, FLAGS.gpu_batches):
      g = groups_of(cfg, 1, batch, P, 4)
      step = decode_step_time(one, g, T)
      step_bytes = cfg.num_params() * 2 + cfg.num_layers * batch * (P + T / 2) * cfg.kv_bytes_per_token(2)
      rows.append({'part': 'g', 'what': f'{name} batch {batch}', 'hetjax': batch / step,
                   'reference': step_bytes / hbm / step, 'ratio': step_bytes / hbm / step,
                   'unit': 'decode tokens/s (reference and ratio: fraction of the HBM roofline)',
                   'note': f'{hbm / 1e9:.1f} GB/s copy bandwidth'})
      say(f'g. {name} batch {batch}: {batch / step:,.0f} tok/s, {step * 1e3:.2f} ms per step, '
          f'{step_bytes / hbm / step:.0%} of the HBM roofline')
    batch = int(FLAGS.gpu_batches[min(1, len(FLAGS.gpu_batches) - 1)])
    half = cfg.num_layers // 2
    two = ServeEngine(serve_plan([[0], [1]], [half, cfg.num_layers - half]), cfg, state, colocate=True)
    base = groups_of(cfg, 1, batch, P, 5)
    pair = groups_of(cfg, 2, batch, P, 6)
    t_one = best_of(lambda: one.run([base], T), FLAGS.repeats)
    t_two = best_of(lambda: two.run([pair], T), FLAGS.repeats)
    ratio = (2 * batch / t_two) / (batch / t_one)
    rows.append({'part': 'g', 'what': f'{name} 2 stages x 2 groups of {batch}', 'hetjax': 2 * batch * T / t_two,
                 'reference': batch * T / t_one, 'ratio': ratio,
                 'unit': 'tokens/s (reference: 1 stage, 1 group)', 'note': 'stages colocated on one GPU'})
    say(f'g. {name}: pipelined (2 colocated stages, 2 groups) / one stage = {ratio:.2f}')


def plot(rows, path):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  parts = sorted({r['part'] for r in rows})
  fig, axes = plt.subplots(1, len(parts), figsize=(4.5 * len(parts), 4), squeeze=False)
  for ax, p in zip(axes[0], parts):
    rr = [r for r in rows if r['part'] == p]
    x = np.arange(len(rr))
    ax.bar(x - 0.2, [r['hetjax'] for r in rr], 0.4, label='hetjax (measured)')
    ax.bar(x + 0.2, [r['reference'] for r in rr], 0.4, label='reference')
    ax.set_xticks(x, [r['what'] for r in rr], rotation=30, ha='right', fontsize=7)
    ax.set_title(f'part {p}: {rr[0]["unit"]}', fontsize=8)
    ax.legend(fontsize=7)
  save_figure(fig, path)


def main(argv):
  del argv
  import jax
  from absl import logging
  logging.set_verbosity(logging.WARNING)   # orbax logs every checkpoint step at INFO
  os.makedirs(FLAGS.out, exist_ok=True)
  t0 = time.time()
  load = os.getloadavg()[0]
  if FLAGS.clock == 'cpu':
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[-1]})
  say(f'{len(jax.devices())} JAX CPU devices on {len(os.sched_getaffinity(0))} of {os.cpu_count()} cores, '
      f'load average {load:.1f}; clock: {FLAGS.clock}')
  parts = set(FLAGS.parts)
  rows = []
  if 'g' in parts and len(parts) > 1:
    raise app.UsageError('run part g (the GPU checks) on its own: --parts=g')
  bandwidth = copy_bandwidth()
  say(f'copy bandwidth (read + write): numpy {bandwidth["numpy"] / 1e9:.1f} GB/s, '
      f'jax {bandwidth["jax"] / 1e9:.1f} GB/s')
  hf_model = model = None
  if parts & {'a', 'b', 'c', 'd', 'e', 'f'}:
    with tempfile.TemporaryDirectory() as tmp:
      hf_model, model = make_models(tmp, need_hf=bool(parts & {'a', 'b'}))
  machine = local_machine(bandwidth) if parts & {'c', 'd', 'e'} else None
  if parts & {'a', 'b'}:
    part_ab(hf_model, model, bandwidth, rows)
  if 'c' in parts:
    part_c(model, machine, rows)
  if 'd' in parts:
    part_d(model, machine, rows)
  if 'e' in parts:
    part_e(model, machine, rows)
  if 'f' in parts:
    part_f(model, rows)
  if 'g' in parts:
    part_g(rows)
  tag = os.path.join(FLAGS.out, 'bench_serve')
  write_csv(f'{tag}.csv', rows)
  plot(rows, f'{tag}.png')
  wrote(FLAGS.out, 'bench_serve.csv', 'bench_serve.png')
  print(f'total {time.time() - t0:.0f} s; load average {load:.1f} at the start, '
        f'{os.getloadavg()[0]:.1f} at the end (a shared machine: ratios, not absolute times)')
  print_table([{k: r[k] for k in ('part', 'what', 'hetjax', 'reference', 'ratio', 'note')} for r in rows],
              precision='.3g')


if __name__ == '__main__':
  app.run(main)
