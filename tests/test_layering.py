"""Dependency arrows point one way (DESIGN.md, "Layering"): a walk over every module's imports."""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def modules():
  """Module name -> the hetjax/kernels modules it imports (at any depth of the file)."""
  out = {}
  for top in ('hetjax', 'kernels'):
    for folder, _, files in os.walk(os.path.join(ROOT, top)):
      for f in files:
        if not f.endswith('.py'):
          continue
        path = os.path.join(folder, f)
        name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, '.').removesuffix('.__init__')
        tree = ast.parse(open(path).read())
        found = set()
        for node in ast.walk(tree):
          if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
          elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f'{node.module}.{a.name}' for a in node.names)
        out[name] = {m for m in found if m.split('.')[0] in ('hetjax', 'kernels')}
  return out


def imports_from(mods, who, prefixes):
  return sorted((m, i) for m, imported in mods.items() if m.startswith(who)
                for i in imported if any(i == p or i.startswith(p + '.') for p in prefixes))


RULES = [
    # (importer prefix, forbidden prefixes, why)
    ('hetjax.parallel', ['hetjax.search', 'hetjax.costmodel', 'hetjax.train', 'hetjax.modes',
                         'hetjax.inference'], 'the runtime executes plans; deciding and loops are above it'),
    ('hetjax.search', ['hetjax.parallel', 'hetjax.inference.engine', 'hetjax.modes'],
     'decide never imports execute'),
    ('hetjax.costmodel', ['hetjax.parallel', 'hetjax.inference.engine', 'hetjax.modes'],
     'decide never imports execute'),
    ('hetjax.inference.engine', ['hetjax.search', 'hetjax.costmodel'], 'execute never imports decide'),
    ('hetjax.train', ['hetjax.parallel', 'hetjax.search', 'hetjax.costmodel'],
     'the training loop takes a state; the mode builds it'),
    ('kernels', ['hetjax'], 'kernels/ stands alone'),
    ('hetjax.models', ['hetjax.parallel', 'hetjax.inference', 'hetjax.search', 'hetjax.costmodel',
                       'hetjax.train', 'hetjax.modes', 'hetjax.checkpoint'], 'models are a leaf'),
    ('hetjax.plan', ['hetjax.parallel', 'hetjax.search', 'hetjax.costmodel', 'hetjax.models',
                     'hetjax.inference', 'hetjax.modes'], 'the plan is a leaf'),
    ('hetjax.cluster', ['hetjax.parallel', 'hetjax.search', 'hetjax.costmodel', 'hetjax.inference',
                        'hetjax.modes'], 'the cluster is a leaf'),
]


@pytest.mark.parametrize('who, forbidden, why', RULES, ids=[r[0] for r in RULES])
def test_arrow(who, forbidden, why):
  bad = imports_from(modules(), who, forbidden)
  assert not bad, f'{why}: {bad}'


def test_search_modules_have_no_cycle():
  mods = {m: {i for i in imp if i.startswith('hetjax.search.')} for m, imp in modules().items()
          if m.startswith('hetjax.search.')}
  mods = {m: {i if i in mods else i.rsplit('.', 1)[0] for i in imp} & set(mods) for m, imp in mods.items()}
  state = {}

  def visit(m, path):
    if state.get(m) == 'open':
      raise AssertionError(f'import cycle: {" -> ".join(path + [m])}')
    if state.get(m) != 'done':
      state[m] = 'open'
      for n in mods[m]:
        visit(n, path + [m])
      state[m] = 'done'

  for m in mods:
    visit(m, [])


def test_the_walk_sees_a_reversed_arrow(tmp_path, monkeypatch):
  """The check itself can fail: a module of parallel/ importing the search is caught."""
  mods = modules()
  mods['hetjax.parallel.fake'] = {'hetjax.search.planner'}
  assert imports_from(mods, 'hetjax.parallel', ['hetjax.search'])
