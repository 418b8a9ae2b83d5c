"""What every experiment script shares: one style (absl flags with help, --out defaulting to
runs/<script>/, a docstring with a `Reproduces:` line), CSV + PNG outputs, and a table printed last.
tests/test_readme.py checks the style and the README's table of scripts."""

import csv
import logging
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
logging.getLogger('jax._src.xla_bridge').setLevel(logging.WARNING)  # "Unable to initialize backend 'tpu'"


def write_csv(path: str, rows: list[dict]) -> None:
  """Rows (dicts with the same keys) to CSV, atomically."""
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  tmp = f'{path}.tmp'
  with open(tmp, 'w', newline='') as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
  os.replace(tmp, path)


def save_figure(fig, path: str, dpi: int = 110) -> None:
  """Write a matplotlib figure (atomically) and close it."""
  import matplotlib.pyplot as plt
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  fig.tight_layout()
  tmp = f'{path}.tmp.png'
  fig.savefig(tmp, dpi=dpi)
  os.replace(tmp, path)
  plt.close(fig)


def _cell(v, precision: str) -> str:
  return f'{v:{precision}}' if isinstance(v, float) else str(v)


def print_table(rows: list[dict], precision: str = '.3g', columns: list[str] | None = None) -> None:
  """Rows as a right-aligned table; each column as wide as its header or widest value."""
  keys = columns or list(rows[0])
  cells = [[_cell(r.get(k, ''), precision) for k in keys] for r in rows]
  widths = [max([len(k)] + [len(c[i]) for c in cells]) for i, k in enumerate(keys)]
  print('  '.join(f'{k:>{w}}' for k, w in zip(keys, widths)))
  for c in cells:
    print('  '.join(f'{v:>{w}}' for v, w in zip(c, widths)))


def wrote(out: str, *names: str) -> None:
  print(f'wrote {", ".join(os.path.join(out, n) for n in names)}')
