"""Serve requests over a serve plan (HexGen executed): dispatch to replicas, pipelined decode.
python run.py --config=configs/serve.py --config.plan=PLAN --config.requests=REQUESTS
python run.py --config=configs/serve.py --config.plan=PLAN --config.rate=4 --config.num_requests=32
A requests file has one JSON object per line: "prompt" (text) or "ids", optional "max_new_tokens",
"arrival_s" (seconds after start) and "id". Without a file, `num_requests` synthetic requests arrive
as a Poisson process at `rate` per second. Writes completions.jsonl, metrics.json and
replica_timeline.png into the workdir."""

from configs import base


def get_config():
  c = base.get_config()
  c.mode = 'serve'
  c.generate = base.generate_fields()
  c.generate.max_new_tokens = 16
  c.checkpoint = ''         # weights (a training workdir or converted checkpoint); default: random
  c.plan = ''               # a serve plan.json (required)
  c.codec = 'fp32'          # activations between stages: fp32, bf16, or 8/4/3/2-bit quantization
  c.transport = 'auto'
  c.colocate = False
  c.requests = ''           # a JSON-lines file of requests
  c.rate = 4.0              # synthetic load: requests per second (Poisson)
  c.num_requests = 16
  c.prompt_len = 16         # synthetic prompts: this many random token ids
  c.max_batch = 4           # requests per group where the plan's replica sets none
  c.batching = 'continuous'  # continuous (finished slots refilled at once) or static (rounds)
  c.chunk = 8               # continuous: decode steps per engine call (across processes, refills are decided per chunk)
  c.prefill = 'slot'        # continuous: a refilled slot's prompt in one go ('slot') or a token per step
  c.dispatch = 'shortest_completion'  # or round_robin
  c.deadline_s = 0.0        # SLO for the attainment figure (0: not reported)
  return c
