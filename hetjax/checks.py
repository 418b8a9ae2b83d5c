"""Typed, range- and finiteness-checked reads of user input (configs, plans, cluster files).

Each check returns the value (as a plain Python number where it is one) or raises a one-line
HetjaxError naming the field: `what` is how the user wrote it, e.g. 'train.lr' or 'replica 0 stage 1
devices[2]'."""

from __future__ import annotations

import math
import numbers

from hetjax.errors import HetjaxError


def _range(value, what, lo, hi, lo_open=False):
  if lo is not None and (value < lo or (lo_open and value == lo)):
    raise HetjaxError(f'{what} must be {">" if lo_open else ">="} {lo:g}, got {value!r}')
  if hi is not None and value > hi:
    raise HetjaxError(f'{what} must be <= {hi:g}, got {value!r}')


def integer(value, what: str, lo=None, hi=None) -> int:
  """An int (not a bool, not 2.5) in [lo, hi]."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise HetjaxError(f'{what} must be an integer, got {value!r}')
  value = int(value)
  _range(value, what, lo, hi)
  return value


def real(value, what: str, lo=None, hi=None, lo_open=False) -> float:
  """A finite number in [lo, hi] ((lo, hi] with lo_open)."""
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise HetjaxError(f'{what} must be a number, got {value!r}')
  value = float(value)
  if not math.isfinite(value):
    raise HetjaxError(f'{what} must be finite, got {value!r}')
  _range(value, what, lo, hi, lo_open)
  return value


def text(value, what: str, choices=None) -> str:
  if not isinstance(value, str):
    raise HetjaxError(f'{what} must be a string, got {value!r}')
  if choices is not None and value not in choices:
    raise HetjaxError(f'{what} must be one of {", ".join(map(repr, choices))}; got {value!r}')
  return value


def flag(value, what: str) -> bool:
  if not isinstance(value, bool):
    raise HetjaxError(f'{what} must be true or false, got {value!r}')
  return value


def mapping(value, what: str) -> dict:
  if not isinstance(value, dict):
    raise HetjaxError(f'{what} must be a JSON object, got {type(value).__name__}')
  return value


def sequence(value, what: str, min_len=0, max_len=None) -> list:
  if not isinstance(value, (list, tuple)):
    raise HetjaxError(f'{what} must be a list, got {type(value).__name__}')
  if len(value) < min_len or (max_len is not None and len(value) > max_len):
    bound = f'{min_len}..{max_len}' if max_len is not None else f'at least {min_len}'
    raise HetjaxError(f'{what} must have {bound} entries, got {len(value)}')
  return list(value)
