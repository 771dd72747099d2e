#!/usr/bin/env bash
# The largest InceptionV3 batch that fits the GPU (bf16, channels-last), then DALI against
# --synthetic-data at that batch, then --compile at batch 64.
# Usage: bash benchmarks/gpu_largest_batch.sh SMALL_DATA [WORK_DIR]
set -u
SMALL=$1
WORK=${2:-/tmp/gpu_largest}
WORKERS=${WORKERS:-$(nproc)}
mkdir -p "$WORK"
python3 benchmarks/replicate.py "$SMALL" "$WORK/data" --times 40
run() {  # name, extra args...
  local name=$1; shift
  timeout "${LIMIT:-170}" python3 train.py --data "$WORK/data" --modality rgb --val-split '' --arch inception_v3 --input-size 299 --amp bf16 \
    --channels-last --log-every 20 --ckpt-every 1000000 --workers "$WORKERS" --save-dir "$WORK/$name" "$@" \
    > "$WORK/$name.out" 2>&1
}
largest=""
for batch in 1024 768 512 384; do
  if run "probe-b$batch" --batch-size "$batch" --synthetic-data --max-iterations 3 --log-every 1; then
    largest=$batch; break
  fi
  echo "batch $batch: $(grep -o 'OutOfMemoryError[^.]*' "$WORK/probe-b$batch.out" | head -1 || tail -1 "$WORK/probe-b$batch.out")"
done
echo "largest batch that fits: $largest"
for mode in dali synthetic; do
  extra=""; [ "$mode" = synthetic ] && extra=--synthetic-data
  run "b$largest-$mode" --batch-size "$largest" --max-iterations 80 $extra \
    && echo "b$largest-$mode: $(grep '^it ' "$WORK/b$largest-$mode/train.log" | tail -3 | tr '\n' ';')" \
    || { echo "b$largest-$mode FAILED"; tail -3 "$WORK/b$largest-$mode.out"; }
done
run b64-compile --batch-size 64 --max-iterations 200 --log-every 50 --compile --synthetic-data \
  && echo "b64-compile: $(grep '^it ' "$WORK/b64-compile/train.log" | tail -3 | tr '\n' ';')" \
  || { echo "b64-compile FAILED"; tail -5 "$WORK/b64-compile.out"; }
