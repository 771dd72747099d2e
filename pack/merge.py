"""Rebuild DATA/manifest.json from all packed parts: python -m pack.merge DATA."""
import argparse
import sys
from pathlib import Path

from .manifest import write_manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("data", type=Path, help="the --out folder the parts packed into")
    args = parser.parse_args(argv)
    manifest = write_manifest(args.data)
    for name, split in manifest["splits"].items():
        state = "complete" if split["complete"] else f"INCOMPLETE ({split['groups_done']}/{split['groups_total']} groups)"
        print(f"{name}: {split['videos']} videos, {split['samples']} samples, {len(split['failed'])} failed, {state}")
    return 0 if all(s["complete"] for s in manifest["splits"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
