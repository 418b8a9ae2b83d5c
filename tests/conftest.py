"""Test set-up: 8 host CPU devices so sharding and pipeline tests run on one machine."""
import os
import sys

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import importlib.util

from absl import flags
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='session')
def experiment():
  """Imports experiments/<name>.py once as a module. The absl flags it (and the experiments it
  imports) defines are taken out of the global flag set afterwards, so scripts that define the same
  flag (--out) can all be imported in one test process; tests call their functions, not main()."""
  def load(name):
    if name not in sys.modules:
      before = set(flags.FLAGS)
      spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, 'experiments', f'{name}.py'))
      module = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(module)
      sys.modules[name] = module
      for flag in set(flags.FLAGS) - before:
        delattr(flags.FLAGS, flag)
    return sys.modules[name]
  return load
