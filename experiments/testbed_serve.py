"""Emulated testbed, serving: per-batch decode step latency of serve plans, measured vs predicted from a calibration.

Reproduces: no paper table; issue 12's serving part ("add serve plans to the same suite: per-batch
decode latency, +-20%"), on the testbed of experiments/testbed.py (hetjax.launch --emulate: a CPU
quota per process in proportion to its device's speed, tbf-shaped links, user-space link latency),
whose scenario table and launch helpers it reuses.

  python experiments/testbed_serve.py --scenarios=two_uneven   # needs root; ~3 minutes per scenario

For each scenario (2-3 processes, one CPU device each) and each batch size b (--batches):
1. calibrate on the testbed at the decode shape (mode=calibrate, micro-batch b x seq 1): each
   device's time for one block's forward of b tokens, and each link's latency and bandwidth
   (ping-pong over the real transport, the user-space latency included);
2. serve every process alone (a plan of one one-stage replica per process, served side by side;
   role "fit"), with all --layers and with 1 layer: its per-op host overhead = its measured period
   - the calibrated compute of its layers and the head, fitted as a + b x layers. This is the
   runtime's Python work per stage op (program lookup by graph hash, parameter flattening, RNG
   folds, argument placement, reading the token), which dominates a tiny model's decode step and
   grows with the stage's parameters;
3. serve each plan (one replica, 2-3 stages, each stage on its own process; role "prediction")
   with mode=serve, static rounds: every round is S request groups of b requests (the server gives
   each of a replica's S stages one group), --tokens new tokens each; round 0 compiles, the next
   --rounds are timed. Measured = the median over the timed requests of (last token - first
   token) / (tokens - 1), on the head stage's clock: the period at which a group of b gets its
   next token;
4. predict that period with the inference cost model's terms (costmodel/inference.replica_cost,
   inputs named in the `inputs` column):
     stage decode op   its process's fitted host overhead (StageLayout.overhead_s) + layers x the
                       calibrated layer time (rate = block FLOPs at b tokens / time, efficiency 1,
                       memory term off: the measured time holds the block's memory traffic) + head
     hop               the calibrated link: latency intercept + bytes / bandwidth, for activations
                       (b x hidden x 4 B) forward and the sampled token ids (4 b B) back
   composed two ways:
     predicted         the order the runtime really runs (runtime_period): every process walks one
                       global op order (parallel/schedules.decode + global_order); an op holds its
                       process's host for the overhead, then computes on the device asynchronously;
                       a transfer is a blocking ppermute that starts when the sender's output
                       exists and both hosts are there and holds both (the calibrated latency minus
                       the emulated delay + bytes / bandwidth), then the RECEIVER sleeps the
                       emulated one-way delay (parallel/emulated_link.py); the head's host waits
                       for each sampled token (the server reads it);
     cost_model        replica_cost's pipelined period (costmodel/inference.py module doc): stages
                       and hops overlap freely, period = max(ring, groups x busiest stage).
Writes results.csv and testbed_serve.png (predicted against measured, +-20% band), prints the table
last. Absolute times are CPU times on a shared machine; the ratios are the result.

Issue 10's serving comparison (hetjax's plan against the symmetric plan, on the same devices):

  python experiments/testbed_serve.py --compare --scenarios=two_uneven --batches=1,4 --transports=socket,pair --device_layers=0,5

steps 1-2 as above, then instead of the fixed plans: hexgen.plan_serving (rate objective, deadline
--slo_scale x the best single-request latency, batch limit b) on the calibrated cluster, its cost
model pricing each stage's host time per op with the fitted overhead of its process and layer count,
once as hetjax and once as the symmetric baseline (one TP degree, equal layers, all of a replica's
TP groups); each distinct plan served with mode=serve over each --transports with the same requests
(rounds + 1 blocks of one full round each, all arriving at once, shortest-completion dispatch,
static rounds; round 0 compiles). Measured, from completions.jsonl (round_stats): tokens/s over the
timed rounds, and the latency of each request from its round's start (p50, p99), read on the replica
that ends the joint rounds (each process's times are on its own clock); predicted: the plan's tokens/s
(replicas independent, as the planner assumes), the same in joint rounds (the static server runs
every replica's round in one engine call, so a round lasts as long as the slowest replica's), and
the slowest replica's round latency. Writes compare.csv and testbed_serve_compare.png, prints the
table last (with a hetjax/symmetric ratio row per transport). --device_layers=K > 0 adds a comparison
in which the planner is told that a device holds only K of the layers, so that replicas must pipeline.
"""

import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import testbed  # the scenario table, cluster_file and launch (with its --cpus and --layers flags)
from common import print_table, save_figure, wrote, write_csv  # (sets sys.path)
from absl import app, flags
import numpy as np

flags.DEFINE_string('out', 'runs/testbed_serve/', 'Output folder (results.csv, testbed_serve.png, runs/).',
                    allow_override=True)
flags.DEFINE_list('scenarios', ['two_uneven', 'two_regions', 'slow_pair'],
                  'Scenarios of experiments/testbed.py to run (those with serve plans below).',
                  allow_override=True)
flags.DEFINE_list('batches', ['1', '4'], 'Requests per group b (each stage holds one group).')
flags.DEFINE_integer('tokens', 16, 'New tokens per request (tokens - 1 decode steps are timed).')
flags.DEFINE_integer('prompt_len', 16, 'Prompt tokens per request (random ids).')
flags.DEFINE_integer('rounds', 3, 'Timed serving rounds per run, after one that compiles.')
flags.DEFINE_bool('reuse', False, 'Reuse the calibrations and serving runs already in --out, failed ones '
                  'included; run only what is missing.')
flags.DEFINE_bool('compare', False, 'Instead of the fixed plans below: plan with hexgen.plan_serving on the '
                  'calibrated cluster (its cost model priced with the fitted per-process overheads), hetjax '
                  'and symmetric, and serve both plans (writes compare.csv and testbed_serve_compare.png).')
flags.DEFINE_list('transports', ['socket'], '--compare: transports to serve each plan over (socket: '
                  'asynchronous sends; pair: the blocking ppermute that auto picks for serving).')
flags.DEFINE_float('slo_scale', 8.0, '--compare: the rate objective\'s deadline = slo_scale x the best '
                   'single-request latency on the calibrated cluster (as configs/plan_inference.py).')
flags.DEFINE_list('device_layers', ['0'], '--compare: also plan as if a device held at most this many layers '
                  '(each value a comparison; 0: the scenario\'s memory, 2 GB, in which any device holds the '
                  'tiny model). Its memory_gb is set so (with the embedding, head and KV cache of one request '
                  'group per process), which the runtime does not enforce; replicas must then pipeline: the '
                  'regime of HexGen\'s asymmetric layouts. Values > 0 apply at b = 1 only (at a larger batch '
                  'limit the planner can drop to batch 1 to fit one more layer).')
FLAGS = flags.FLAGS  # testbed.py's --cpus and --layers apply; its training flags are not used

# scenario -> plan label -> stages as (process, layers), scaled to --layers (default 6). Each
# scenario also serves every process alone ("alone": one one-stage replica per process).
SERVE_PLANS = {
    'two_uneven': {'fast+slow': [(0, 4), (1, 2)], 'slow+fast': [(1, 3), (0, 3)]},
    'two_regions': {'east pair': [(0, 4), (1, 2)], 'three regions': [(0, 3), (1, 2), (2, 1)]},
    'slow_pair': {'slow link': [(1, 3), (2, 3)], 'three': [(0, 2), (1, 2), (2, 2)]},
}
ACT_BYTES = testbed.ACT_BYTES  # float32 activations (codec fp32)


def scaled(stages, layers):
  """The plan's layer split for a model of `layers` blocks (proportional, each stage >= 1)."""
  want = np.array([n for _, n in stages], float) * layers / sum(n for _, n in stages)
  split = np.maximum(1, np.floor(want)).astype(int)
  split[np.argmax(want - split)] += layers - split.sum()
  return [(p, int(n)) for (p, _), n in zip(stages, split)]


def save_plan(path, replicas, batch):
  """A serve plan of one-device stages (device i = process i); replicas: lists of (process, layers);
  each group holds b requests."""
  from hetjax.plan import Plan, Replica, Stage
  out = []
  for stages in replicas:
    pos, chain = 0, []
    for proc, n in stages:
      chain.append(Stage(pos, pos + n, [proc]))
      pos += n
    out.append(Replica(chain, max_batch=batch))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Plan(out, num_layers=pos, kind='serve', model='tiny_gpt', cluster='testbed',
       seq_len=FLAGS.prompt_len, gen_len=FLAGS.tokens).save(path)


def calibrate(cluster_path, n, batch, workdir):
  """mode=calibrate at the decode shape (b tokens); (calibrated Cluster, its details)."""
  from hetjax.cluster import Cluster
  path = os.path.join(workdir, 'cluster.json')
  if not (FLAGS.reuse and os.path.isfile(path)):
    testbed.launch(cluster_path, n, ['--config=configs/calibrate.py', f'--config.cluster={cluster_path}',
                                     f'--config.calibrate.micro_batch_size={batch}',
                                     '--config.calibrate.seq_len=1', '--config.calibrate.reps=20',
                                     f'--config.calibrate.large_bytes={testbed.LARGE_BYTES}'],
                   workdir, f'calibrating at the decode shape, b={batch}')
  return Cluster.load(path), json.load(open(path))['calibration']


def serve(cluster_path, n, plan_path, per_round, batch, workdir, what, dispatch='round_robin',
          transport='auto'):
  """mode=serve over the plan on the testbed, static rounds: rounds + 1 blocks of `per_round`
  requests (ids 'block-i'), all arriving at once; (completions.jsonl's records, machine load after
  the run)."""
  T = FLAGS.tokens
  done, load = os.path.join(workdir, 'completions.jsonl'), os.path.join(workdir, 'load.json')
  if FLAGS.reuse and os.path.isfile(done):
    return records(done), json.load(open(load))['load'] if os.path.isfile(load) else float('nan')
  if FLAGS.reuse and os.path.isfile(os.path.join(workdir, 'FAILED.txt')):
    raise testbed.RunFailed(f'{what} failed before: {open(os.path.join(workdir, "FAILED.txt")).read()}')
  rng = np.random.default_rng(0)
  os.makedirs(workdir, exist_ok=True)
  requests = os.path.join(workdir, 'requests.jsonl')
  with open(requests, 'w') as f:   # all arrive at once: each round takes the next per_round of them
    for r in range(FLAGS.rounds + 1):
      for i in range(per_round):
        f.write(json.dumps({'id': f'{r}-{i}', 'ids': rng.integers(0, 256, FLAGS.prompt_len).tolist(),
                            'max_new_tokens': T}) + '\n')
  testbed.launch(cluster_path, n, ['--config=configs/serve.py', f'--config.plan={plan_path}',
                                   f'--config.requests={requests}', '--config.batching=static',
                                   f'--config.dispatch={dispatch}', f'--config.max_batch={batch}',
                                   f'--config.transport={transport}',
                                   '--config.generate.stop_at_eos=false'], workdir, what)
  with open(load, 'w') as f:
    json.dump({'load': round(os.getloadavg()[0], 1)}, f)
  return records(done), round(os.getloadavg()[0], 1)


def records(completions):
  return [json.loads(line) for line in open(completions) if line.strip()]


def periods(recs, T):
  """{replica: (last token - first token) / (T - 1) of each request after round 0}."""
  out = {}
  for d in recs:
    if not d['id'].startswith('0-'):   # round 0 compiles
      out.setdefault(d['replica'], []).append((d['latency_s'] - d['ttft_s']) / (T - 1))
  return out


def model_inputs(cal, details, batch):
  """The calibrated cluster with each device's rate at the decode shape (block FLOPs of b tokens /
  measured time; the memory term off: that time already holds the block's memory traffic) and the
  cost model's setup (fp32, efficiencies 1: these are achieved rates)."""
  import dataclasses
  from hetjax.cluster import Cluster
  from hetjax.costmodel import inference as icm
  rate = np.array(details['layer_forward_flops']) / np.array(details['layer_forward_s']) / 1e12
  devices = [dataclasses.replace(d, tflops=float(rate[i]), mem_bw_gbs=1e9) for i, d in enumerate(cal.devices)]
  setup = icm.ServeSetup(prompt_len=FLAGS.prompt_len, gen_len=FLAGS.tokens, batch=batch,
                         bytes_per_value=ACT_BYTES, compute_efficiency=1.0, memory_efficiency=1.0)
  return Cluster(cal.name, devices, cal.delay_ms, cal.bandwidth_gbps, measured=True), setup


def predict(stages, overhead, c, setup, cal, nominal, model):
  """(period in the runtime's order s, cost model's pipelined period s, inputs) of a replica whose
  stage k runs on process stages[k][0]; overhead(process, layers): a stage op's host time."""
  from hetjax.costmodel import inference as icm
  procs = [p for p, _ in stages]
  host = [overhead(p, n) for p, n in stages]
  layout = [icm.StageLayout(n, [p], overhead_s=h) for (p, n), h in zip(stages, host)]
  cost = icm.replica_cost(c, model, layout, setup, check_memory=False)   # groups = S, as served
  decode = [d / (setup.gen_len - 1) for d in cost['stage_decode']]
  sleep = lambda a, b: nominal.delay_ms[a, b] / 1e3
  soft = lambda a, b: max(cal.delay_ms[a, b] / 1e3 - sleep(a, b), 0.0)
  wire = lambda a, b, nbytes: soft(a, b) + nbytes * 8 / (cal.bandwidth_gbps[a, b] * 1e9)
  b = setup.batch
  period = runtime_period(procs, host, cost['stage_prefill'], decode, wire,
                          sleep, setup.gen_len,
                          b * model.hidden * ACT_BYTES, b * setup.prompt_len * model.hidden * ACT_BYTES,
                          4 * b)
  hops = list(zip(procs, procs[1:] + procs[:1])) if len(procs) > 1 else []
  inputs = ('stage op ms (host overhead + compute) ' +
            ' '.join(f'p{p}:{h * 1e3:.2f}+{(d - h) * 1e3:.2f}' for p, h, d in zip(procs, host, decode)) +
            ''.join(f'; hop {a}->{q} {soft(a, q) * 1e3:.2f} ms software + {sleep(a, q) * 1e3:.0f} ms '
                    f'emulated @ {cal.bandwidth_gbps[a, q]:.3f} Gbit/s' for a, q in hops))
  return period, cost['step'], inputs


def runtime_period(procs, host_s, prefill_s, decode_s, wire, sleep, T, act_bytes, prompt_bytes, token_bytes):
  """Mean decode period of the S groups of schedules.decode(S, S, T) as the runtime executes it:
  every process walks one global order; an op first takes host_s[k] of its process's host (the
  runtime's Python work), then its compute (prefill_s / decode_s minus that) runs on the device
  asynchronously; a transfer is a blocking ppermute that starts once the sender's output exists and
  both hosts are there, holds both hosts wire(a, b, bytes) s, then the receiver's host sleeps the
  emulated delay sleep(a, b); the head's host waits for each sampled token (serving reads it)."""
  from hetjax.parallel import schedules
  from hetjax.parallel.runtime import consumers
  S = len(procs)
  order = schedules.global_order(schedules.decode(S, S, T))
  sends = consumers(order)
  host, device = dict.fromkeys(procs, 0.0), dict.fromkeys(procs, 0.0)
  token_at = {}
  for op in order:
    k, p = op.stage, procs[op.stage]
    host[p] += host_s[k]
    device[p] = max(device[p], host[p]) + (prefill_s if op.kind == 'P' else decode_s)[k] - host_s[k]
    if k == S - 1:
      host[p] = device[p]
      token_at[(op.micro, op.step)] = device[p]
    for c in sends.get(op.id, ()):
      q = procs[c.stage]
      nbytes = token_bytes if c.stage == 0 else (prompt_bytes if op.kind == 'P' else act_bytes)
      end = max(host[p], device[p], host[q]) + wire(p, q, nbytes)
      host[p], host[q] = end, end + sleep(p, q)
  return float(np.mean([(token_at[(m, T - 1)] - token_at[(m, 0)]) / (T - 1) for m in range(S)]))


def run_scenario(name, out):
  """The scenario's rows: the "alone" fit rows, then the fixed plans' rows (role 'prediction'), or
  with --compare the planned plans' rows (compare_plans; returned second)."""
  from hetjax.cluster import Cluster
  from hetjax.costmodel import inference as icm
  from hetjax.models.config import get_model_config
  model = get_model_config('tiny_gpt', num_layers=FLAGS.layers)
  nominal_path = os.path.abspath(os.path.join(out, f'{name}.json'))
  n = testbed.cluster_file(nominal_path, name)
  nominal = Cluster.load(nominal_path)
  print(f'scenario {name}: {n} processes (machine load {os.getloadavg()[0]:.1f})', flush=True)
  work = os.path.abspath(os.path.join(out, 'runs', name))
  rows, compared = [], []

  def row(plan, stages, batch, periods, load, predicted, cost_model, inputs, role):
    measured = statistics.median(periods) if periods else float('nan')
    q1, q3 = np.percentile(periods, [25, 75]) if periods else (float('nan'),) * 2
    rows.append({'scenario': name, 'plan': plan, 'role': role,
                 'stages': ' '.join(f'p{p}:{k}' for p, k in stages), 'batch': batch,
                 'groups': len(stages), 'measured_ms': round(measured * 1e3, 2),
                 'spread_ms': round((q3 - q1) * 1e3, 2), 'predicted_ms': round(predicted * 1e3, 2),
                 'measured_over_predicted': round(measured / predicted, 3),
                 'cost_model_ms': round(cost_model * 1e3, 2),
                 'measured_over_cost_model': round(measured / cost_model, 3),
                 'load': load,
                 'cores_got': ' '.join(f'{x:.2f}' for x in details['achieved_cores']), 'inputs': inputs})
    print(f'  {plan:>13} [{rows[-1]["stages"]}] b={batch}: measured {measured * 1e3:.1f} ms '
          f'(IQR {(q3 - q1) * 1e3:.1f}), predicted {predicted * 1e3:.1f} ms, cost model '
          f'{cost_model * 1e3:.1f} ms ({role})', flush=True)

  for batch in map(int, FLAGS.batches):
    cal, details = calibrate(nominal_path, n, batch, os.path.join(work, f'calibrate_b{batch}'))
    print(f'  b={batch}: layer forward ms {np.round(np.array(details["layer_forward_s"]) * 1e3, 3).tolist()}, '
          f'cores got {np.round(details["achieved_cores"], 2).tolist()}, link latency ms '
          f'{np.round(cal.delay_ms, 2).tolist()}', flush=True)
    c, setup = model_inputs(cal, details, batch)
    # Every process alone (one one-stage replica each, served side by side), at --layers and at 1
    # layer: its per-op host overhead = measured period - the calibrated compute of its layers and
    # head, fitted as a + b x layers (the runtime's Python work grows with a stage's parameters).
    fits = {}
    for depth in sorted({FLAGS.layers, 1}):
      path = os.path.join(work, f'alone_{depth}', f'plan_b{batch}.json')
      save_plan(path, [[(p, depth)] for p in range(n)], batch)
      layers, FLAGS.layers = FLAGS.layers, depth   # testbed.launch builds the model of --layers
      try:
        recs, load = serve(nominal_path, n, path, n * batch, batch,
                           os.path.join(work, f'alone_{depth}', f'b{batch}'),
                           f'serving every process alone, {depth} layer(s), b={batch}')
        alone = periods(recs, FLAGS.tokens)
      except testbed.RunFailed as e:
        print(str(e)[-600:], flush=True)
        break
      finally:
        FLAGS.layers = layers
      shallow = get_model_config('tiny_gpt', num_layers=depth)
      for p in range(n):
        compute = icm.replica_cost(c, shallow, [icm.StageLayout(depth, [p])], setup,
                                   check_memory=False, groups=1)['step']
        fits[(p, depth)] = statistics.median(alone[p]) - compute
        row('alone', [(p, depth)], batch, alone[p], load, compute, compute,
            f'fit: per-op overhead p{p} at {depth} layer(s) = {fits[(p, depth)] * 1e3:.2f} ms '
            f'(measured - calibrated compute)', 'fit')
    if len(fits) < n * len({FLAGS.layers, 1}):
      continue
    overhead = fitted_overhead(fits, n, FLAGS.layers)
    if FLAGS.compare:
      for layers_cap in map(int, FLAGS.device_layers):
        if layers_cap and batch > 1:
          print(f'  --device_layers={layers_cap}: skipped at b={batch} (b = 1 only)', flush=True)
          continue
        compared += compare_plans(name, n, nominal_path, c, setup, overhead, model, batch, work, details,
                                  FLAGS.transports, FLAGS.slo_scale, layers_cap)
      continue
    for label, stages in SERVE_PLANS[name].items():
      stages = scaled(stages, FLAGS.layers)
      slug = label.replace(' ', '_').replace('+', '_')
      path = os.path.join(work, slug, f'plan_b{batch}.json')
      save_plan(path, [stages], batch)
      try:
        recs, load = serve(nominal_path, n, path, len(stages) * batch, batch,
                           os.path.join(work, slug, f'b{batch}'), f'serving {label}, b={batch}')
        periods_s = periods(recs, FLAGS.tokens)[0]
      except testbed.RunFailed as e:
        print(str(e)[-600:], flush=True)
        periods_s, load = [], float('nan')
      row(label, stages, batch, periods_s, load, *predict(stages, overhead, c, setup, cal, nominal, model),
          'prediction')
  return rows, compared


def fitted_overhead(fits, n, layers):
  """overhead(process, stage layers) from the "alone" fits {(process, depth): seconds} at depth 1 and
  `layers`: a + b x (layers - 1) per process, never below 0."""
  slope = {p: (fits[(p, layers)] - fits[(p, 1)]) / max(layers - 1, 1) for p in range(n)}
  return lambda p, k: max(fits[(p, 1)] + slope[p] * (k - 1), 0.0)


# ---------------------------------------------------------------- --compare: hetjax vs symmetric
def describe_plan(plan):
  """'p0:4+p1:2 b4 | p2:6 b4': each replica's stages (process:layers) and its batch limit."""
  return ' | '.join('+'.join(f'p{s.devices[0]}:{s.num_layers}' for s in r.stages) + f' b{r.max_batch}'
                    for r in plan.replicas)


def replica_predictions(c, model, setup, plan, overhead):
  """The inference cost model's full round of each replica of a serve plan (one group of its
  max_batch requests per stage, the stages' host overhead from overhead(process, layers)): lists of
  round latency (s) and tokens per round."""
  import dataclasses
  from hetjax.costmodel import inference as icm
  latency, tokens = [], []
  for r in plan.replicas:
    layout = [icm.StageLayout(s.num_layers, list(s.devices), overhead_s=overhead(s.devices[0], s.num_layers))
              for s in r.stages]
    cost = icm.replica_cost(c, model, layout, dataclasses.replace(setup, batch=r.max_batch),
                            check_memory=False)
    latency.append(cost['latency'])
    tokens.append(cost['groups'] * r.max_batch * setup.gen_len)
  return latency, tokens


def capped_memory_gb(model, setup, layers, groups):
  """Device memory (GB) in which a stage holds `layers` layers with the embedding and the head and
  the KV cache of `groups` request groups of setup.batch (as the planner's stage caps and memory check
  count), but not one more."""
  from hetjax.costmodel import inference as icm
  need = lambda k: icm.stage_memory(model, setup, k, 1, True, True, groups)['total']
  return (need(layers) + need(layers + 1)) / 2 / setup.memory_fraction / 1e9


def lockstep_tokens_per_s(latency, tokens):
  """Tokens/s of replicas served in joint static rounds (the static server: a round runs every
  replica's groups in one engine call and ends when the slowest replica's round does)."""
  return sum(tokens) / max(latency)


def round_stats(recs, warmup=1):
  """What serving measured in static rounds: requests 'k-i' arrive at once and block k is round k;
  round 0 compiles. A request's times are on its replica's head process's clock (each process counts
  from its own start), so each replica is read on its own clock: its round k ends with its last
  request of block k (checked: each of its block-k requests gets its first token after its block
  k - 1 ended). Joint rounds end when the slowest replica's does: the reference replica is the one
  whose timed rounds last longest from its first token to its last (a replica that finishes early
  waits for it), and on its clock its previous round's end is a round's start. Rounds before
  `warmup` are not timed (round 0 compiles; a process's first collectives after it can hold up round
  1). Returns tokens_per_s (all replicas' tokens of rounds warmup..R / the reference's span from the
  end of round warmup - 1 to the end of round R), latency_p50_s / latency_p99_s (the reference's
  timed requests from their round's start: in joint rounds it holds the slowest requests), rounds,
  requests (timed, all replicas) and reference. Raises ValueError when the blocks are not rounds."""
  blocks = {}
  for d in recs:
    blocks.setdefault((int(d['id'].split('-')[0]), d['replica']), []).append(d)
  ks = sorted({k for k, _ in blocks})
  replicas = sorted({r for _, r in blocks})
  if ks != list(range(len(ks))) or len(ks) < warmup + 1 or warmup < 1:
    raise ValueError(f'need blocks 0..R, R >= warmup >= 1, got {ks} with warmup {warmup}')
  missing = [(k, r) for k in ks for r in replicas if (k, r) not in blocks]
  if missing:
    raise ValueError(f'blocks are not full rounds: (block, replica) {missing} served nothing')
  end = {key: max(d['latency_s'] for d in blk) for key, blk in blocks.items()}
  for (k, r), blk in blocks.items():
    first = min(d['ttft_s'] for d in blk)
    if k and first < end[(k - 1, r)]:
      raise ValueError(f'block {k} is not a round of replica {r}: a first token at {first:.3f} s, before '
                       f'its block {k - 1} ended ({end[(k - 1, r)]:.3f} s)')
  R = ks[-1]
  w = warmup - 1
  busy = lambda r: np.mean([end[(k, r)] - min(d['ttft_s'] for d in blocks[(k, r)]) for k in ks[warmup:]])
  ref = max(replicas, key=busy)
  tokens = sum(len(d['ids']) for (k, _), blk in blocks.items() if k > w for d in blk)
  latency = [d['latency_s'] - end[(k - 1, ref)] for k in ks[warmup:] for d in blocks[(k, ref)]]
  return {'tokens_per_s': tokens / (end[(R, ref)] - end[(w, ref)]),
          'latency_p50_s': float(np.percentile(latency, 50)), 'latency_p99_s': float(np.percentile(latency, 99)),
          'rounds': R - w, 'requests': sum(len(blk) for (k, _), blk in blocks.items() if k > w), 'reference': ref}


def compare_plans(name, n, nominal_path, c, setup, overhead, model, batch, work, details, transports,
                  slo_scale, device_layers=0):
  """Plan with hexgen.plan_serving (rate objective) on the calibrated cluster c, method hetjax and
  symmetric, the cost model pricing each stage's host time per op by the fitted overhead(process,
  layers); serve each distinct plan over every one of `transports` with the same requests (shortest-
  completion dispatch, static rounds); rows of measured and predicted tokens/s and latency, then a
  hetjax / symmetric ratio row per transport."""
  import dataclasses
  from hetjax.errors import HetjaxError
  from hetjax.search import hexgen
  over = lambda devices, k: overhead(devices[0], k)        # one device per process
  if device_layers:
    gb = capped_memory_gb(model, setup, device_layers, n)
    c = dataclasses.replace(c, devices=[dataclasses.replace(d, memory_gb=gb) for d in c.devices])
    print(f'  the planner is told each device holds {device_layers} layers ({gb * 1e3:.2f} MB)', flush=True)
  one = dataclasses.replace(setup, batch=1)
  deadline = slo_scale * hexgen.reference_latency(c, model, one, overhead=over)
  cfg = hexgen.HexGenConfig(objective='rate', deadline=deadline, max_batch=batch, population=16,
                            evaluations=300)
  plans, found = {}, {}
  tag = f'_l{device_layers}' if device_layers else ''
  for system in ('hetjax', 'symmetric'):
    try:
      res = hexgen.plan_serving(c, model, setup, dataclasses.replace(cfg, symmetric=system == 'symmetric'),
                                seed=0, model_name='tiny_gpt', overhead=over)
    except HetjaxError as e:
      print(f'  {system}: no plan ({e})', flush=True)
      continue
    plan = res.plan
    plan.cluster = 'testbed'
    path = os.path.join(work, f'compare_b{batch}{tag}', system, 'plan.json')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    plan.save(path)
    plans[system] = (plan, path)
    print(f'  b<={batch} {system}: {describe_plan(plan)}; predicted {plan.prediction["tokens_per_s"]:.1f} '
          f'tokens/s (deadline {deadline * 1e3:.0f} ms, budget {cfg.slo_margin:.0%} of it)', flush=True)
  if len(plans) == 2 and describe_plan(plans['hetjax'][0]) == describe_plan(plans['symmetric'][0]):
    print('  both searches chose the same plan: it is served once, and the symmetric rows repeat '
          'its measurement', flush=True)
  fits = ' '.join(f'p{p}:{overhead(p, 1) * 1e3:.2f}+{(overhead(p, 2) - overhead(p, 1)) * 1e3:.2f}/layer'
                  for p in range(n))
  calibrated = ' '.join(f'p{p}:{x * 1e3:.2f}' for p, x in enumerate(details.get('op_overhead_s', [])))
  rows = []
  for transport in transports:
    for system, (plan, path) in plans.items():
      desc = describe_plan(plan)
      latency, tokens = replica_predictions(c, model, setup, plan, overhead)
      per_round = sum(r.max_batch * len(r.stages) for r in plan.replicas)
      same = found.get((transport, desc))
      note = f'same plan as {same[0]}: its run' if same else ''
      if same:
        stats, load = same[1], same[2]
      else:
        try:
          recs, load = serve(nominal_path, n, path, per_round, batch,
                             os.path.join(work, f'compare_b{batch}{tag}', system, transport),
                             f'serving the {system} plan over {transport}, b<={batch}',
                             dispatch='shortest_completion', transport=transport)
          stats = round_stats(recs)
          if stats['rounds'] >= 2:   # also from round 2: round 1 can hold a process's first collectives
            stats['steady'] = round_stats(recs, warmup=2)
        except (testbed.RunFailed, ValueError) as e:
          print(str(e)[-600:], flush=True)
          stats, load = {}, float('nan')
          note = f'failed: {str(e).splitlines()[0][:120]}'
        found[(transport, desc)] = (system, stats, load)
      measured = stats.get('tokens_per_s', float('nan'))
      p99 = stats.get('latency_p99_s', float('nan'))
      rows.append({'scenario': name, 'batch_limit': batch, 'device_layers': device_layers or '',
                   'transport': transport, 'system': system,
                   'plan': desc, 'measured_tok_s': round(measured, 1),
                   'predicted_tok_s': round(plan.prediction['tokens_per_s'], 1),
                   'predicted_lockstep_tok_s': round(lockstep_tokens_per_s(latency, tokens), 1),
                   'measured_p99_ms': round(p99 * 1e3, 1),
                   'steady_tok_s': round(stats.get('steady', {}).get('tokens_per_s', float('nan')), 1),
                   'steady_p99_ms': round(stats.get('steady', {}).get('latency_p99_s', float('nan')) * 1e3, 1),
                   'measured_p50_ms': round(stats.get('latency_p50_s', float('nan')) * 1e3, 1),
                   'predicted_p99_ms': round(max(latency) * 1e3, 1),
                   'measured_over_predicted': round(measured / plan.prediction['tokens_per_s'], 3),
                   'rounds': stats.get('rounds', 0), 'requests': stats.get('requests', 0),
                   'latency_of_replica': stats.get('reference', ''),
                   'load': load, 'deadline_ms': round(deadline * 1e3, 1), 'note': note,
                   'inputs': f'fitted overhead ms {fits}; calibration op_overhead_s ms {calibrated}; '
                             f'replica round latency ms {[round(x * 1e3, 1) for x in latency]}'})
      r = rows[-1]
      print(f'  {system:>9} over {transport}: {r["measured_tok_s"]:.1f} tokens/s (from round 2: '
            f'{r["steady_tok_s"]:.1f}; predicted '
            f'{r["predicted_tok_s"]:.1f}, lockstep {r["predicted_lockstep_tok_s"]:.1f}), p99 '
            f'{r["measured_p99_ms"]:.0f} ms (predicted {r["predicted_p99_ms"]:.0f})', flush=True)
    mine = {r['system']: r for r in rows if r['transport'] == transport}
    if len(mine) == 2:
      h, s = mine['hetjax'], mine['symmetric']
      ratio = lambda a, b: round(a / b, 3) if b else float('nan')
      rows.append({**{k: '' for k in h}, 'scenario': name, 'batch_limit': batch,
                   'device_layers': device_layers or '', 'transport': transport,
                   'system': 'hetjax/symmetric',
                   'plan': 'same plan' if h['plan'] == s['plan'] else 'different plans',
                   'measured_tok_s': ratio(h['measured_tok_s'], s['measured_tok_s']),
                   'predicted_tok_s': ratio(h['predicted_tok_s'], s['predicted_tok_s']),
                   'predicted_lockstep_tok_s': ratio(h['predicted_lockstep_tok_s'], s['predicted_lockstep_tok_s']),
                   'measured_p99_ms': ratio(h['measured_p99_ms'], s['measured_p99_ms']),
                   'steady_tok_s': ratio(h['steady_tok_s'], s['steady_tok_s']),
                   'steady_p99_ms': ratio(h['steady_p99_ms'], s['steady_p99_ms']),
                   'predicted_p99_ms': ratio(h['predicted_p99_ms'], s['predicted_p99_ms']),
                   'note': 'ratios hetjax / symmetric'})
  return rows


def main(_):
  if os.geteuid() != 0:
    raise SystemExit('error: the testbed needs root (cgroups, network namespaces)')
  known = testbed.SCENARIOS if FLAGS.compare else SERVE_PLANS   # --compare plans for any scenario
  unknown = [s for s in FLAGS.scenarios if s not in known]
  if unknown:
    raise SystemExit(f'error: no serve plans for scenarios {unknown}; choose from {list(known)}')
  if FLAGS.tokens < 3 or FLAGS.rounds < 1:
    raise SystemExit('error: need --tokens >= 3 and --rounds >= 1')
  bad = [t for t in FLAGS.transports if t not in ('socket', 'pair', 'auto')]
  if bad:
    raise SystemExit(f'error: --transports takes socket, pair or auto, got {bad}')
  out = FLAGS.out
  os.makedirs(out, exist_ok=True)
  print(f'machine load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores')
  rows, compared = [], []
  for name in FLAGS.scenarios:
    fit_rows, compare_rows = run_scenario(name, out)
    rows, compared = rows + fit_rows, compared + compare_rows
    if rows:   # after each scenario: partial runs count
      write_csv(os.path.join(out, 'results.csv'), rows)
    if compared:
      write_csv(os.path.join(out, 'compare.csv'), compared)
  if FLAGS.compare:
    plot_compare(compared, os.path.join(out, 'testbed_serve_compare.png'))
    wrote(out, 'results.csv', 'compare.csv', 'testbed_serve_compare.png')
    print('symmetric baseline (search/hexgen_inner.py): one TP degree for every stage, layers split '
          'equally, every TP group of a replica used; it may group devices into replicas freely. With '
          'one device per process (one pool each, TP 1) it differs from hetjax only in the layer split '
          'of multi-stage replicas.')
    print_table(compared, columns=['scenario', 'batch_limit', 'device_layers', 'transport', 'system', 'plan',
                                   'measured_tok_s', 'steady_tok_s', 'predicted_tok_s',
                                   'predicted_lockstep_tok_s', 'measured_p99_ms', 'steady_p99_ms',
                                   'predicted_p99_ms', 'load', 'note'])
    return
  plot(rows, os.path.join(out, 'testbed_serve.png'))
  wrote(out, 'results.csv', 'testbed_serve.png')
  pred = [r for r in rows if r['role'] == 'prediction' and np.isfinite(r['measured_ms'])]
  failed = sum(r['role'] == 'prediction' for r in rows) - len(pred)
  ok = [r for r in pred if abs(r['measured_over_predicted'] - 1) <= 0.2]
  ok_cm = [r for r in pred if abs(r['measured_over_cost_model'] - 1) <= 0.2]
  print(f'goal +-20%: {len(ok)} of {len(pred)} measured plan rows within (runtime order); {len(ok_cm)} '
        f'of {len(pred)} with the cost model\'s pipelined period ("alone" rows fit the overheads)' +
        (f'; {failed} serving runs failed' if failed else ''))
  print_table(rows, columns=['scenario', 'plan', 'role', 'stages', 'batch', 'groups', 'measured_ms',
                             'spread_ms', 'predicted_ms', 'measured_over_predicted', 'cost_model_ms',
                             'measured_over_cost_model', 'load'])


def plot(rows, path):
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5, 5))
  rows = [r for r in rows if r['role'] == 'prediction' and np.isfinite(r['measured_ms'])]
  values = [r[k] for r in rows for k in ('predicted_ms', 'measured_ms', 'cost_model_ms')] or [1.0]
  x = np.geomspace(min(values) / 1.3, max(values) * 1.3, 50)   # log axes: 30 ms and 400 ms periods
  ax.fill_between(x, x * 0.8, x * 1.2, color='0.9', label='+-20%')
  ax.plot(x, x, 'k-', lw=0.8)
  for batch, marker in zip(sorted({r['batch'] for r in rows}), 'osv^D'):
    mine = [r for r in rows if r['batch'] == batch]
    ax.scatter([r['predicted_ms'] for r in mine], [r['measured_ms'] for r in mine], marker=marker,
               label=f'b={batch}: predicted (runtime order)')
    ax.scatter([r['cost_model_ms'] for r in mine], [r['measured_ms'] for r in mine], marker=marker,
               facecolors='none', edgecolors='0.4', label=f'b={batch}: cost model (pipelined)')
  from matplotlib.ticker import NullFormatter
  ax.set_xscale('log')
  ax.set_yscale('log')
  for axis in (ax.xaxis, ax.yaxis):
    axis.set_minor_formatter(NullFormatter())   # decades only: minor labels overlap
  ax.set_xlabel('predicted decode period (ms)')
  ax.set_ylabel('measured decode period (ms)')
  ax.set_title('emulated testbed, serving: per-batch decode step')
  ax.legend(fontsize=7)
  save_figure(fig, path)


def plot_compare(rows, path):
  """Tokens/s of each plan, measured against the cost model's prediction (replicas independent)
  and its lockstep variant (the static server's joint rounds), per scenario, batch limit, transport."""
  import matplotlib.pyplot as plt
  rows = [r for r in rows if r['system'] in ('hetjax', 'symmetric')]
  fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(rows) + 2), 4))
  x = np.arange(len(rows))
  ax.bar(x, [r['measured_tok_s'] for r in rows], 0.6,
         color=['tab:blue' if r['system'] == 'hetjax' else 'tab:orange' for r in rows], label='measured')
  ax.scatter(x, [r['steady_tok_s'] for r in rows], marker='o', facecolors='none', edgecolors='tab:red',
             zorder=3, label='measured from round 2')
  ax.scatter(x, [r['predicted_tok_s'] for r in rows], marker='_', s=400, color='k', zorder=3,
             label='predicted (replicas independent)')
  ax.scatter(x, [r['predicted_lockstep_tok_s'] for r in rows], marker='x', color='k', zorder=3,
             label='predicted, joint static rounds')
  ax.set_xticks(x, [f'{r["system"]}\n{r["scenario"]} b<={r["batch_limit"]}'
                    + (f', {r["device_layers"]} layers/device' if r['device_layers'] else '') + f'\n{r["transport"]}'
                    for r in rows],
                fontsize=7)
  ax.set_ylabel('tokens/s (timed rounds)')
  ax.set_title('emulated testbed, serving: hetjax vs symmetric plan')
  ax.legend(fontsize=7)
  save_figure(fig, path)


if __name__ == '__main__':
  app.run(main)
