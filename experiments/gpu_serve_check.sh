#!/usr/bin/env bash
# Issue 10's GPU checks for serving, in one short run (a few minutes on one H100):
#   gpt2_medium and Llama-2-7B-shaped (random bf16 weights) decode tokens/s at batch 1, 16 and 64
#   with the stages colocated on the GPU, the fraction of the HBM roofline (bytes of weights + KV
#   read per step / measured copy bandwidth), and the pipelined-decode ratio (2 colocated stages
#   with 2 groups in flight vs 1 stage). Results: runs/gpu_serve_check/bench_serve.{csv,png}.
# Usage: bash experiments/gpu_serve_check.sh [extra bench_serve flags]
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
python experiments/bench_serve.py --parts=g --out=runs/gpu_serve_check/ --repeats=2 "$@"
