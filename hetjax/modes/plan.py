"""mode=plan: search a training placement, print it, write plan.json and placement.png."""

from __future__ import annotations

import os

from hetjax.cluster import get_cluster
from hetjax.costmodel.training import TrainSetup, check_memory, efficiency_for
from hetjax.errors import HetjaxError
from hetjax.models.config import model_config_from


def setup_from(cfg, model, cluster=None) -> TrainSetup:
  """TrainSetup from the config; train.efficiency 0 means automatic (efficiency_for the cluster)."""
  t = cfg.train
  seq = t.seq_len or model.max_len
  if seq > model.max_len:
    raise HetjaxError(f'train.seq_len={seq} exceeds the model max_len={model.max_len}')
  return TrainSetup(global_batch=t.global_batch, seq_len=seq, micro_batch_size=t.micro_batch_size,
                    schedule=t.schedule,
                    efficiency=efficiency_for(cluster, t.efficiency) if cluster else t.efficiency or TrainSetup.efficiency,
                    activation_bits=t.activation_bits,
                    recompute=t.recompute, c_pp_bytes=t.get('c_pp_bytes', 0.0) or None,
                    c_dp_bytes=t.get('c_dp_bytes', 0.0) or None)


def search_from(cfg):
  from hetjax.search.planner import METHODS, SearchConfig
  s = cfg.search
  if s.method not in METHODS:
    raise HetjaxError(f'unknown search.method {s.method!r}; choose one of {", ".join(METHODS)}')
  return SearchConfig(method=s.method, d_pp=s.d_pp, tp=s.tp, population=s.population, evaluations=s.evaluations,
                      screen_evaluations=s.screen_evaluations, finalists=s.finalists,
                      uneven_layers=s.uneven_layers, time_limit=s.time_limit or None)


def run(cfg, workdir: str) -> None:
  from hetjax.search.draw import draw_plan
  from hetjax.search.planner import plan_training

  model = model_config_from(cfg)
  cluster = get_cluster(cfg.cluster, cfg.get('num_devices') or None)
  setup = setup_from(cfg, model, cluster)
  if cluster.measured:
    print(f'{cluster.name} is a measured cluster (mode=calibrate): planning with efficiency '
          f'{setup.efficiency:g}' + ('' if cfg.train.efficiency else ' (its TFLOP/s are achieved rates)'))
  if setup.schedule not in ('gpipe', '1f1b'):
    raise HetjaxError(f"train.schedule must be 'gpipe' or '1f1b', got {setup.schedule!r}")
  print(cluster.summary())
  plan = plan_training(cluster, model, setup, search_from(cfg), seed=cfg.seed, model_name=cfg.model)
  if cfg.search.get('hetero_replicas', False):
    from hetjax.search import hetero_replicas
    plan, scores = hetero_replicas.best_plan(plan, cluster, model, setup, cfg.model)
    uniform, chosen = scores[0][1], min(scores, key=lambda s: s[1])[0]
    print('heterogeneous replicas, predicted step (gain over the uniform plan): '
          + '; '.join(f'{name} {t:.3f} s ({uniform / t:.2f}x)' for name, t in scores) + f'; keeping {chosen}')
  print(plan.table(cluster))
  p = plan.prediction
  print(f"step {p['total']:.3f} s = compute {p['compute']:.3f} + bubble {p['bubble']:.3f} + TP {p['tp_comm']:.3f}"
        f" + PP {p['pp_comm']:.3f} + DP {p['dp_comm']:.3f} + tied table {p.get('tied_comm', 0.0):.3f}; "
        f"{p['tokens_per_s']:.0f} tokens/s"
        + (f"; DT-FM cost {p['dtfm_cost']:.3f} s" if 'dtfm_cost' in p else ''))
  s = plan.search
  print(f"search: {s['method']} shape (tp, d_pp, d_dp)={tuple(s.get('shape', ()))} "
        f"{s.get('evaluations', 0)} candidates in {s.get('seconds', 0):.1f} s")
  check_memory(plan, cluster, model, setup)  # raises with the device and the numbers
  plan.save(os.path.join(workdir, 'plan.json'))
  if cfg.get('draw', True):
    draw_plan(plan, cluster, os.path.join(workdir, 'placement.png'))
  print(f'wrote {os.path.join(workdir, "plan.json")}' + (' and placement.png' if cfg.get('draw', True) else ''))
