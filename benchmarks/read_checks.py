"""What the read-time checks cost: the shard reader and the loaders with them and without, in turns, in one run.

    python benchmarks/read_checks.py DATA [--split train] [--modality rgb] [--backend cpu dali] [--rounds 6]

The checks: each member's CRC-32C against the sample's checksums, the label against its
video's in the manifest (loaders/plan.py ShardReader). First the reader alone, a sample at a
time, beside a whole decode of the sample's JPEGs (what a loader does with a sample at the
least); then each loader as `python -m loaders.bench` measures it (training batches, fresh
workers each turn), made once with the checks and once from a stream that skips them,
taking turns (loaders.bench.in_turns), so that the machine's slow spells fall on both alike.
"""
import argparse
import dataclasses
import functools
import statistics
import time
from unittest import mock

import simplejpeg

import loaders
from loaders.bench import fresh_loader_rate, in_turns
from loaders.common import open_stream
from loaders.plan import ShardReader


def unchecked(stream):
    return dataclasses.replace(stream, checksummed=None, video_labels=None)


def per_sample(read, samples: range) -> float:
    """Seconds a sample of read(sample) over `samples`."""
    start = time.perf_counter()
    for sample in samples:
        read(sample)
    return (time.perf_counter() - start) / len(samples)


def reader_cost(stream, samples: range, rounds: int) -> None:
    checked, plain = ShardReader(stream), ShardReader(unchecked(stream))

    def decode(sample):
        for ext in stream.exts:
            simplejpeg.decode_jpeg(checked.read(sample)[ext])

    times = {"checked": [], "unchecked": [], "decode": []}
    for _ in range(rounds):  # alternating: the machine's slow spells fall on all alike
        times["unchecked"].append(per_sample(plain.read, samples))
        times["checked"].append(per_sample(checked.read, samples))
        times["decode"].append(per_sample(decode, samples))
    med = {k: statistics.median(v) for k, v in times.items()}
    cost = med["checked"] - med["unchecked"]
    print(f"reader, {len(samples)} samples x {rounds} rounds, medians: without checks {1e6 * med['unchecked']:.1f} us a "
          f"sample, with them {1e6 * med['checked']:.1f} us: the checks cost {1e6 * cost:.1f} us a sample, "
          f"{100 * cost / med['decode']:.2f}% of reading and decoding it ({1e6 * med['decode']:.0f} us)")


def build_unchecked(*args, **kwargs):
    """loaders.build, from a stream whose samples are read without the checks (what the code did before them)."""
    with mock.patch.object(loaders, "open_stream", lambda *a, **k: unchecked(open_stream(*a, **k))):
        return loaders.build(*args, **kwargs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="a packed DATA folder (packed with checksums)")
    p.add_argument("--split", default="train")
    p.add_argument("--modality", default="rgb", choices=["rgb", "flow"])
    p.add_argument("--samples", type=int, default=2000, help="samples the reader reads a round")
    p.add_argument("--backend", nargs="*", default=["cpu", "dali"], choices=["cpu", "dali"])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seconds", type=float, default=24, help="measuring time per loader, over all its turns")
    p.add_argument("--rounds", type=int, default=6)
    args = p.parse_args()
    stream = open_stream(args.data, args.split, args.modality)
    if not all(stream.checksummed):
        raise SystemExit(f"error: {args.data}/{args.split} was packed before per-sample checksums: nothing to measure")
    print(f"{args.data} {args.split} {args.modality}, {stream.samples} samples")
    reader_cost(stream, range(min(args.samples, stream.samples)), args.rounds)
    contenders = {}
    for backend in args.backend:
        for name, build in (("unchecked", build_unchecked), ("checked", loaders.build)):
            make = functools.partial(build, args.data, args.split, args.modality, True, args.batch_size,
                                     crop=args.crop, backend=backend, device="cpu", workers=args.workers,
                                     **({"raw": True} if backend == "cpu" else {}))
            contenders[f"{backend} {name}"] = functools.partial(fresh_loader_rate, make, len(stream.exts))
    if contenders:
        results = in_turns(contenders, args.rounds, args.seconds)
        for backend in args.backend:
            before, after = results[f"{backend} unchecked"], results[f"{backend} checked"]
            print(f"{backend}: {before:.0f} images/s without the checks, {after:.0f} with them: "
                  f"{100 * (after / before - 1):+.1f}%")


if __name__ == "__main__":
    main()
