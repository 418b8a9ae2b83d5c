"""Serving plan over heterogeneous GPUs (HexGen-style asymmetric TP/PP + dispatch).
python run.py --config=configs/plan_inference.py --config.cluster=hexgen_full_budget --config.model=llama2_70b

Prints the plan (replicas x stages x TP x layers, predicted latency and throughput), simulates dispatch
at --config.rate, writes plan.json and plan.png into the workdir.
--config.method: hetjax | symmetric.  --config.objective: rate (max requests/s within the deadline) | latency."""

from configs import base


def get_config():
  c = base.get_config()
  c.mode = 'plan_inference'
  c.model = 'llama2_70b'
  c.cluster = 'hexgen_full_budget'   # scenario name, file in configs/clusters/, or a path
  c.method = 'hetjax'
  c.objective = 'rate'
  c.prompt_len = 128
  c.gen_len = 128
  c.deadline = 0.0                   # seconds; 0: slo_scale x single-request latency on reference_cluster
  c.slo_scale = 8.0
  c.reference_cluster = 'hexgen_homogeneous'
  c.slo_margin = 0.5                 # a replica's batch latency must fit in this share of the deadline
  c.rate = 4.0                       # requests/s: latency objective and the dispatch simulation
  c.max_batch = 64
  c.population = 40
  c.evaluations = 1500
  c.time_limit = 0.0                 # seconds, 0: none
  c.dispatch = 'shortest_completion'  # or round_robin
  c.num_requests = 2000
  c.draw = True
  return c
