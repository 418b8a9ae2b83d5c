"""Timelines of one pipeline step: Chrome trace JSON (chrome://tracing, Perfetto) and a Gantt PNG."""

from __future__ import annotations

import json
import os


def write_chrome_trace(events: list[dict], path: str) -> None:
  """events: {'kind', 'stage', 'micro', 'start_s', 'end_s'} as recorded by Pipeline(profile=True)."""
  trace = [{'name': f'{e["kind"]}{e["micro"]}', 'ph': 'X', 'pid': 0, 'tid': e['stage'],
            'ts': e['start_s'] * 1e6, 'dur': (e['end_s'] - e['start_s']) * 1e6,
            'args': {'micro_batch': e['micro']}} for e in events]
  trace += [{'name': 'thread_name', 'ph': 'M', 'pid': 0, 'tid': s, 'args': {'name': f'stage {s}'}}
            for s in sorted({e['stage'] for e in events})]
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    json.dump({'traceEvents': trace}, f)
  os.replace(tmp, path)


def draw_gantt(events: list[dict], path: str, title: str = '') -> None:
  """Stages as rows, forward ops blue and backward ops orange; gaps are the pipeline bubbles."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  stages = sorted({e['stage'] for e in events})
  fig, ax = plt.subplots(figsize=(10, 1 + 0.6 * len(stages)))
  for e in events:
    color = '#4c72b0' if e['kind'] == 'F' else '#dd8452'
    ax.barh(e['stage'], e['end_s'] - e['start_s'], left=e['start_s'], color=color, edgecolor='k')
    ax.text((e['start_s'] + e['end_s']) / 2, e['stage'], f'{e["kind"]}{e["micro"]}', ha='center',
            va='center', fontsize=7, color='white')
  ax.set_yticks(stages, [f'stage {s}' for s in stages])
  ax.invert_yaxis()
  ax.set_xlabel('seconds since step start')
  ax.set_title(title or 'one pipeline step (blue: forward, orange: backward)')
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
