#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md in one run: loader images/s (DALI nvJPEG, CPU
# loader, the files baseline, the decode ceiling) and InceptionV3 training with DALI
# against --synthetic-data. Usage: bash benchmarks/gpu_check.sh SMALL_DATA [WORK_DIR]
set -u
SMALL=$1
WORK=${2:-/tmp/gpu_check}
ARCH=${ARCH:-inception_v3} SIZE=${SIZE:-299} ITERS=${ITERS:-300} SECONDS_PER=${SECONDS_PER:-6}
WORKERS=${WORKERS:-$(nproc)} BIG_BATCH=${BIG_BATCH:-256} TIMES=${TIMES:-400}
mkdir -p "$WORK"
python3 -c "import torch, nvidia.dali; print('torch', torch.__version__, 'dali', nvidia.dali.__version__, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
python3 benchmarks/replicate.py "$SMALL" "$WORK/data" --times "$TIMES"

echo "=== loaders"
for args in "--modality rgb --crop 224" "--modality rgb --crop 299" "--modality flow --crop 224 --flow-len 5"; do
  python3 -m loaders.bench --data "$WORK/data" --split train $args --backend cpu dali --batch-size 64 \
    --workers "$WORKERS" --seconds "$SECONDS_PER" --files-dir "$WORK/files-${args// /}" 2>&1 | grep -v Warning
done

echo "=== training ($ARCH at $SIZE, bf16, channels-last)"
train() {  # name, extra args...
  local name=$1; shift
  python3 train.py --data "$WORK/data" --val-split '' --arch "$ARCH" --input-size "$SIZE" --amp bf16 --channels-last \
    --max-iterations "$ITERS" --log-every 50 --ckpt-every 1000000 --workers "$WORKERS" --save-dir "$WORK/$name" "$@" \
    > "$WORK/$name.out" 2>&1 || { echo "$name FAILED:"; tail -5 "$WORK/$name.out"; return; }
  echo "$name: $(grep '^it ' "$WORK/$name/train.log" | tail -3 | tr '\n' ';')"
}
train rgb-b64-dali --modality rgb --batch-size 64
train rgb-b64-synthetic --modality rgb --batch-size 64 --synthetic-data
train rgb-b$BIG_BATCH-dali --modality rgb --batch-size "$BIG_BATCH"
train rgb-b$BIG_BATCH-synthetic --modality rgb --batch-size "$BIG_BATCH" --synthetic-data
train flow5-b64-dali --modality flow --batch-size 64
train flow5-b64-synthetic --modality flow --batch-size 64 --synthetic-data
