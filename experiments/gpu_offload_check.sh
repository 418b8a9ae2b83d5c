#!/usr/bin/env bash
# FlexGen's headline setting on one GPU (issue 13's GPU checks; FlexGen paper Table 2, OPT-6.7B on a T4):
# a 7B model (llama2_7b shape, random weights, bf16 = fp16's size) with the "GPU" capped at DEVICE_GB,
# prompt 512, 32 new tokens: LP policy search -> offloaded generation, uncompressed and 4-bit.
# Also: pinned and pageable host->device copy bandwidth, to set beside the engine's achieved bandwidth.
# Writes under $OUT (default runs/gpu_offload_check): bandwidth.json, <run>/offload_metrics.json,
# summary.txt. Not yet run: no GPU was available when it was written.
#   bash experiments/gpu_offload_check.sh            # ~5-8 min on an H100 (two 7B runs + init)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_offload_check}
MODEL=${MODEL:-llama2_7b}
DEVICE_GB=${DEVICE_GB:-6}
HOST_GB=${HOST_GB:-100}
MAX_BLOCK=${MAX_BLOCK:-64}
mkdir -p "$OUT"
export XLA_PYTHON_CLIENT_PREALLOCATE=false   # so the device's peak_bytes_in_use is the engine's own
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt" || true

python - "$OUT/bandwidth.json" <<'EOF'
import json, sys, time
import jax, numpy as np
from jax.sharding import SingleDeviceSharding
dev = jax.devices()[0]
x = np.ones(256 * 2**20, np.uint8)     # 256 MiB
out = {}
for kind in ('pageable', 'pinned_host'):
  src = x if kind == 'pageable' else jax.device_put(x, SingleDeviceSharding(dev, memory_kind='pinned_host'))
  jax.device_put(src, SingleDeviceSharding(dev, memory_kind='device')).block_until_ready()
  t0 = time.perf_counter()
  for _ in range(5):
    jax.device_put(src, SingleDeviceSharding(dev, memory_kind='device')).block_until_ready()
  out[f'{kind}_to_device_gbs'] = 5 * x.nbytes / (time.perf_counter() - t0) / 1e9
print(out)
json.dump(out, open(sys.argv[1], 'w'), indent=1)
EOF

PROMPT=$(python -c "print(','.join(str((i * 7919) % 32000) for i in range(512)))")
for COMPRESS in false true; do
  RUN="$OUT/${MODEL}_compress_${COMPRESS}"
  python run.py --config=configs/generate.py --config.model="$MODEL" \
    --config.model_overrides.dtype=bfloat16 --config.model_overrides.param_dtype=bfloat16 \
    --config.prompt_ids="$PROMPT" --config.generate.max_new_tokens=32 \
    --config.offload.policy=search --config.offload.device_gb="$DEVICE_GB" --config.offload.host_gb="$HOST_GB" \
    --config.offload.max_block="$MAX_BLOCK" --config.offload.compress="$COMPRESS" \
    --config.workdir="$RUN" 2>&1 | grep -v '^{"ids"' | tail -5
done

python - "$OUT" <<'EOF' | tee "$OUT/summary.txt"
import glob, json, os, sys
out = sys.argv[1]
bw = json.load(open(os.path.join(out, 'bandwidth.json')))
print(f"copy bandwidth: pinned {bw['pinned_host_to_device_gbs']:.1f} GB/s, pageable {bw['pageable_to_device_gbs']:.1f} GB/s")
for path in sorted(glob.glob(os.path.join(out, '*', 'offload_metrics.json'))):
  m = json.load(open(path))
  moved = m.get('bytes_from_host', 0) + m.get('bytes_from_disk', 0)
  achieved = moved / m['total_s'] / 1e9
  print(f"{os.path.basename(os.path.dirname(path))}: block {m['block']} ({m['gpu_batch_size']}x{m['num_gpu_batches']}), "
        f"{m['tokens_per_s']:.2f} tok/s (decode only {m['decode_tokens_per_s']:.2f}; LP predicted "
        f"{m.get('predicted_tokens_per_s', float('nan')):.2f}); host+disk->device {moved / 1e9:.1f} GB at "
        f"{achieved:.1f} GB/s averaged over the run ({achieved / bw['pinned_host_to_device_gbs']:.0%} of pinned copy); "
        f"device peak measured {m.get('measured_device_peak_bytes', 0) / 1e9:.2f} GB vs counted "
        f"{m['peak_resident_bytes']['device'] / 1e9:.2f} GB, budget {m['budget_bytes']['device'] / 1e9:.1f} GB "
        f"(within: {m.get('device_peak_within_budget')})")
print('FlexGen (T4, OPT-6.7B, 16 GB GPU, PCIe 3 ~12 GB/s): 25-29 tok/s; set the numbers above beside it '
      '(H100 PCIe 5 / SXM host links are faster, the GPU budget here is smaller, the model is llama2-7b-shaped)')
EOF
