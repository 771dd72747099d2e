"""The CPU loader's work per image at K = 1 and K = 3, in this process (no DataLoader, no workers), alternating.

    python benchmarks/segments_worker.py DATA [--rounds 4]

loaders.bench measures whole loaders, whose worker processes share a busy machine with
everything else; this measures what segments could change, one task (a batch) at a time:
reading, decoding and cutting 64 frames (K = 1) against 21 videos of 3 frames (K = 3),
the training crop windows as a GPU receives them.
"""
import argparse
import time
from pathlib import Path

from loaders.common import open_stream
from loaders.cpu import ShardSamples, window_side
from loaders.plan import Planner


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", type=Path, help="a packed DATA folder (train split, rgb)")
    p.add_argument("--rounds", type=int, default=4, help="turns each K takes, 8 batches a turn")
    args = p.parse_args()
    stream = open_stream(args.data, "train", "rgb")
    side = window_side(stream, 224, 224 * 1.1)
    totals = {1: [0, 0.0], 3: [0, 0.0]}
    for turn in range(args.rounds):
        for k, videos in ((1, 64), (3, 21)):
            planner = Planner(stream, True, 0, 0, 1, videos, 4096, k)
            batches = ShardSamples(stream, True, 224, 1.1, None, True, 0, (0.5, 0.5), videos * k, side, None, None,
                                   None, segments=planner.segments)
            plan = planner.plan(0)
            start = time.perf_counter()
            for i in range(turn * 8, turn * 8 + 8):
                totals[k][0] += len(batches[(0, 0, i * videos, plan[i * videos:(i + 1) * videos])][2])
            totals[k][1] += time.perf_counter() - start
    for k, (images, seconds) in totals.items():
        print(f"K={k}: {images} images in {seconds:.1f} s, {images / seconds:.0f} images/s")
    print(f"K=3 / K=1: {totals[3][0] / totals[3][1] / (totals[1][0] / totals[1][1]):.2f}")


if __name__ == "__main__":
    main()
