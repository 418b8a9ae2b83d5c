"""Every command in README.md and in the configs' docstrings runs as written: each is checked against
the real flags (config fields and their types, launcher and experiment options), the cheap ones run
as written, and the slow ones run with tiny sizes. The README's table of experiment scripts matches
the scripts' docstrings, and every script follows the one style (absl flags with help, --out
defaulting to runs/<script>/, a `Reproduces:` line)."""

import ast
import glob
import os
import re
import shlex
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, 'README.md')
EXPERIMENTS = sorted(p for p in glob.glob(os.path.join(ROOT, 'experiments', '*.py'))
                     if not p.endswith('common.py'))
PLACEHOLDER = re.compile(r'^[A-Z][A-Z_]+$')  # HF_DIR, CKPT_DIR: the user fills these in


def _commands_in(lines):
  """Shell commands (python ..., pip ...) in indented blocks, with backslash continuations joined."""
  commands, current = [], ''
  for line in lines:
    text = line.strip()
    if current:
      current += ' ' + text.rstrip('\\').strip()
      if not text.endswith('\\'):
        commands.append(current)
        current = ''
    elif re.match(r'^(python|pip) ', text):
      if text.endswith('\\'):
        current = text.rstrip('\\').strip()
      else:
        commands.append(text.split('  #')[0].strip())
  return commands


def readme_commands():
  lines, fenced = [], False
  for line in open(README).read().splitlines():
    if line.startswith('```'):
      fenced = not fenced
    elif not fenced and line.startswith('    '):
      lines.append(line)
  return _commands_in(lines)


def docstring_commands():
  found = []
  for path in sorted(glob.glob(os.path.join(ROOT, 'configs', '*.py'))):
    doc = ast.get_docstring(ast.parse(open(path).read())) or ''
    found += [(os.path.relpath(path, ROOT), c) for c in _commands_in(doc.splitlines())]
  return found


ALL = list({c: (source, c) for source, c in
             reversed([('README.md', c) for c in readme_commands()] + docstring_commands())}.values())[::-1]


def _parts(command):
  """A command as argv lists: pip/python pieces split at '&&', a launcher's inner command apart."""
  for piece in command.split('&&'):
    argv = shlex.split(piece)
    if argv[:3] == ['python', '-m', 'hetjax.launch']:
      cut = argv.index('--')
      yield argv[:cut]
      yield argv[cut + 1:]
    else:
      yield argv


def check_run_py(args):
  """Parse run.py's flags exactly as run.py does (absl + config_flags, types included)."""
  sys.path.insert(0, ROOT)
  import run
  args = [a for a in args if a not in ('--config.help', '--help', '--helpfull')]
  assert run.unknown_override(run.load_config(run._config_path(args)), args) is None
  values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file('config', default=run.DEFAULT_CONFIG, flag_values=values,
                                           sys_argv=['run.py', *args])
  values(['run.py', *args])
  assert holder.value.mode


def _launcher_options():
  out = subprocess.run([sys.executable, '-m', 'hetjax.launch', '--help'], cwd=ROOT,
                       capture_output=True, text=True, timeout=60).stdout
  return set(re.findall(r'(--?\w+)', out))


def experiment_flags(path):
  """Names, defaults and help of the absl flags a script defines, read without running it."""
  found = {}
  for node in ast.walk(ast.parse(open(path).read())):
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
        and node.func.attr.startswith('DEFINE_') and node.args):
      name = ast.literal_eval(node.args[0])
      default = node.args[1] if len(node.args) > 1 else None
      help_node = node.args[2] if len(node.args) > 2 else next(
          (k.value for k in node.keywords if k.arg == 'help'), None)
      found[name] = (default, help_node)
  return found


def check_argv(argv):
  if argv[0] == 'pip':
    assert argv[1:3] == ['install', '-r'] and os.path.isfile(os.path.join(ROOT, argv[3]))
  elif argv[1:3] == ['-m', 'pytest']:
    assert os.path.isdir(os.path.join(ROOT, argv[-1])) and set(argv[3:-1]) <= {'-q', '-x', '-m', 'not slow'}
  elif argv[1:3] == ['-m', 'hetjax.launch']:
    options = _launcher_options()
    assert all(a.split('=')[0] in options for a in argv[3:] if a.startswith('-')), argv
  elif argv[1] == 'run.py':
    check_run_py(argv[2:])
  else:
    script = os.path.join(ROOT, argv[1])
    assert os.path.isfile(script), argv[1]
    names = experiment_flags(script)
    assert all(a[2:].split('=')[0] in names for a in argv[2:] if a.startswith('--')), argv


@pytest.mark.parametrize('source, command', ALL, ids=[c[:90] for _, c in ALL])
def test_documented_command_matches_the_real_flags(monkeypatch, source, command):
  monkeypatch.chdir(ROOT)
  for argv in _parts(command):
    if not any(PLACEHOLDER.match(a.split('=')[-1]) for a in argv):
      check_argv(argv)


def test_commands_were_found():
  text = ' '.join(c for _, c in ALL)
  for needle in ('configs/model_info.py', 'configs/plan.py', 'hetjax.launch', 'pytest', '--help'):
    assert needle in text


# Commands cheap enough to run exactly as written (seconds each, no workdir left behind).
CHEAP = [c for _, c in ALL if re.search(r'--help|--config.help|configs/model_info.py', c)]


def _run(argv, timeout=300):
  env = {**os.environ, 'XLA_FLAGS': '', 'JAX_PLATFORMS': 'cpu'}
  return subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout)


@pytest.mark.parametrize('command', CHEAP)
def test_cheap_commands_run_as_written(command):
  before = set(os.listdir(ROOT))
  r = _run(shlex.split(command))
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.strip()
  assert 'Unable to initialize backend' not in r.stderr
  assert set(os.listdir(ROOT)) - before == set()  # no runs/ folder for print-only commands


# The rest run with tiny sizes: these overrides are appended to the command as written.
TINY = {
    'configs/quickstart.py': ['--config.train.steps=2', '--config.train.eval_every=0',
                              '--config.pipeline.search_evaluations=20',
                              '--config.pipeline.profile_every=1', '--config.generate.max_new_tokens=4'],
    'configs/generate.py': ['--config.generate.max_new_tokens=4'],
    'configs/train.py': ['--config.train.steps=2', '--config.train.eval_every=0',
                         '--config.pipeline.search_evaluations=20'],
    'configs/plan.py': ['--config.search.evaluations=20', '--config.search.screen_evaluations=10',
                        '--config.search.population=10', '--config.draw=false'],
    'configs/plan_inference.py': ['--config.evaluations=20', '--config.population=8',
                                  '--config.num_requests=50', '--config.draw=false'],
    'configs/offload_policy.py': [],
    'configs/calibrate.py': ['--config.model_overrides.num_layers=1', '--config.calibrate.seq_len=16',
                             '--config.calibrate.micro_batch_size=2', '--config.calibrate.reps=1'],
    'configs/serve.py': ['--config.num_requests=2', '--config.generate.max_new_tokens=2'],
}


def _small(command):
  """(run.py argv, tiny overrides) for a command that is not cheap, needs no placeholder and is
  not a launcher run (tests/test_multicontroller.py covers those)."""
  if 'hetjax.launch' in command or any(PLACEHOLDER.match(a.split('=')[-1]) for a in shlex.split(command)):
    return None
  for argv in _parts(command):
    if argv[:2] == ['python', 'run.py']:
      config = os.path.relpath(run_config_path(argv[2:]), ROOT)
      return argv, TINY[config]
  return None


def run_config_path(args):
  sys.path.insert(0, ROOT)
  import run
  return run._config_path(args)


SMALL = [t for _, c in ALL if c not in CHEAP and (t := _small(c))]


@pytest.mark.slow
@pytest.mark.parametrize('command, extra', SMALL, ids=lambda x: ' '.join(x)[:80])
def test_commands_run_with_tiny_sizes(tmp_path, command, extra):
  workdir = [] if 'configs/generate.py' in command else [f'--config.workdir={tmp_path}']
  argv = [a for a in command if not a.startswith('--config.workdir=')]
  r = _run(argv + extra + workdir)
  assert r.returncode == 0, r.stderr[-2000:]


# ------------------------------------------------------------------ experiment scripts
def _doc(path):
  return ast.get_docstring(ast.parse(open(path).read())) or ''


def readme_script_rows():
  rows = re.findall(r'^\| `(experiments/\w+\.py)` \| (.*) \|$', open(README).read(), re.M)
  return dict(rows)


def expected_script_rows():
  return {os.path.relpath(p, ROOT): _doc(p).splitlines()[0] for p in EXPERIMENTS}


def test_readme_script_table_matches_the_scripts():
  expected = expected_script_rows()
  table = '\n'.join(f'| `{k}` | {v} |' for k, v in expected.items())
  assert readme_script_rows() == expected, f'README table should read:\n{table}'


@pytest.mark.parametrize('path', EXPERIMENTS, ids=os.path.basename)
def test_experiment_script_style(path):
  source, name = open(path).read(), os.path.splitext(os.path.basename(path))[0]
  assert 'argparse' not in source, 'use absl flags'
  assert re.search(r'^Reproduces: ', _doc(path), re.M), 'docstring needs a "Reproduces:" line'
  defined = experiment_flags(path)
  assert 'out' in defined, 'needs --out'
  default, _ = defined['out']
  assert ast.literal_eval(default) == f'runs/{name}/'
  for flag, (_, help_node) in defined.items():
    assert help_node is not None and (not isinstance(help_node, ast.Constant) or help_node.value), flag
  assert 'savefig' in source or 'save_figure' in source, 'writes no PNG'
  assert 'write_csv' in source and 'print_table' in source


def test_readme_images_exist_and_stay_small():
  images = re.findall(r'!\[[^]]*\]\(([^)]+)\)', open(README).read())
  assert images
  for path in images:
    assert os.path.isfile(os.path.join(ROOT, path)), path
  assert sum(os.path.getsize(os.path.join(ROOT, p)) for p in images) < 300_000


@pytest.mark.slow
def test_launcher_example_runs_after_its_plan_command(tmp_path):
  """The README's multi-controller example: its plan command (tiny search), then the launcher."""
  plan_cmd = next(c for _, c in ALL if 'configs/plan.py' in c and 'local_plan' in c)
  launch_cmd = next(c for _, c in ALL if 'hetjax.launch' in c)
  plan_dir = str(tmp_path / 'local_plan')
  plan_argv = [a.replace('runs/local_plan', plan_dir) for a in shlex.split(plan_cmd)]
  r = _run(plan_argv + TINY['configs/plan.py'])
  assert r.returncode == 0, r.stderr[-2000:]
  launch_argv = [a.replace('runs/local_plan', plan_dir) for a in shlex.split(launch_cmd)]
  launch_argv += ['--config.train.steps=2', '--config.train.eval_every=0',
                  f'--config.workdir={tmp_path / "work"}']
  env = {**os.environ, 'XLA_FLAGS': '', 'JAX_PLATFORMS': 'cpu'}
  r = subprocess.run([sys.executable, *launch_argv[1:3], '--timeout=400', *launch_argv[3:]], cwd=ROOT,
                     env=env, capture_output=True, text=True, timeout=500)
  assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
  assert 'step     2/2' in r.stdout
