"""Generation from a text prompt or raw token ids; prints the new ids (and text) as JSON lines.
python run.py --config=configs/generate.py --config.prompt_ids=1,2,3 --config.generate.max_new_tokens=8
With --config.checkpoint=PATH (a training workdir or a converted checkpoint) the weights and the
model config come from the checkpoint; otherwise the model is --config.model, randomly initialised.
With --config.plan=PLAN.json (a serve plan, e.g. from configs/plan_inference.py) generation runs
over the plan's replicas of uneven, tensor-parallel stages, pipelined:
python run.py --config=configs/plan_inference.py --config.model=tiny_gpt --config.cluster=local_hetero --config.reference_cluster=local_hetero --config.prompt_len=16 --config.gen_len=16 --config.workdir=runs/serveplan
python run.py --config=configs/generate.py --config.plan=PLAN --config.prompt_ids=1,2,3   (PLAN: e.g. runs/serveplan/plan.json)

Offloaded (FlexGen) generation: --config.offload.policy=search (LP policy for this machine within the
offload.device_gb / host_gb budgets) or =POLICY.json (e.g. policy.json of mode=offload_policy).
offload.disk_dir: the disk tier's folder (default: the workdir); offload.compress: 4-bit weights and KV;
offload.cpu_attention: decode attention where the cache lives; offload.max_block: largest block
(gpu_batch_size x num_gpu_batches) the search considers; writes offload_metrics.json."""

import ml_collections

from configs import base


def get_config():
  c = base.get_config()
  c.mode = 'generate'
  c.generate = base.generate_fields()
  c.prompt_ids = ''    # shorthand for generate.prompt_ids
  c.checkpoint = ''    # a checkpoint to load (its latest step)
  c.plan = ''          # a serve plan.json: generate over its stages (default: one device)
  c.codec = 'fp32'     # activations between stages: fp32, bf16, or 8/4/3/2-bit quantization
  c.transport = 'auto'  # device_put (one process), pair (multi-controller), auto
  c.colocate = False   # wrap plan device ids onto the devices that exist (checks on one GPU)
  c.offload = ml_collections.ConfigDict(dict(
      policy='', device_gb=1.0, host_gb=4.0, disk_dir='', compress=False, cpu_attention=False, max_block=8))
  return c
