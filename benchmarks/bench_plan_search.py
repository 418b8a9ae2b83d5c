"""Time the training search on 64 devices (wall and CPU seconds: CPU is what an idle 2-core machine
would take when this one is shared). Targets: hetjax < 60 s; dtfm < 30 s, aim 10 s.

  python benchmarks/bench_plan_search.py [--clusters=dtfm_case1,dtfm_case5,mixed_worldwide] [--method=hetjax]
"""
import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hetjax.cluster import get_cluster  # noqa: E402
from hetjax.costmodel.training import TrainSetup  # noqa: E402
from hetjax.models.config import get_model_config  # noqa: E402
from hetjax.search.planner import SearchConfig, plan_training  # noqa: E402

flags.DEFINE_string('clusters', 'dtfm_case1,dtfm_case5,mixed_worldwide',
                    'comma-separated cluster scenarios (names or JSON paths)')
flags.DEFINE_string('method', 'hetjax', 'search method: hetjax | dtfm | hybrid | random | index')
flags.DEFINE_string('model', 'gpt3_xl', 'model preset the plan is for')
FLAGS = flags.FLAGS


def main(argv):
  del argv
  model = get_model_config(FLAGS.model)
  for name in FLAGS.clusters.split(','):
    cluster = get_cluster(name)
    t0, c0 = time.perf_counter(), time.process_time()
    plan = plan_training(cluster, model, TrainSetup(seq_len=model.max_len),
                         SearchConfig(method=FLAGS.method), seed=0)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    s = plan.search
    print(f"{name:16s} {cluster.n} devices  {FLAGS.method}: {dt:6.1f} s wall, {cpu:6.1f} s CPU  "
          f"{s.get('evaluations')} candidates "
          f"shape {s.get('shape')}  predicted step {plan.prediction['total']:.2f} s", flush=True)


if __name__ == '__main__':
  app.run(main)
