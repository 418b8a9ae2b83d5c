"""Re-planning after a lost process: the planner's plan over the survivors, and which failures the
launcher re-plans (a lost process) or stops on (an error)."""

import os
import subprocess
import sys

import ml_collections
import pytest

from hetjax.cluster import get_cluster, processes_cluster
from hetjax.costmodel import training as cm
from hetjax.models.config import get_model_config
from hetjax.modes.replan import named_cluster, replan_setup, search_replan, surviving_devices
from hetjax.plan import Plan, Replica, Stage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = get_model_config('tiny_gpt', num_layers=6)
TRAIN = ml_collections.ConfigDict(dict(batch_size=8, seq_len=32))
# local_hetero: host 'slow' (devices 0-1), 'mid' (2-3), 'fast' (4-7); one process per host.
THREE_HOSTS = Plan([Replica([Stage(0, 2, [0, 1]), Stage(2, 4, [2, 3]), Stage(4, 6, [4, 5, 6, 7])])],
                   num_layers=6, micro_batches=4, micro_batch_size=2, cluster='local_hetero')


def test_surviving_devices_are_numbered_process_by_process():
  assert surviving_devices([2, 2, 4], [1]) == [[0, 1], [4, 5, 6, 7]]
  assert surviving_devices([1, 2, 4], [2, 0]) == [[1, 2]]


def test_the_replan_is_the_planners_and_beats_the_even_split():
  """Process 'mid' of local_hetero is lost: the survivors are 2 slow and 4 fast devices. The even
  split (one stage per process, 3 layers each, the replaced behaviour) waits on the slow process;
  the planner's plan is predicted faster, keeps the global batch, and is the same on every call."""
  cluster = get_cluster('local_hetero')
  survivors = [d for s in surviving_devices([2, 2, 4], [1]) for d in s]
  remaining = cluster.subset(survivors)
  setup = replan_setup(THREE_HOSTS, TRAIN)
  plan = search_replan(remaining, THREE_HOSTS, MODEL, TRAIN, 'tiny_gpt', seed=0, evaluations=60)
  plan.validate(remaining, MODEL)
  assert plan.micro_batches * plan.dp * plan.micro_batch_size == TRAIN.batch_size
  assert plan.micro_batch_size == THREE_HOSTS.micro_batch_size
  assert plan.search['method'] == 'hetjax'
  even = Plan([Replica([Stage(0, 3, [0, 1]), Stage(3, 6, [2, 3, 4, 5])])], num_layers=6,
              micro_batches=4, micro_batch_size=2)
  assert plan.replicas != even.replicas
  predicted, even_predicted = (cm.estimate(p, remaining, MODEL, setup)['total'] for p in (plan, even))
  assert predicted == pytest.approx(plan.prediction['total'])
  assert predicted < 0.8 * even_predicted, (plan.table(remaining), predicted, even_predicted)
  again = search_replan(remaining, THREE_HOSTS, MODEL, TRAIN, 'tiny_gpt', seed=0, evaluations=60)
  assert again.to_dict()['replicas'] == plan.to_dict()['replicas']


def test_probed_processes_get_work_by_speed():
  """No cluster: the survivors' probed devices, one host per process. The slower process gets
  fewer layers (or none) than an even split would give it."""
  cluster = processes_cluster([[0.001], [0.004]])
  assert [d.host for d in cluster.devices] == ['p0', 'p1']
  plan = search_replan(cluster, THREE_HOSTS, MODEL, TRAIN, 'tiny_gpt', seed=0, evaluations=30)
  slow_layers = sum(s.end - s.start for r in plan.replicas for s in r.stages if 0 in s.devices)
  assert slow_layers < 3 * plan.dp, plan.table(cluster)


def test_named_cluster_is_the_plans_when_it_fits():
  pcfg = ml_collections.ConfigDict(dict(plan='plan.json', cluster='local_hetero'))
  notes = []
  assert named_cluster(pcfg, THREE_HOSTS, 8, notes.append).name == 'local_hetero'
  assert named_cluster(pcfg, THREE_HOSTS, 6, notes.append) is None  # the job was not that cluster
  assert 'has 8 devices but the job had 6' in notes[-1]
  hand_made = Plan([Replica([Stage(0, 6, [0])])], num_layers=6, micro_batches=4, micro_batch_size=2)
  assert named_cluster(pcfg, hand_made, 8, notes.append) is None
  searched = ml_collections.ConfigDict(dict(plan='search', cluster='local_hetero'))
  assert named_cluster(searched, hand_made, 8, notes.append).name == 'local_hetero'


MEMBER = '''
import os, signal, sys, time
if os.environ['HETJAX_PROCESS_ID'] == '1' and not os.environ['HETJAX_LOST']:
  time.sleep(0.5)
  if sys.argv[1] == 'kill':
    os.kill(os.getpid(), signal.SIGKILL)
  sys.exit(1)
print('attempt lost=' + os.environ['HETJAX_LOST'] + ' devices=' + os.environ['HETJAX_ORIGINAL_DEVICES'])
'''


@pytest.mark.parametrize('how', ['kill', 'error'])
def test_the_launcher_replans_a_lost_process_not_an_error(tmp_path, how):
  """No JAX: process 1 of 3 is SIGKILLed (lost: re-planned away) or exits with code 1 (a bug:
  the job stops with that error)."""
  r = subprocess.run([sys.executable, '-m', 'hetjax.launch', '-n', '3', '--devices=1,2,4',
                      '--grace=1', '--on_failure=replan', f'--logs={tmp_path}', '--',
                      sys.executable, '-c', MEMBER, how],
                     cwd=ROOT, capture_output=True, text=True, timeout=60)
  if how == 'kill':
    assert r.returncode == 0, r.stderr
    assert 'replanning: original process 1 is lost' in r.stderr
    second = [l for l in r.stdout.splitlines() if 'lost=1' in l]
    assert sorted(second) == ['[p0] attempt lost=1 devices=1,2,4', '[p1] attempt lost=1 devices=1,2,4']
  else:
    assert r.returncode == 1, r.stderr
    assert 'process 1 exited with code 1' in r.stderr
    assert 'not replanning' in r.stderr and 'replanning: original' not in r.stderr
