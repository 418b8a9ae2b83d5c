"""Timelines of one pipeline step: Chrome trace JSON (chrome://tracing, Perfetto) and a Gantt PNG."""

from __future__ import annotations

import json
import os


def write_chrome_trace(events: list[dict], path: str) -> None:
  """events: {'kind', 'stage', 'micro', 'start_s', 'end_s', 'process'?, 'wait_s'?} as recorded by
  Pipeline(profile=True), every process's. One trace process per runtime process, one thread per
  stage; the last stage's fused forward + backward is named F+B."""
  last = max((e['stage'] for e in events), default=0)
  name = lambda e: (f'F+B{e["micro"]}' if e['stage'] == last and e['kind'] == 'F' and last > 0
                    else f'{e["kind"]}{e["micro"]}')
  trace = [{'name': name(e), 'ph': 'X', 'pid': e.get('process', 0), 'tid': e['stage'],
            'ts': e['start_s'] * 1e6, 'dur': (e['end_s'] - e['start_s']) * 1e6,
            'args': {'micro_batch': e['micro'], 'waited_for_inputs_s': e.get('wait_s', 0.0)}}
           for e in events]
  trace += [{'name': 'thread_name', 'ph': 'M', 'pid': p, 'tid': s, 'args': {'name': f'stage {s}'}}
            for p, s in sorted({(e.get('process', 0), e['stage']) for e in events})]
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    json.dump({'traceEvents': trace}, f)
  os.replace(tmp, path)


COLORS = {'F': '#4c72b0', 'B': '#dd8452', 'FB': '#8172b3', 'send': '#b0b0b0'}


def draw_gantt(events: list[dict], path: str, title: str = '') -> None:
  """Stages as rows. Forward ops blue, backward orange; the last stage computes its forward and
  backward together (one fused op, purple) and its 'B' op only sends; grey hatched bars are the
  transfers after an op (events with 'compute_end_s'). Gaps are the pipeline bubbles."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  from matplotlib.patches import Patch
  stages = sorted({e['stage'] for e in events})
  last = stages[-1] if len(stages) > 1 else None
  fig, ax = plt.subplots(figsize=(10, 1.6 + 0.6 * len(stages)))
  span = max(e['end_s'] for e in events) - min(e['start_s'] for e in events)
  for e in events:
    fused = e['stage'] == last and e['kind'] == 'F'
    compute_end = e.get('compute_end_s', e['end_s'])
    if not (e['stage'] == last and e['kind'] == 'B'):  # the last stage's B only sends
      ax.barh(e['stage'], compute_end - e['start_s'], left=e['start_s'],
              color=COLORS['FB' if fused else e['kind']], edgecolor='k')
      if compute_end - e['start_s'] > 0.025 * span:  # label the bars wide enough to hold one
        ax.text((e['start_s'] + compute_end) / 2, e['stage'],
                f'F+B{e["micro"]}' if fused else f'{e["kind"]}{e["micro"]}', ha='center',
                va='center', fontsize=7, color='white')
    ax.barh(e['stage'], e['end_s'] - compute_end, left=compute_end, color=COLORS['send'],
            hatch='///', edgecolor='k', height=0.5)
  ax.set_yticks(stages, [f'stage {s}' for s in stages])
  ax.invert_yaxis()
  ax.set_xlabel('seconds since step start')
  ax.set_title(title or 'one profiled pipeline step (each op waits for its results)', fontsize=10)
  legend = [Patch(color=COLORS['F'], label='forward'), Patch(color=COLORS['B'], label='backward')]
  if last is not None:
    legend.append(Patch(color=COLORS['FB'], label=f'stage {last}: fused forward + backward (+ loss)'))
  legend.append(Patch(facecolor=COLORS['send'], hatch='///', edgecolor='k', label='send to next/previous stage'))
  ax.legend(handles=legend, fontsize=7, ncol=len(legend), loc='upper center',
            bbox_to_anchor=(0.5, -0.25 if len(stages) < 3 else -0.15), frameon=False)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
