#!/usr/bin/env bash
# Everything that needs a GPU, in one command (under 8 minutes on one GPU):
#   bash benchmarks/gpu.sh
# 1. the CUDA-only tests (fp16/bf16 vs fp32 per model kind, device placement, no host sync in the loop);
# 2. benchmarks/speed.py on CUDA in fp16, chain lengths included;
# 3. the TCM per-stage split in fp16.
# Figures go to benchmarks/results/gpu_*.{md,json,log}, each naming the card.
set -uo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results
mkdir -p "$out"
card=$(python -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')")
if [ -z "$card" ]; then echo "error: no CUDA device visible to torch" >&2; exit 2; fi
echo "card: $card" | tee "$out/gpu_card.txt"
status=0
timeout 180 python -m pytest -q tests/test_gpu.py 2>&1 | tee "$out/gpu_tests.log" || status=1
timeout 240 python benchmarks/speed.py --device cuda --dtype float16 --sections limit,chains \
    --out "$out/gpu_speed" 2>&1 | tail -40 | tee "$out/gpu_speed.log" || status=1
timeout 60 python benchmarks/tcm_speed.py --device cuda --dtype float16 --frames 8 --size 64 --steps 10 \
    --out "$out/gpu_tcm_speed.json" 2>&1 | tail -20 | tee "$out/gpu_tcm_speed.log" || status=1
echo "card: $card; exit $status"
exit $status
