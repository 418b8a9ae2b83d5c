"""Placement picture: one block per region, one labelled cell per device (id and GPU type), the
devices of a multi-device host framed together and named, cells coloured by pipeline stage, replica paths as lines. The figure
grows with the cluster, so 8 devices and 64 devices both fill it."""

from __future__ import annotations

import math

import numpy as np

from hetjax.cluster import Cluster
from hetjax.plan import Plan

GAP = 0.8        # between region blocks
HEADER = 0.8     # room for a region's name above its block
HOST_GAP = 0.45  # room for a host's name above its devices


def _layout_region(cluster: Cluster, ids: list[int]):
  """Cells (device, col, row) of one region and its hosts' rows: a multi-device host starts a row
  of its own (wrapping at 8 devices); single-device hosts share rows."""
  by_host: dict[str, list[int]] = {}
  for d in ids:
    by_host.setdefault(cluster.devices[d].host, []).append(d)
  biggest = max(len(v) for v in by_host.values())
  width = min(8, biggest) if biggest > 1 else max(2, min(8, math.ceil(math.sqrt(len(ids)))))
  cells, hosts, row, col = [], [], 0.0, 0
  for host, devs in by_host.items():
    if len(devs) > 1 and col:
      row, col = row + 1 + HOST_GAP, 0
    if len(devs) > 1:
      hosts.append((host, row))
    for d in devs:
      if col == width:
        row, col = row + 1 + (HOST_GAP if biggest > 1 else 0), 0
      cells.append((d, col, row))
      col += 1
  return cells, hosts, width, row + 1


def device_positions(cluster: Cluster):
  """Cell centres (x, y; y grows downwards) of every device, and the labels to draw: (x, y, text,
  kind) for regions and multi-device hosts. Regions are laid out on a grid of blocks."""
  regions = cluster.regions()
  names = list(regions)
  cols = math.ceil(math.sqrt(len(names)))
  blocks = {n: _layout_region(cluster, regions[n]) for n in names}
  col_w = [max(blocks[n][2] for n in names[c::cols]) for c in range(cols)]
  row_h = [max(blocks[n][3] for n in names[r * cols:(r + 1) * cols])
           for r in range(math.ceil(len(names) / cols))]
  multi_host = any(h for b in blocks.values() for h in b[1])
  pos, labels = np.zeros((cluster.n, 2)), []
  for k, name in enumerate(names):
    r, c = divmod(k, cols)
    x0 = sum(col_w[:c]) + GAP * c
    y0 = sum(row_h[:r]) + (GAP + HEADER) * r + HEADER + (HOST_GAP if multi_host else 0)
    cells, hosts, _, _ = blocks[name]
    labels.append((x0, y0 - (HOST_GAP if multi_host else 0) - 0.1, name, 'region'))
    labels += [(x0, y0 + row - 0.05, host, 'host') for host, row in hosts]
    for d, col, row in cells:
      pos[d] = x0 + col + 0.5, y0 + row + 0.5
  return pos, labels


def short_gpu(name: str) -> str:
  return name.split('-')[0]


def gpu_counts(cluster: Cluster) -> str:
  counts: dict[str, int] = {}
  for d in cluster.devices:
    counts[d.gpu] = counts.get(d.gpu, 0) + 1
  return ', '.join(f'{n} x {gpu}' for gpu, n in counts.items())


def draw_plan(plan: Plan, cluster: Cluster, path: str, title: str = '') -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  from matplotlib.patches import Patch, Rectangle

  pos, labels = device_positions(cluster)
  span_x, span_y = pos[:, 0].max() + 0.5, pos[:, 1].max() + 0.5
  inch = min(0.7, 11.0 / span_x, 9.0 / span_y)  # per cell: big for small clusters, capped for large
  legend_rows = math.ceil((plan.num_stages + 3) / 2)
  width = max(5.5, span_x * inch + 0.6)
  fig, ax = plt.subplots(figsize=(width, span_y * inch + 1.0 + 0.22 * legend_rows))
  cmap = plt.get_cmap('tab20' if plan.num_stages > 10 else 'tab10')
  stage_of = {d: k for r in plan.replicas for k, s in enumerate(r.stages) for d in s.devices}
  font = max(4.5, min(8.0, inch * 11))
  for d, dev in enumerate(cluster.devices):
    x, y = pos[d]
    k = stage_of.get(d)
    ax.add_patch(Rectangle((x - 0.45, y - 0.45), 0.9, 0.9, facecolor='white' if k is None else cmap(k % cmap.N),
                           edgecolor='k', lw=0.5, zorder=2))
    ax.text(x, y - 0.15, str(d), ha='center', va='center', fontsize=font, weight='bold', zorder=4)
    ax.text(x, y + 0.2, short_gpu(dev.gpu), ha='center', va='center', fontsize=font * 0.8, zorder=4)
  for host in cluster.hosts():  # frame the devices of multi-device hosts, one frame per cell row
    ids = [d for d in range(cluster.n) if cluster.devices[d].host == host]
    if len(ids) < 2:
      continue
    for y in sorted({pos[d, 1] for d in ids}):
      xs = [pos[d, 0] for d in ids if pos[d, 1] == y]
      ax.add_patch(Rectangle((min(xs) - 0.5, y - 0.5), max(xs) - min(xs) + 1, 1.0, fill=False,
                             edgecolor='dimgray', lw=1.4, ls='--', zorder=3))
  for x, y, text, kind in labels:
    ax.text(x, y, text if kind == 'region' else f'host {text}', ha='left', va='bottom',
            fontsize=font + 1 if kind == 'region' else font * 0.9,
            weight='bold' if kind == 'region' else 'normal', color='k' if kind == 'region' else 'dimgray')
  for i, r in enumerate(plan.replicas):  # pipeline paths between stage leaders
    lead = [s.devices[0] for s in r.stages]
    ax.plot(pos[lead, 0], pos[lead, 1], '-', color='crimson' if i == 0 else 'gray',
            alpha=0.8 if i == 0 else 0.4, lw=2 if i == 0 else 1, zorder=3)
  handles = [Patch(facecolor=cmap(k % cmap.N), edgecolor='k',
                   label=f'stage {k}: layers [{s.start},{s.end}) tp={s.tp}')
             for k, s in enumerate(plan.replicas[0].stages)]
  handles.append(plt.Line2D([], [], color='crimson', lw=2, label='replica 0 path (stage leaders)'))
  if len(plan.replicas) > 1:
    handles.append(plt.Line2D([], [], color='gray', alpha=0.5, label='replica 1' if len(plan.replicas) == 2 else f'replicas 1-{len(plan.replicas) - 1}'))
  if len(stage_of) < cluster.n:
    handles.append(Patch(facecolor='white', edgecolor='k', label='unused'))
  if any(kind == 'host' for *_, kind in labels):
    handles.append(Patch(fill=False, edgecolor='dimgray', ls='--', label='one host'))
  ax.legend(handles=handles, fontsize=7, loc='upper center', bbox_to_anchor=(0.5, 0.0), ncol=3 if width > 7 else 2,
            frameon=False)
  ax.set_xlim(-0.2, span_x + 0.2)
  ax.set_ylim(span_y + 0.2, 0.0)
  ax.set_aspect('equal')
  ax.axis('off')
  pred = plan.prediction.get('total')
  ax.set_title(title or f'{plan.model} on {cluster.name}: {plan.num_stages} stages x {plan.dp} replicas'
               + (f', predicted step {pred:.2f} s' if pred else '') + '\ncell: device id and GPU type; '
               + gpu_counts(cluster), 
               fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
