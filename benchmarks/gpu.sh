#!/usr/bin/env bash
# Everything that needs a GPU, in one command (about 6 minutes on one H100):
#   bash benchmarks/gpu.sh
# 1. the CUDA-only tests (fp16/bf16 vs fp32 per model kind, device placement, no host sync in the loop),
#    and benchmarks/half_precision.py: where half precision departs from float32, module by module;
# 2. the example clip's TCM rows (issue 14) in float32 and float16, with the shipped latent model;
# 3. benchmarks/speed.py on CUDA in fp16: the physical limit and the chain lengths;
# 4. the TCM per-stage split of the shipped model in fp16;
# 5. the default job through the command line in float32 and float16 (speed.py's models section).
# Figures go to benchmarks/results/gpu_*.{md,json,log} (or to $RESULTS), each naming the card.
# PARTS (default all: tests,tcm32,tcm16,speed,tcmspeed,cli) picks parts, e.g. PARTS=tests,tcm16 for a short lease;
# cli needs PyAV.
#
# The lent machines have torch but neither diffusers, omegaconf nor PyAV, and the working tree (about 48 MB)
# plus those wheels (42 MB) is over the 64 MiB a call may carry. What worked on the H100 lease of
# 2026-11-27 (benchmarks/results/gpu_h100_2026-11-27/README.md): two folders of wheels ignored by git,
# .whl1 (diffusers, omegaconf) and .whl2 (av); one call carrying .whl1 runs
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl1/*.whl
# and the next call, within the 30 s the machine stays warm, carries .whl2, installs it the same way into
# /tmp/site2 and runs this script with PYTHONPATH=/tmp/site:/tmp/site2:$PWD (an ignored folder inside the
# repository does not survive between calls; /tmp does).
# The tree went without weights/vsr-x4, training/logs and docs (moved aside for the calls, restored after);
# training/checkpoints (6.5 MB since 2026-11-27) is not needed here either.
set -uo pipefail
cd "$(dirname "$0")/.."
# that image sets PYTHONDONTWRITEBYTECODE=1, so every fresh process recompiled diffusers, transformers and
# their optional imports (6.7 s of compile() in one CLI run); the CLI timings below assume a normal install
unset PYTHONDONTWRITEBYTECODE
out=${RESULTS:-benchmarks/results}
parts=,${PARTS:-tests,tcm32,tcm16,speed,tcmspeed,cli},
has() { [[ $parts == *,$1,* ]]; }
mkdir -p "$out"
card=$(python3 -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')")
if [ -z "$card" ]; then echo "error: no CUDA device visible to torch" >&2; exit 2; fi
echo "card: $card" | tee "$out/gpu_card.txt"
status=0
if has tests; then
  timeout 150 python3 -m pytest -q tests/test_gpu.py 2>&1 | tee "$out/gpu_tests.log" || status=1
  # where half precision parts from float32, module by module
  timeout 90 python3 benchmarks/half_precision.py --device cuda --out "$out/gpu_half_precision.json" 2>&1 \
      | grep -v "^Loading\|shards" | tee "$out/gpu_half_precision.log" || status=1
fi
rows=independent,bidir-fusion-w0.3,tcm,tcm+fusion-w0.3,tcm-preview,tcm-preview-last-half,tcm-preview-last-half+fusion-w0.3
rows=$rows,tcm-preview-L4,tcm-preview-last-half+fusion-w0.3-L4  # chains in lockstep: fewer one-frame TCM calls
for dt in float32 float16; do
  has tcm${dt#float} || continue
  timeout 120 python3 benchmarks/consistency.py --device cuda --dtype $dt --methods $rows \
      --out "$out/gpu_latent_tcm_$dt" 2>&1 | tail -25 || status=1
done
has speed && { timeout 150 python3 benchmarks/speed.py --device cuda --dtype float16 --sections limit,chains \
    --out "$out/gpu_speed" 2>&1 | tail -40 | tee "$out/gpu_speed.log" || status=1; }
has tcmspeed && { timeout 60 python3 benchmarks/tcm_speed.py --model weights/latent-x4 --device cuda --dtype float16 \
    --frames 16 --size 64 --steps 10 --out "$out/gpu_tcm_speed.json" 2>&1 | tail -20 | tee "$out/gpu_tcm_speed.log" \
    || status=1; }
# the models the tree holds (a lease may carry the tree without weights/vsr-x4)
cli_models=$(for m in weights/vsr-x4 weights/latent-x4; do [ -d $m ] && printf %s, $m; done); cli_models=${cli_models%,}
for dt in float32 float16; do  # after the runs above, so that the bytecode caches exist, as on a user's machine
  has cli || continue
  timeout 120 python3 benchmarks/speed.py --device cuda --dtype $dt --sections models --compare-models "$cli_models" \
      --out "$out/gpu_cli_$dt" 2>&1 | tail -15 | tee "$out/gpu_cli_$dt.log" || status=1
done
echo "card: $card; exit $status"
exit $status
