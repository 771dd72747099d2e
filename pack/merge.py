"""Rebuild DATA/manifest.json from all packed parts: python -m pack.merge DATA.

After `--part I --num-parts N` (or a Slurm job array) packed a split on several machines into
one DATA folder (or their folders were copied together). Refuses parts packed with other
parameters or annotation files; says which parts have not finished.
"""
import argparse
import sys
from pathlib import Path

from .manifest import missing_parts, write_manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pack.merge", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, help="the --out folder the parts packed into")
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        raise SystemExit(f"error: {args.data}: no such folder")
    if not list(args.data.glob("*/plan.json")):
        raise SystemExit(f"error: {args.data} holds no packed split (no */plan.json)")
    try:
        manifest = write_manifest(args.data)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    except OSError as e:
        raise SystemExit(f"error: {args.data}: cannot write the manifest there ({e.strerror or e})") from None
    for name, split in manifest["splits"].items():
        state = "complete" if split["complete"] else f"INCOMPLETE ({split['groups_done']}/{split['groups_total']} " \
                                                     f"groups): {missing_parts(split)}"
        print(f"{name}: {split['videos']} videos, {split['samples']} samples, {len(split['failed'])} failed, {state}")
    return 0 if all(s["complete"] for s in manifest["splits"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
