"""Tensors named by their global path, so any stage plan can read any other plan's tensors.

A stage's train state (parameters, optimizer state, extra buffers) is a pytree whose leaf paths use
global names: blocks are keyed by global layer index, and optax's moments mirror the parameter tree.
So `params/blocks/7/attn/q/kernel` and `opt_state/1/0/mu/blocks/7/attn/q/kernel` mean the same
tensor under every plan. Re-partitioning is: pool the tensors of the old stages by name, then fill
each new stage's template by name (scalars such as optax's step count are shared by all stages).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import numpy as np

from hetjax.errors import HetjaxError


def _key_name(key) -> str:
  for attr in ('key', 'idx', 'name'):  # DictKey, SequenceKey, GetAttrKey
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_name(path) -> str:
  """'blocks/3/attn/q/kernel' for a jax key path (an nnx Variable's trailing `.value` dropped)."""
  parts = [_key_name(k) for k in path]
  if len(parts) > 1 and parts[-1] == 'value':
    parts = parts[:-1]
  return '/'.join(parts)


def flatten(tree) -> dict[str, Any]:
  """{global name: leaf} of a pytree."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  out = {path_name(p): x for p, x in leaves}
  if len(out) != len(leaves):
    raise HetjaxError('two leaves of the tree share one name')
  return out


def nest(flat: Mapping[str, Any]) -> dict:
  """Nested dicts from '/'-separated names (the form orbax stores)."""
  out: dict = {}
  for name, x in flat.items():
    *parents, leaf = name.split('/')
    node = out
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = x
  return out


def shape_error(name: str, saved, wanted) -> HetjaxError:
  return HetjaxError(f'checkpoint tensor {name} has shape {tuple(saved)} but the model expects '
                     f'{tuple(wanted)}; was it written for a different model config?')


def check(template, shapes: Mapping[str, Sequence[int]]) -> None:
  """Raise a one-line error for the first tensor of `template` (in its order) that `shapes` lacks or
  holds with another shape."""
  for name, want in flatten(template).items():
    if name not in shapes:
      raise HetjaxError(f'checkpoint has no tensor {name}')
    if tuple(shapes[name]) != tuple(np.shape(want)):
      raise shape_error(name, shapes[name], np.shape(want))


def fill(template, flat: Mapping[str, Any]):
  """`template`'s structure with each leaf taken from `flat` by name, cast to the template's dtype."""
  check(template, {name: np.shape(x) for name, x in flat.items()})
  paths, treedef = jax.tree_util.tree_flatten_with_path(template)
  leaves = []
  for path, want in paths:
    x = flat[path_name(path)]
    dtype = getattr(want, 'dtype', None)
    leaves.append(x if dtype is None or x.dtype == dtype else x.astype(dtype))
  return jax.tree_util.tree_unflatten(treedef, leaves)


def pool(states: Sequence[Any]) -> dict[str, Any]:
  """All stages' tensors by name; a tensor several stages hold (tied tables, counters) is taken once."""
  out: dict[str, Any] = {}
  for state in states:
    for name, x in flatten(state).items():
      out.setdefault(name, x)
  return out


def repartition(states: Sequence[Any], templates: Sequence[Any]) -> list:
  """Stage states written under one plan, re-cut to the stage templates of another plan."""
  pooled = pool(states)
  return [fill(t, pooled) for t in templates]
