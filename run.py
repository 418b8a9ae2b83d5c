"""hetjax's single entry point: python run.py --config=configs/X.py --config.a.b=v

The config's `mode` selects the job (a module in hetjax/modes/). With no flags it runs the quickstart.
`--help` lists the configs; `--config=configs/X.py --config.help` lists X's fields with their defaults
and meanings. Runs that produce files write them, with the resolved config.json, into --config.workdir."""

import ast
import difflib
import glob
import importlib.util
import logging as py_logging
import os
import shutil
import sys

from absl import app, flags, logging
from ml_collections import ConfigDict, config_flags

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)
# On CPU one process shows 8 host devices, so plans with several (TP) stages run in one process;
# processes started by hetjax.launch get their own count. Must precede importing jax.
if 'xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_force_host_platform_device_count=8').strip()
# "Unable to initialize backend 'tpu'" and similar start-up chatter.
py_logging.getLogger('jax._src.xla_bridge').setLevel(py_logging.WARNING)

DEFAULT_CONFIG = os.path.join(ROOT, 'configs', 'quickstart.py')
_CONFIG = config_flags.DEFINE_config_file(
    'config', default=DEFAULT_CONFIG,
    help_string='Job config file (configs/*.py); override any field with --config.a.b=v; '
                '--config.help lists the fields.')
PRINT_ONLY_MODES = ('model_info', 'generate')  # no workdir unless --config.workdir is given
FAILED_FILE = 'FAILED.txt'


def run_config(cfg) -> str | None:
  """Run the job a config describes; returns its workdir (None for a print-only run without one)."""
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
  writes_files = bool(cfg.get('offload') and cfg.offload.policy)  # offload_metrics.json, disk tier
  if not cfg.get('workdir') and cfg.mode in PRINT_ONLY_MODES and not writes_files:
    mode.run(cfg, None)
    return None
  existed = bool(cfg.get('workdir')) and os.path.exists(cfg.workdir)
  workdir = make_workdir(cfg.get('workdir'), cfg.mode)
  try:
    write_json(os.path.join(workdir, 'config.json'), cfg.to_dict())
    mode.run(cfg, workdir)
  except BaseException as e:
    _leave_reason(workdir, existed, e)
    raise
  if not cfg.get('workdir') and os.listdir(workdir) == ['config.json']:
    _remove(workdir)  # e.g. the non-leader processes of a multi-controller run
    return None
  return workdir


def _remove(workdir: str) -> None:
  """Delete a workdir, and runs/ too if that leaves it empty."""
  shutil.rmtree(workdir)
  parent = os.path.dirname(workdir)
  if os.path.basename(parent) == 'runs' and not os.listdir(parent):
    os.rmdir(parent)


def _leave_reason(workdir: str, existed: bool, error: BaseException) -> None:
  """A failed run leaves nothing behind, or (when it wrote more than its config) FAILED.txt."""
  try:
    if not existed and os.listdir(workdir) == ['config.json']:
      _remove(workdir)
    else:
      with open(os.path.join(workdir, FAILED_FILE), 'w') as f:
        f.write(f'{type(error).__name__}: {_one_line(error) or "interrupted"}\n')
  except OSError:
    pass


def _one_line(e: BaseException) -> str:
  return ' '.join(str(e).replace('"', '').split())


# ------------------------------------------------------------------ discoverability
def _docstring(path: str) -> str:
  with open(path) as f:
    return ast.get_docstring(ast.parse(f.read())) or ''


def config_files() -> list[str]:
  """The job configs (configs/*.py that define get_config), quickstart first."""
  paths = [p for p in sorted(glob.glob(os.path.join(ROOT, 'configs', '*.py')))
           if 'def get_config' in open(p).read() and not p.endswith('base.py')]
  return sorted(paths, key=lambda p: not p.endswith('quickstart.py'))


def load_config(path: str) -> ConfigDict:
  """The config a file describes, without overrides (as config_flags loads it)."""
  path, _, arg = path.partition(':')
  spec = importlib.util.spec_from_file_location('_hetjax_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def print_usage() -> None:
  print(__doc__.split('\n\n')[0] + '\n')
  print('Configs (--config=...) and the mode each runs:')
  for path in config_files():
    rel = os.path.relpath(path, ROOT)
    mode = load_config(path).mode
    first = _docstring(path).splitlines()[0] if _docstring(path) else ''
    print(f'  {rel:<28} {mode:<15} {first}')
  print('\nFlags:\n  --config=FILE        job config (default: configs/quickstart.py)\n'
        '  --config.a.b=V       override a field\n'
        '  --config.help        list the chosen config\'s fields, defaults and meanings\n'
        '  --help, --helpfull   this text (--helpfull adds the fields of --config)')


def field_items(cfg: ConfigDict, prefix: str = ''):
  for key in cfg.keys():
    value = cfg[key]
    if isinstance(value, ConfigDict):
      yield from field_items(value, f'{prefix}{key}.')
    else:
      yield f'{prefix}{key}', value


def print_fields(path: str) -> None:
  from configs.field_help import meaning
  name = os.path.splitext(os.path.basename(path.partition(':')[0]))[0]
  items = list(field_items(load_config(path)))
  width = max(len(f'{k}={v!r}') for k, v in items)
  print(f'{os.path.relpath(path, ROOT)}: {_docstring(path.partition(":")[0]).splitlines()[0]}')
  print('Override any field with --config.FIELD=VALUE:')
  for key, value in items:
    print(f'  {f"{key}={value!r}":<{width}}  {meaning(name, key) or ""}')


def _config_path(argv) -> str:
  path = DEFAULT_CONFIG
  for i, a in enumerate(argv):
    if a.startswith('--config='):
      path = a.split('=', 1)[1]
    elif a == '--config' and i + 1 < len(argv):
      path = argv[i + 1]
  return path


def unknown_override(cfg: ConfigDict, argv) -> str | None:
  """'unknown field a.b; did you mean a.c?' for the first --config.a.b that names no field."""
  fields = [k for k, _ in field_items(cfg)]
  for a in argv:
    if not a.startswith('--config.'):
      continue
    key = a[len('--config.'):].split('=', 1)[0]
    node = cfg
    for part in key.split('.'):
      if not isinstance(node, ConfigDict) or part not in node:
        close = difflib.get_close_matches(key, fields, n=1, cutoff=0.6)
        return f'unknown field {key}' + (f'; did you mean {close[0]}?' if close else
                                         '; --config.help lists the fields')
      node = node[part]
  return None


def parse_flags(argv):
  """absl flag parsing that handles --help and --config.help, and turns a bad --config (missing
  file, unknown field, wrong type) into one line on stderr and exit code 2, instead of a traceback."""
  args = argv[1:]
  wants_fields = any(a in ('--config.help', '--config.help=true', '--helpfull') for a in args)
  if any(a in ('-h', '--help', '-?', '--helpshort', '--helpfull') for a in args):
    print_usage()
    if not wants_fields:
      sys.exit(0)
    print()
  path = _config_path(args)
  try:
    if wants_fields:
      print_fields(path)
      sys.exit(0)
    problem = unknown_override(load_config(path), args)
    if problem:
      print(f'error: {problem}', file=sys.stderr)
      sys.exit(2)
    rest = flags.FLAGS(argv)
    _CONFIG.value.get('mode')  # loads the config file now, so its errors surface here
    return rest
  except flags.Error as e:
    message = _one_line(e)
  except OSError as e:
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    message = f'cannot load config file: {lines[-1] if lines else e}'
  except (KeyError, AttributeError, TypeError, ValueError) as e:
    message = f'bad --config: {_one_line(e)}'
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def main(argv):
  del argv
  sys.stdout.reconfigure(line_buffering=True)  # progress lines show at once under | tee or > log
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
