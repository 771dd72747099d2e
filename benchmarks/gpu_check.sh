#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md in one run (estimated at 7 minutes on an H100/H200; not yet run):
#   1. the graphed training step computes what the eager one does (benchmarks/graph_check.py);
#   2. loader images/s: DALI (nvJPEG, crop-window decoding), the CPU loader, the files baseline, the decode ceiling;
#   3. InceptionV3 training, rgb and flow x5 at batch 64: model alone eager and graphed, DALI and the CPU loader graphed,
#      and DALI graphed with TSN's segments (--segments 3: 21 videos x 3 frames a batch, 63 images).
# Usage: bash benchmarks/gpu_check.sh SMALL_DATA [WORK_DIR]   (SMALL_DATA: packed with --flow-len 5)
set -u
SMALL=$1
WORK=${2:-/tmp/gpu_check}
ARCH=${ARCH:-inception_v3} SIZE=${SIZE:-299} ITERS=${ITERS:-200} SECONDS_PER=${SECONDS_PER:-4}
WORKERS=${WORKERS:-$(nproc)} TIMES=${TIMES:-400}
mkdir -p "$WORK"
python3 -c "import torch, nvidia.dali; print('torch', torch.__version__, 'dali', nvidia.dali.__version__, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
python3 benchmarks/replicate.py "$SMALL" "$WORK/data" --times "$TIMES"

echo "=== the graphed step against the eager one"
python3 benchmarks/graph_check.py 2>&1 | tail -4

echo "=== loaders"
for args in "--modality rgb --crop 299" "--modality flow --crop 299 --flow-len 5"; do
  python3 -m loaders.bench --data "$WORK/data" --split train $args --backend cpu dali --batch-size 64 \
    --workers "$WORKERS" --seconds "$SECONDS_PER" --rounds 2 --files-dir "$WORK/files-${args// /}" 2>&1 | grep -v Warning
done

echo "=== training ($ARCH at $SIZE, bf16, channels-last, batch 64; iteration, images/s, data wait of the last three 50-iteration windows)"
train() {  # name, extra args...
  local name=$1; shift
  python3 train.py --data "$WORK/data" --val-split '' --arch "$ARCH" --input-size "$SIZE" --amp bf16 --channels-last \
    --batch-size 64 --max-iterations "$ITERS" --log-every 50 --ckpt-every 1000000 --workers "$WORKERS" \
    --save-dir "$WORK/$name" "$@" > "$WORK/$name.out" 2>&1 || { echo "$name FAILED:"; tail -8 "$WORK/$name.out"; return; }
  echo "$name: $(grep -o 'CUDA graph [a-z]*' "$WORK/$name/train.log" | head -1); $(grep '^it ' "$WORK/$name/train.log" | tail -3 | cut -d' ' -f2,8,10 | tr '\n' ';')"
}
for modality in rgb flow; do
  train $modality-synthetic-eager --modality $modality --synthetic-data --cuda-graph off
  train $modality-synthetic-graph --modality $modality --synthetic-data
  train $modality-dali-graph --modality $modality --backend dali
  train $modality-cpu-graph --modality $modality --backend cpu
done
train rgb-dali-graph-segments3 --modality rgb --backend dali --segments 3 --batch-size 21
