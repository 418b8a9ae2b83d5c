"""What the runtime carries between ops, each value with an explicit lifetime.

- 'op':    lives until the op that needs it pops it (stashed stage inputs, in-flight messages);
- 'step':  cleared at the end of a training step or generation round (gradient sums, losses);
- 'group': lives as long as a generation request group (its KV caches, its sampled tokens);
- 'run':   lives for the whole run and is checkpointed (optimizer state, codec state).

`SampleState` is per-sample codec memory (AQ-SGD's activation buffers): rows keyed by sample id.
A codec's sender and receiver each keep one, on their own process, and update both the same way.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

LIFETIMES = ('op', 'step', 'group', 'run')


class StateStore:

  def __init__(self):
    self._values = {life: {} for life in LIFETIMES}

  def put(self, lifetime: str, key, value) -> None:
    self._values[lifetime][key] = value

  def get(self, lifetime: str, key, default=None):
    return self._values[lifetime].get(key, default)

  def pop(self, lifetime: str, key, default=None):
    return self._values[lifetime].pop(key, default)

  def has(self, lifetime: str, key) -> bool:
    return key in self._values[lifetime]

  def items(self, lifetime: str):
    return list(self._values[lifetime].items())

  def clear(self, lifetime: str, where=None) -> None:
    """Drop one lifetime's values (only keys for which `where(key)` holds, when given)."""
    values = self._values[lifetime]
    for key in [k for k in values if where is None or where(k)]:
      del values[key]

  def __len__(self) -> int:
    return sum(len(v) for v in self._values.values())


class SampleState:
  """Per-sample codec state held in device memory: `gather(ids)` stacks the rows of `ids` (None
  when any of them has no row yet: the codec then sends in full and the rows are filled)."""

  def __init__(self):
    self.rows: dict[int, object] = {}

  def gather(self, ids):
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    if not ids or any(i not in self.rows for i in ids):
      return None
    return jax.tree.map(lambda *rows: jnp.stack(rows), *[self.rows[i] for i in ids])

  def scatter(self, ids, state) -> None:
    for k, i in enumerate(np.asarray(ids).reshape(-1)):
      self.rows[int(i)] = jax.tree.map(lambda a: a[k], state)

  def reset(self) -> None:
    self.rows.clear()

  def state_dict(self) -> dict:
    return {str(i): jax.tree.map(np.asarray, r) for i, r in sorted(self.rows.items())}
