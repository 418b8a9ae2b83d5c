"""Training placement over a cluster (DT-FM scheduler + hetjax extensions).
python run.py --config=configs/plan.py --config.cluster=dtfm_case5 --config.model=gpt3_xl

Prints the plan table and predicted step time, writes plan.json and placement.png into the workdir.
--config.search.method: hetjax | dtfm | hybrid | random | index | strided.
DT-FM's constants: --config.train.c_pp_bytes=505732399 --config.train.c_dp_bytes=6.5e8 (0 = derive)."""

import ml_collections

from configs import base


def get_config():
  c = base.get_config()
  c.mode = 'plan'
  c.model = 'gpt3_xl'
  c.cluster = 'dtfm_case5'       # scenario name, file in configs/clusters/, or a path
  c.num_devices = 0              # 0: the scenario's default (64 for DT-FM's cases)
  c.train = ml_collections.ConfigDict(dict(
      global_batch=1024, seq_len=0,  # 0: the model's max_len
      # efficiency 0: automatic, 1.0 over a measured cluster (mode=calibrate), else 0.4
      micro_batch_size=1, schedule='1f1b', efficiency=0.0, activation_bits=16, recompute=False,
      # DT-FM's constants in bytes (paper: c_pp = 0.471 GiB per tasklet, c_dp = 0.65 GB per stage);
      # 0 derives them from the model and the batch
      c_pp_bytes=0.0, c_dp_bytes=0.0))
  c.search = ml_collections.ConfigDict(dict(
      method='hetjax', d_pp=0, tp=0, population=100, evaluations=5000, screen_evaluations=300,
      finalists=2, uneven_layers=True, time_limit=0.0, hetero_replicas=False))
  c.draw = True
  return c
