"""What every experiment script does at the end: write rows as CSV and print them as a table."""

import csv
import os


def write_csv(path: str, rows: list[dict]) -> None:
  """Rows (dicts with the same keys) to CSV, atomically."""
  tmp = f'{path}.tmp'
  with open(tmp, 'w', newline='') as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
  os.replace(tmp, path)


def print_table(rows: list[dict], width: int = 10, precision: str = '.3g') -> None:
  keys = list(rows[0])
  print(' '.join(f'{k:>{width}s}' for k in keys))
  for r in rows:
    print(' '.join(f'{v:>{width}{precision}}' if isinstance(v, float) else f'{str(v):>{width}s}'
                   for v in r.values()))
