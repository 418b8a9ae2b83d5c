"""mode=plan_inference: search a serving plan (replicas x asymmetric stages), print it, simulate
dispatch, write plan.json and plan.png."""

from __future__ import annotations

import os

from hetjax.cluster import get_cluster
from hetjax.costmodel.inference import ServeSetup
from hetjax.errors import HetjaxError
from hetjax.metrics import write_json
from hetjax.models.config import model_config_from

METHODS = ('hetjax', 'symmetric')


def setup_from(cfg, model) -> ServeSetup:
  if cfg.prompt_len + cfg.gen_len > model.max_len:
    raise HetjaxError(f'prompt_len + gen_len = {cfg.prompt_len + cfg.gen_len} exceeds the model max_len={model.max_len}')
  return ServeSetup(prompt_len=cfg.prompt_len, gen_len=cfg.gen_len).validate()


def run(cfg, workdir: str) -> None:
  from hetjax.inference import dispatch
  from hetjax.inference.draw import draw_serve_plan
  from hetjax.search import hexgen

  if cfg.method not in METHODS:
    raise HetjaxError(f'unknown method {cfg.method!r}; choose one of {", ".join(METHODS)}')
  model = model_config_from(cfg)
  cluster = get_cluster(cfg.cluster)
  setup = setup_from(cfg, model)
  print(cluster.summary())
  deadline = cfg.deadline
  if deadline <= 0:
    ref = hexgen.reference_latency(get_cluster(cfg.reference_cluster), model, setup)
    deadline = cfg.slo_scale * ref
    print(f'deadline {deadline:.3f} s = {cfg.slo_scale} x single-request latency {ref:.3f} s on {cfg.reference_cluster}')
  hcfg = hexgen.HexGenConfig(objective=cfg.objective, deadline=deadline, rate=cfg.rate, slo_margin=cfg.slo_margin,
                             max_batch=cfg.max_batch, symmetric=cfg.method == 'symmetric',
                             population=cfg.population, evaluations=cfg.evaluations,
                             time_limit=cfg.time_limit or None)
  res = hexgen.plan_serving(cluster, model, setup, hcfg, seed=cfg.seed, model_name=cfg.model)
  plan = res.plan
  print(plan.table(cluster))
  p = plan.prediction
  print(f"predicted: single-request latency {p['latency_1_min_s']:.3f}-{p['latency_1_max_s']:.3f} s, "
        f"capacity {p['capacity_rps']:.3f} req/s ({p['tokens_per_s']:.0f} tokens/s) within "
        f"{cfg.slo_margin} x deadline {deadline:.3f} s")
  print(f"search: {plan.search['method']} / {cfg.objective}: {res.evaluations} groupings, "
        f"{plan.search['inner_evaluations']} replica layouts, {res.seconds:.1f} s")
  reps = dispatch.replicas_from_plan(plan, cluster, model, setup)
  sim = dispatch.simulate(dispatch.poisson_arrivals(cfg.rate, cfg.num_requests, cfg.seed), reps,
                          dispatch.make_policy(cfg.dispatch))
  summary = {'rate': cfg.rate, 'deadline_s': deadline, 'attainment': sim.attainment(deadline),
             'deadline_99_s': sim.deadline_for(0.99), 'mean_latency_s': float(sim.latency.mean()),
             'dispatch': cfg.dispatch}
  print(f"dispatch ({cfg.dispatch}) at {cfg.rate} req/s: SLO attainment {summary['attainment']:.3f}, "
        f"99% of requests within {summary['deadline_99_s']:.3f} s, mean {summary['mean_latency_s']:.3f} s")
  plan.search['dispatch'] = summary
  plan.save(os.path.join(workdir, 'plan.json'))
  write_json(os.path.join(workdir, 'dispatch.json'), summary)
  if cfg.draw:
    draw_serve_plan(plan, cluster, os.path.join(workdir, 'plan.png'))
  print(f'wrote {os.path.join(workdir, "plan.json")}' + (' and plan.png' if cfg.draw else ''))
