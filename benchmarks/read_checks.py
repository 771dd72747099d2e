"""What the read-time checks cost a sample: the shard reader with them and without, alternating, in one run.

    python benchmarks/read_checks.py DATA [--split train] [--modality rgb] [--rounds 5]

Each round reads the same samples (from the page cache) with the checks (each member's CRC-32C
against the sample's checksums, the label against the manifest's) and without them, and
decodes their JPEGs once (simplejpeg, whole images: what a loader does with a sample at the
least), so that the checks' cost is printed beside what a sample costs a loader anyway.
"""
import argparse
import dataclasses
import statistics
import time

import simplejpeg

from loaders.common import open_stream
from loaders.plan import ShardReader


def per_sample(read, samples: range) -> float:
    """Seconds a sample of read(sample) over `samples`."""
    start = time.perf_counter()
    for sample in samples:
        read(sample)
    return (time.perf_counter() - start) / len(samples)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="a packed DATA folder (packed with checksums)")
    p.add_argument("--split", default="train")
    p.add_argument("--modality", default="rgb", choices=["rgb", "flow"])
    p.add_argument("--samples", type=int, default=2000, help="samples read a round (at most the split's)")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    stream = open_stream(args.data, args.split, args.modality)
    if not all(stream.checksummed):
        raise SystemExit(f"error: {args.data}/{args.split} was packed before per-sample checksums: nothing to measure")
    checked = ShardReader(stream)
    unchecked = ShardReader(dataclasses.replace(stream, checksummed=None, video_labels=None))
    samples = range(min(args.samples, stream.samples))

    def decode(sample):
        for ext in stream.exts:
            simplejpeg.decode_jpeg(checked.read(sample)[ext])

    times = {"checked": [], "unchecked": [], "decode": []}
    for _ in range(args.rounds):  # alternating: the machine's slow spells fall on all alike
        times["unchecked"].append(per_sample(unchecked.read, samples))
        times["checked"].append(per_sample(checked.read, samples))
        times["decode"].append(per_sample(decode, samples))
    med = {k: statistics.median(v) for k, v in times.items()}
    cost = med["checked"] - med["unchecked"]
    print(f"{args.data} {args.split} {args.modality}: {len(samples)} samples x {args.rounds} rounds, medians")
    print(f"read without checks {1e6 * med['unchecked']:.1f} us a sample, with them {1e6 * med['checked']:.1f} us: "
          f"the checks cost {1e6 * cost:.1f} us a sample")
    print(f"read and decode {1e6 * med['decode']:.0f} us a sample: the checks are {100 * cost / med['decode']:.2f}% "
          f"of it")


if __name__ == "__main__":
    main()
