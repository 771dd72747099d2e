"""The cost of pack's shard hashes: the same pack with and without them, alternating, in one run.

    python benchmarks/pack_hashing.py --csv raw/train.csv --videos raw/videos [--rounds 5] [pack flags ...]

Without them means ShardWriter's file writes pass through unhashed (the shards' bytes are the
same); every round packs into a fresh folder, the files from the page cache. Prints each
round's wall time and the median ratio.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pack import shards  # noqa: E402
from pack.__main__ import get_args_parser, main as pack  # noqa: E402


HASHING = shards.HashingFile


class UnhashedFile(HASHING):
    """HashingFile without the hashing: the baseline."""

    def write(self, data: bytes) -> int:
        return self._file.write(data)


def timed_pack(argv: list[str], hashing: bool) -> float:
    shards.HashingFile = HASHING if hashing else UnhashedFile  # what ShardWriter writes a piece through
    out = Path(tempfile.mkdtemp(prefix="pack-hashing-"))
    try:
        start = time.perf_counter()
        pack(get_args_parser().parse_args([*argv, "--out", str(out / "data")]))
        return time.perf_counter() - start
    finally:
        shutil.rmtree(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    args, pack_argv = parser.parse_known_args()
    timed_pack(pack_argv, True)  # warm the page cache and the imports
    times: dict[bool, list[float]] = {True: [], False: []}
    for r in range(args.rounds):
        for hashing in ((True, False) if r % 2 == 0 else (False, True)):
            times[hashing].append(timed_pack(pack_argv, hashing))
    for hashing, label in ((False, "without hashes"), (True, "with hashes")):
        print(f"{label}: " + ", ".join(f"{t:.2f}" for t in times[hashing]) + f" s; median {statistics.median(times[hashing]):.2f} s")
    print(f"ratio with/without (median): {statistics.median(times[True]) / statistics.median(times[False]):.3f}")


if __name__ == "__main__":
    main()
