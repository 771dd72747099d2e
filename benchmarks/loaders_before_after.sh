#!/usr/bin/env bash
# The loaders' images/s of another checkout and of this one, alternating, in one run (the machine's slow and fast
# spells fall on both alike):
#   git worktree add /tmp/before COMMIT && cp loaders/*.so /tmp/before/loaders/
#   bash benchmarks/loaders_before_after.sh /tmp/before DATA [ROUNDS]
# Each turn is one python -m loaders.bench (with its files baseline and decode ceiling, so each figure is also a
# ratio in its own run); the lines printed are the bench's results.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: bash benchmarks/loaders_before_after.sh OTHER_CHECKOUT DATA [ROUNDS]" >&2; exit 2; }
before=$(cd "$1" && pwd) data=$(cd "$2" && pwd) rounds=${3:-2}
here=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$here/.venv/bin/python}
for round in $(seq "$rounds"); do
  for tree in "$before" "$here"; do
    for args in "--modality rgb --backend cpu --raw" "--modality flow --flow-len 5 --backend cpu --raw" \
                "--modality rgb --backend dali"; do
      echo "== round $round, $(git -C "$tree" rev-parse --short HEAD)$([ "$tree" = "$here" ] && echo ' (this checkout)'): $args"
      (cd "$tree" && "$python" -m loaders.bench --data "$data" --split train --crop 224 --batch-size 64 --workers 2 \
         --seconds "${SECONDS_EACH:-8}" --rounds 2 $args) | grep -E "images/s" | grep -v round
    done
  done
done
