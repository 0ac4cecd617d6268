#!/usr/bin/env bash
# Every benchmark that needs a GPU, in one go (under 10 minutes on one H100/H200):
#   1. training step: ViT-B/16 MAE at 96³, bf16, eager and torch.compile, beside MONAI's MaskedAutoEncoderViT
#   2. loader → device → augmented batch: MONAI per crop in the loader vs. batched augmentation on the GPU
#   3. a 1-GPU DeepSpeed run (NCCL, launched by torchrun) of 50 steps of MAE ViT-B at 96³ on packed phantoms
# Figures are appended to benchmarks/results/{step,loader,gpu}.jsonl with the machine; the log of the run
# goes to benchmarks/results/gpu-<date>.log. Usage: benchmarks/gpu.sh   (or: make bench-gpu)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "benchmarks/gpu.sh: no CUDA GPU visible to torch ($("$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' 2>/dev/null || echo "torch not importable by $PYTHON")); run it on a machine with an H100/H200" >&2
    exit 2
fi

RESULTS=benchmarks/results
mkdir -p "$RESULTS"
LOG="$RESULTS/gpu-$(date -u +%Y%m%dT%H%M%SZ).log"
WORK="$(mktemp -d -t sslmed-gpu-XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
exec > >(tee -a "$LOG") 2>&1
sslmed() { "$PYTHON" -m sslmed "$@"; }
echo "== $(date -u) on $("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name(0))'), log $LOG"

echo "== 1. training step: MAE ViT-B/16, 96³, bf16, batch 32 (eager, then torch.compile)"
sslmed bench step --methods mae --sizes base --crops 96 --batch 32 --precision bf16 --checkpointing off \
    --warmup 5 --steps 20 --results "$RESULTS"
sslmed bench step --methods mae --sizes base --crops 96 --batch 32 --precision bf16 --checkpointing off \
    --warmup 5 --steps 20 --compile --results "$RESULTS"

echo "== 2. loader → GPU → augmented batch (8 volumes of 256³ int16, 96³ crops)"
sslmed bench loader --augment --results "$RESULTS"

echo "== 3. DeepSpeed on 1 GPU over NCCL: 50 steps of MAE ViT-B at 96³ (ZeRO-2, bf16)"
"$PYTHON" -c "from sslmed.io.synthetic import write_phantoms; write_phantoms('$WORK/in', 16, shape=(160, 160, 160))"
sslmed pack "$WORK/in" --out "$WORK/packed" --codec none --workers 8
"$PYTHON" -m torch.distributed.run --standalone --nproc_per_node 1 -m sslmed pretrain mae-base \
    data.path="$WORK/packed" run.dir="$WORK/run" train.steps=50 train.log_every=10 optim.warmup_steps=5 \
    train.micro_batch=32 data.workers=8 checkpoint.every=0
"$PYTHON" - "$WORK/run/metrics.jsonl" "$RESULTS" <<'EOF'
import json, sys
from sslmed.bench import common
records = [json.loads(line) for line in open(sys.argv[1])]
last = records[-1]
summary = {"deepspeed_1gpu_steps": last["step"], "samples_per_s": last.get("samples_per_s"),
           "voxels_per_s": last.get("voxels_per_s"), "loss": last["loss"], "peak_mem_mb": last.get("peak_mem_mb")}
common.append_results("gpu", [{"benchmark": "deepspeed-1gpu", "config": "mae-base", "crop": 96,
                               "micro_batch": 32, "records": records, **summary,
                               "machine": common.machine_info("cuda")}], sys.argv[2])
print(common.summary_line(summary))
EOF
echo "== done: figures in $RESULTS/{step,loader,gpu}.jsonl, log in $LOG"
