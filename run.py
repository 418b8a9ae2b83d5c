"""hetjax's single entry point: python run.py --config=configs/X.py --config.a.b=v

The config's `mode` selects the job (a module in hetjax/modes/). With no flags it runs the quickstart.
Every run writes its resolved config (config.json) and metrics.jsonl into --config.workdir."""

import importlib
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)
# On CPU one process shows 8 host devices, so plans with several (TP) stages run in one process;
# processes started by hetjax.launch get their own count. Must precede importing jax.
if 'xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_force_host_platform_device_count=8').strip()

_CONFIG = config_flags.DEFINE_config_file(
    'config', default=os.path.join(ROOT, 'configs', 'quickstart.py'),
    help_string='Job config file (configs/*.py); override any field with --config.a.b=v.')


def run_config(cfg) -> str:
  """Run the job a config describes; returns its workdir."""
  from hetjax.config_check import check_config
  from hetjax.errors import HetjaxError
  from hetjax.metrics import make_workdir, write_json
  check_config(cfg)  # every field's type and range, before any work
  try:
    mode = importlib.import_module(f'hetjax.modes.{cfg.mode}')
  except ModuleNotFoundError:
    modes = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, 'hetjax', 'modes'))
                   if f.endswith('.py') and not f.startswith('_'))
    raise HetjaxError(f'unknown mode {cfg.mode!r}; choose one of: {", ".join(modes)}') from None
  workdir = make_workdir(cfg.get('workdir'), cfg.mode)
  write_json(os.path.join(workdir, 'config.json'), cfg.to_dict())
  mode.run(cfg, workdir)
  return workdir


def _one_line(e: BaseException) -> str:
  return ' '.join(str(e).replace('"', '').split())


def parse_flags(argv):
  """absl flag parsing that turns a bad --config (missing file, unknown key, wrong type) into one
  line on stderr and exit code 2, instead of a traceback."""
  try:
    rest = flags.FLAGS(argv)
    _CONFIG.value.get('mode')  # loads the config file now, so its errors surface here
    return rest
  except flags.Error as e:
    message = _one_line(e)
  except OSError as e:
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    message = f'cannot load config file: {lines[-1]}'
  except (OSError, KeyError, AttributeError, TypeError, ValueError) as e:
    message = f'bad --config: {_one_line(e)}'
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  from hetjax import distributed
  from hetjax.errors import HetjaxError
  distributed.initialize()  # joins the other processes when started by hetjax.launch / SLURM
  try:
    run_config(_CONFIG.value)
  except HetjaxError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
