"""Pack's wall time with one flow setting against another, on real videos, side by side in one run.

    python benchmarks/pack_speed.py ../shared/real-videos --flows farneback dis-medium --rounds 3

Packs every video of FOLDER (one class: pack's --folders layout, through links) with each
--flows setting in turn, each round, into a fresh folder, with pack's defaults otherwise
(stride 6, short side 256) and --workers; prints each setting's median wall time, frames per
second and its ratio to the first setting's, and the time per stage pack reports.
"""
from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from pack.flow import METHODS
from pack.video import VIDEO_EXTENSIONS

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path, help="a folder of real videos")
    p.add_argument("--flows", nargs="+", choices=METHODS, default=["farneback", "dis-medium"],
                   help="flow methods to compare; the first is the baseline")
    p.add_argument("--rounds", type=int, default=3, help="turns of each setting")
    p.add_argument("--workers", type=int, default=2, help="pack's --workers")
    args = p.parse_args()
    videos = sorted(v for v in args.folder.glob("*") if v.suffix.lower() in VIDEO_EXTENSIONS) if args.folder.is_dir() else []
    if not videos or args.rounds < 1:
        raise SystemExit(f"error: {args.folder} holds no videos, or --rounds is below 1")
    walls: dict[str, list[float]] = {f: [] for f in args.flows}
    stages: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        clips = Path(tmp) / "clips" / "all"
        clips.mkdir(parents=True)
        for v in videos:
            (clips / v.name).symlink_to(v.resolve())
        for r in range(args.rounds):
            for flow in args.flows:
                out = Path(tmp) / f"{flow}-{r}"
                done = subprocess.run([sys.executable, "-m", "pack", "--folders", str(clips.parent), "--split", "train",
                                       "--out", str(out), "--workers", str(args.workers), "--flow", flow],
                                      capture_output=True, text=True, cwd=REPO)
                found = re.search(r"packed (\d+) videos, (\d+) frames, .* in ([0-9.]+)s", done.stdout)
                if done.returncode != 0 or not found:
                    raise SystemExit(f"error: pack --flow {flow} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
                frames = int(found.group(2))
                walls[flow].append(float(found.group(3)))
                stages[flow] = re.search(r"time per stage.*", done.stdout).group(0)
    base = statistics.median(walls[args.flows[0]])
    print(f"{len(videos)} videos, {frames} frames, --workers {args.workers}, median of {args.rounds} rounds")
    print("| flow | wall (median) | frames/s | wall vs " + args.flows[0] + " | all walls |")
    print("|---|---|---|---|---|")
    for flow, w in walls.items():
        m = statistics.median(w)
        print(f"| {flow} | {m:.2f} s | {frames / m:.0f} | {m / base:.2f}x | {', '.join(f'{x:.2f}' for x in w)} |")
    for flow, line in stages.items():
        print(f"{flow} (last round): {line}")


if __name__ == "__main__":
    main()
