"""Placement picture: devices as dots grouped by region, coloured by pipeline stage, replica paths as lines."""

from __future__ import annotations

import numpy as np

from hetjax.cluster import Cluster
from hetjax.plan import Plan


def device_positions(cluster: Cluster) -> np.ndarray:
  """Regions on a circle, each region's devices on a small grid around its centre."""
  regions = cluster.regions()
  pos = np.zeros((cluster.n, 2))
  r_big = 0.0 if len(regions) == 1 else 4.0
  for k, (name, ids) in enumerate(regions.items()):
    ang = 2 * np.pi * k / max(1, len(regions))
    cx, cy = r_big * np.cos(ang), r_big * np.sin(ang)
    side = int(np.ceil(np.sqrt(len(ids))))
    step = (1.6 if len(regions) > 1 else 6.0) / max(1, side)
    for i, d in enumerate(ids):
      pos[d] = cx + (i % side - (side - 1) / 2) * step, cy + (i // side - (side - 1) / 2) * step
  return pos


def draw_plan(plan: Plan, cluster: Cluster, path: str, title: str = '') -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  pos = device_positions(cluster)
  fig, ax = plt.subplots(figsize=(8, 8))
  cmap = plt.get_cmap('tab20' if plan.num_stages > 10 else 'tab10')
  for name, ids in cluster.regions().items():
    c = pos[ids].mean(axis=0)
    ax.annotate(name, c + [0, 1.2 if len(cluster.regions()) > 1 else 3.6], ha='center', fontsize=9, weight='bold')
  for r in plan.replicas:
    lead = [s.devices[0] for s in r.stages]
    ax.plot(pos[lead, 0], pos[lead, 1], '-', color='gray', alpha=0.35, lw=1)
  used = set(plan.devices)
  for k in range(plan.num_stages):
    ids = [d for r in plan.replicas if k < len(r.stages) for d in r.stages[k].devices]
    s = plan.replicas[0].stages[k]
    ax.scatter(pos[ids, 0], pos[ids, 1], s=60, color=cmap(k % cmap.N), edgecolor='k', lw=0.4,
               label=f'stage {k}: layers [{s.start},{s.end}) tp={s.tp}', zorder=3)
  idle = [d for d in range(cluster.n) if d not in used]
  if idle:
    ax.scatter(pos[idle, 0], pos[idle, 1], s=40, color='white', edgecolor='k', label='unused', zorder=3)
  first = plan.replicas[0]
  lead = [s.devices[0] for s in first.stages]
  ax.plot(pos[lead, 0], pos[lead, 1], '-', color='crimson', lw=2, label='replica 0 pipeline path', zorder=2)
  ax.legend(fontsize=7, loc='upper right', bbox_to_anchor=(1.0, -0.02), ncol=2)
  pad = 2.0
  ax.set_xlim(pos[:, 0].min() - pad, pos[:, 0].max() + pad)
  ax.set_ylim(pos[:, 1].min() - pad, pos[:, 1].max() + pad + 2.0)
  ax.set_aspect('equal')
  ax.axis('off')
  pred = plan.prediction.get('total')
  ax.set_title(title or f'{plan.model} on {cluster.name}: {plan.num_stages} stages x {plan.dp} replicas'
               + (f', predicted step {pred:.2f} s' if pred else ''), fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
