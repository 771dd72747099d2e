"""Make a benchmark DATA folder that lists every shard of another K times.

    python benchmarks/replicate.py small_data big_data --times 20

For measuring loaders and training from a few real clips: the manifest of the copy points
at the original shards (no bytes are copied), each listed K times, so a loader reads and
decodes K times as many samples. Not for training anything real.
"""
import argparse
import json
from pathlib import Path

from pack.manifest import load_manifest, stamped


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", type=Path, help="a packed DATA folder")
    p.add_argument("out", type=Path, help="the DATA folder to write (a manifest.json only)")
    p.add_argument("--times", type=int, default=20, help="how many times each shard is listed")
    args = p.parse_args()
    manifest = load_manifest(args.source)
    for split in manifest["splits"].values():
        for modality, pieces in split["shards"].items():
            split["shards"][modality] = [{**piece, "tar": str((args.source / piece["tar"]).resolve()),
                                          "idx": str((args.source / piece["idx"]).resolve())}
                                         for _ in range(args.times) for piece in pieces]
        split["samples"] *= args.times
        # the videos too, in the shards' order (a copy's id gets "@i"): what --segments plans; each copy keeps its
        # samples' key, by which the readers check every sample's label against its video's
        split["video_info"] = {f"{vid}@{i}": {**info, "key": info.get("key", vid)}
                               for i in range(args.times) for vid, info in split["video_info"].items()}
        split["videos"] *= args.times
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "manifest.json").write_text(json.dumps(stamped(manifest)))
    print(f"{args.out}: every shard of {args.source} listed {args.times} times")


if __name__ == "__main__":
    main()
