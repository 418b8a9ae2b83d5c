"""Calibration by measurement: per-layer compute rates and link bandwidth/latency -> a cluster file.
python run.py --config=configs/calibrate.py --config.model=tiny_gpt --config.workdir=runs/cal
Multi-controller (one process per emulated device):
python -m hetjax.launch -n 3 --emulate=local_hetero -- python run.py --config=configs/calibrate.py

Writes <workdir>/cluster.json (configs/clusters/ format, `measured: true`, the date), which
mode=plan (--config.cluster=PATH) and training (--config.pipeline.cluster=PATH) read."""

import ml_collections

from configs import base


def get_config():
  c = base.get_config()
  c.mode = 'calibrate'
  c.model = 'tiny_gpt'
  c.cluster = ''            # '' or a cluster whose first hosts' GPU names and memory to keep
  c.calibrate = ml_collections.ConfigDict(dict(
      micro_batch_size=4, seq_len=64, reps=5, devices=2,
      small_bytes=64 * 1024, large_bytes=4 * 1024 * 1024, out=''))
  return c
