"""FlexGen offloading policy for one GPU (LP over placement fractions per batch shape).
python run.py --config=configs/offload_policy.py --config.model=opt_30b --config.hardware=t4_node
python run.py --config=configs/offload_policy.py --config.model=gpt2_small --config.hardware=local --config.gpu_mem_gb=0.2

--config.hardware: t4_node | local (probed: RAM, free disk, copy/disk bandwidth, matmul rate) | a JSON path."""

from configs import base


def get_config():
  c = base.get_config()
  c.mode = 'offload_policy'
  c.model = 'opt_30b'
  c.hardware = 't4_node'
  c.gpu_mem_gb = 0.0        # 0: the hardware's own (local without a GPU: a 1 GB device budget)
  c.cpu_mem_gb = 0.0        # 0: the hardware's own
  c.prompt_len = 512
  c.gen_len = 32
  c.compress = False        # 4-bit group-wise weights and KV cache
  return c
