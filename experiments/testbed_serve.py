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


def serve(cluster_path, n, plan_path, per_round, batch, workdir, what):
  """mode=serve over the plan on the testbed, static rounds of `per_round` requests (replicas dealt
  in turn); ({replica: decode periods (s) of its timed requests}, machine load after the run)."""
  T = FLAGS.tokens
  done, load = os.path.join(workdir, 'completions.jsonl'), os.path.join(workdir, 'load.json')
  if FLAGS.reuse and os.path.isfile(done):
    return periods(done, T), json.load(open(load))['load'] if os.path.isfile(load) else float('nan')
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
                                   '--config.dispatch=round_robin', f'--config.max_batch={batch}',
                                   '--config.generate.stop_at_eos=false'], workdir, what)
  with open(load, 'w') as f:
    json.dump({'load': round(os.getloadavg()[0], 1)}, f)
  return periods(done, T), round(os.getloadavg()[0], 1)


def periods(completions, T):
  """{replica: (last token - first token) / (T - 1) of each request after round 0}."""
  out = {}
  for line in open(completions):
    d = json.loads(line)
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
  from hetjax.cluster import Cluster
  from hetjax.costmodel import inference as icm
  from hetjax.models.config import get_model_config
  model = get_model_config('tiny_gpt', num_layers=FLAGS.layers)
  nominal_path = os.path.abspath(os.path.join(out, f'{name}.json'))
  n = testbed.cluster_file(nominal_path, name)
  nominal = Cluster.load(nominal_path)
  print(f'scenario {name}: {n} processes (machine load {os.getloadavg()[0]:.1f})', flush=True)
  work = os.path.abspath(os.path.join(out, 'runs', name))
  rows = []

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
        alone, load = serve(nominal_path, n, path, n * batch, batch,
                            os.path.join(work, f'alone_{depth}', f'b{batch}'),
                            f'serving every process alone, {depth} layer(s), b={batch}')
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
    slope = {p: (fits[(p, FLAGS.layers)] - fits[(p, 1)]) / max(FLAGS.layers - 1, 1) for p in range(n)}
    overhead = lambda p, k: max(fits[(p, 1)] + slope[p] * (k - 1), 0.0)
    for label, stages in SERVE_PLANS[name].items():
      stages = scaled(stages, FLAGS.layers)
      slug = label.replace(' ', '_').replace('+', '_')
      path = os.path.join(work, slug, f'plan_b{batch}.json')
      save_plan(path, [stages], batch)
      try:
        periods, load = serve(nominal_path, n, path, len(stages) * batch, batch,
                              os.path.join(work, slug, f'b{batch}'), f'serving {label}, b={batch}')
        periods = periods[0]
      except testbed.RunFailed as e:
        print(str(e)[-600:], flush=True)
        periods, load = [], float('nan')
      row(label, stages, batch, periods, load, *predict(stages, overhead, c, setup, cal, nominal, model),
          'prediction')
  return rows


def main(_):
  if os.geteuid() != 0:
    raise SystemExit('error: the testbed needs root (cgroups, network namespaces)')
  unknown = [s for s in FLAGS.scenarios if s not in SERVE_PLANS]
  if unknown:
    raise SystemExit(f'error: no serve plans for scenarios {unknown}; choose from {list(SERVE_PLANS)}')
  if FLAGS.tokens < 3 or FLAGS.rounds < 1:
    raise SystemExit('error: need --tokens >= 3 and --rounds >= 1')
  out = FLAGS.out
  os.makedirs(out, exist_ok=True)
  print(f'machine load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores')
  rows = []
  for name in FLAGS.scenarios:
    rows += run_scenario(name, out)
    write_csv(os.path.join(out, 'results.csv'), rows)  # after each scenario: partial runs count
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


if __name__ == '__main__':
  app.run(main)
