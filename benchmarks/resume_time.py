"""How long a resumed loader takes to reach its position: its first batch near an epoch's end, against one at its start.

    python benchmarks/resume_time.py DATA --split train --modality rgb --backend cpu dali

A loader made with a position (what a checkpoint keeps) plans its epoch from the shards'
counts and starts reading at the position: nothing before it is read. Printed per backend:
seconds from making the loader to its first batch at the epoch's start and at its last
batches, alternating (the ratio is what counts on a noisy machine), and, for scale, how
long reading the skipped samples would have taken at the loader's own rate.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import loaders
from loaders.common import open_stream


def first_batch_seconds(args, backend: str, position: dict | None) -> float:
    start = time.perf_counter()
    loader = loaders.build(args.data, args.split, args.modality, True, args.batch_size, crop=args.crop, backend=backend,
                           device="cpu", workers=args.workers, position=position)
    next(iter(loader))
    return time.perf_counter() - start


def rate(args, backend: str, batches: int) -> float:
    """Samples a second the loader reads, over `batches` batches after its first."""
    loader = loaders.build(args.data, args.split, args.modality, True, args.batch_size, crop=args.crop, backend=backend,
                           device="cpu", workers=args.workers)
    iterator = iter(loader)
    next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * args.batch_size / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", type=Path, help="a packed DATA folder (benchmarks/replicate.py makes a big one)")
    p.add_argument("--split", default="train")
    p.add_argument("--modality", default="rgb", choices=["rgb", "flow"])
    p.add_argument("--backend", nargs="+", default=["cpu"], choices=["cpu", "dali"])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="alternating measurements of each")
    args = p.parse_args()
    try:
        samples = open_stream(args.data, args.split, args.modality).samples
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    if samples < 4 * args.batch_size:
        raise SystemExit(f"error: {args.data}/{args.split} has {samples} samples, fewer than 4 batches of "
                         f"{args.batch_size}: make a bigger DATA with benchmarks/replicate.py")
    served = (samples // args.batch_size - 3) * args.batch_size  # three batches before the epoch's end
    print(f"{args.data}/{args.split} {args.modality}: {samples} samples; resuming at sample {served} of epoch 0, "
          f"batch {args.batch_size}, crop {args.crop}, {args.workers} workers")
    for backend in args.backend:
        probe = loaders.build(args.data, args.split, args.modality, True, args.batch_size, crop=args.crop,
                              backend=backend, device="cpu", workers=0 if backend == "cpu" else args.workers)
        position = {**probe.position(), "served": served}
        fresh, resumed = [], []
        for _ in range(args.rounds):
            fresh.append(first_batch_seconds(args, backend, None))
            resumed.append(first_batch_seconds(args, backend, position))
        speed = rate(args, backend, 20)
        print(f"{backend}: first batch at the epoch's start {statistics.median(fresh):.2f} s, at sample {served} "
              f"{statistics.median(resumed):.2f} s (medians of {args.rounds}: {', '.join(f'{s:.2f}' for s in fresh)} / "
              f"{', '.join(f'{s:.2f}' for s in resumed)}); reading the {served} samples skipped would take "
              f"{served / speed:.0f} s at this loader's {speed:.0f} samples/s")


if __name__ == "__main__":
    main()
