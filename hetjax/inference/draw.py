"""Picture of a serving plan: one bar per replica, one segment per stage (width = layers), coloured
by GPU type and labelled with TP degree and host; a legend explains the replica labels (w, b)."""

from __future__ import annotations

from hetjax.cluster import Cluster
from hetjax.plan import Plan


def draw_serve_plan(plan: Plan, cluster: Cluster, path: str, title: str = '') -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  kinds = sorted({cluster.devices[s.devices[0]].gpu for r in plan.replicas for s in r.stages})
  colour = {k: plt.cm.tab10(i % 10) for i, k in enumerate(kinds)}
  fig, ax = plt.subplots(figsize=(10, 0.55 * len(plan.replicas) + 2.2))
  for i, r in enumerate(plan.replicas):
    for s in r.stages:
      d = cluster.devices[s.devices[0]]
      ax.barh(i, s.num_layers, left=s.start, color=colour[d.gpu], edgecolor='black', height=0.7)
      ax.text(s.start + s.num_layers / 2, i, f'TP{s.tp} {d.host}', ha='center', va='center', fontsize=7)
  ax.set_yticks(range(len(plan.replicas)),
                [f'r{i} w={r.weight:.2f} b<={r.max_batch}' for i, r in enumerate(plan.replicas)], fontsize=8)
  ax.invert_yaxis()
  ax.set_xlim(0, plan.num_layers)
  ax.set_xlabel('layers')
  handles = [plt.Rectangle((0, 0), 1, 1, color=colour[k]) for k in kinds]
  ax.legend(handles, kinds, loc='upper center', bbox_to_anchor=(0.5, -0.3 if len(plan.replicas) < 4 else -0.12),
            ncol=len(kinds), fontsize=8, title='GPU type of each stage (segment: its layers; text: TP degree, host)',
            title_fontsize=8)
  ax.text(1.0, 1.01, 'w: share of requests dispatched to the replica; b: most requests it decodes together',
          transform=ax.transAxes, ha='right', va='bottom', fontsize=7, color='dimgray')
  pred = plan.prediction
  ax.set_title(title or f'{plan.model} on {plan.cluster}: {len(plan.replicas)} replicas, capacity '
               f'{pred.get("capacity_rps", 0):.3g} req/s, single-request latency {pred.get("latency_1_min_s", 0):.3g} s',
               fontsize=9, pad=14)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
