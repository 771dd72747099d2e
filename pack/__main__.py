"""Pack Kinetics videos into WebDataset shards of RGB frames and optical flow.

    python -m pack --csv kinetics_train.csv --videos videos/ --out data/ --workers 8

Re-run the same command after a crash or kill: finished shard groups are kept, the rest
is redone. See docs/FORMAT.md for what is written.
"""
from __future__ import annotations

import argparse
import dataclasses
import multiprocessing as mp
import queue
import random
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

import cv2
from tqdm import tqdm

from .csvs import SPLIT_ALIASES, Clip, class_list, read_class_file, read_clips
from .manifest import load_manifest, read_json, write_manifest
from .packer import PackParams, pack_group
from .shards import atomic_write_json
from .video import index_videos


def get_args_parser() -> argparse.ArgumentParser:
    d = PackParams()
    p = argparse.ArgumentParser(prog="python -m pack", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--csv", required=True, type=Path, help="Kinetics annotation CSV (label,youtube_id,time_start,time_end,split)")
    p.add_argument("--videos", required=True, type=Path, help="folder holding the videos, in any sub-folder layout")
    p.add_argument("--out", required=True, type=Path, help="DATA folder; shards go to DATA/{split}/{rgb,flow}/")
    p.add_argument("--split", help="which split of the CSV to pack (default: the CSV's only split)")
    p.add_argument("--classes", type=Path, help="class list, one per line (default: sorted labels of the CSV, "
                   "or the classes already in DATA so val/test share train's order)")
    p.add_argument("--workers", type=int, default=mp.cpu_count(), help="processes packing in parallel (default: all cores)")
    p.add_argument("--stride", type=int, default=d.stride, help="keep one sample every N frames (the baseline's frame_step)")
    p.add_argument("--flow", choices=["farneback", "dis"], default=d.flow, help="optical flow method: farneback (the baseline's) or dis (ultrafast, ~20x quicker)")
    p.add_argument("--flow-len", type=int, default=d.flow_len, help="flow images per sample (frames t..t+L)")
    p.add_argument("--flow-bound", type=float, default=d.flow_bound, help="flow in pixels that maps to the ends of 0..255")
    p.add_argument("--short-side", type=int, default=d.short_side, help="resize frames so the short side has this many pixels")
    p.add_argument("--quality", type=int, default=d.quality, help="JPEG quality")
    p.add_argument("--shard-videos", type=int, default=d.shard_videos, help="videos per shard group (the unit of parallel work and resume)")
    p.add_argument("--shard-mb", type=int, default=d.shard_mb, help="start a new shard past this many MB")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the video order across shards")
    p.add_argument("--part", type=int, default=0, help="pack only part I of --num-parts (for several machines)")
    p.add_argument("--num-parts", type=int, default=1, help="how many parts the split is packed in")
    p.add_argument("--strict", action="store_true", help="exit non-zero if any video could not be packed")
    return p


def choose_split(clips: list[Clip], split: str | None, csv: Path) -> str:
    splits = sorted({c.split for c in clips})
    split = SPLIT_ALIASES.get(split, split)
    if split is None:
        if len(splits) != 1:
            raise SystemExit(f"error: {csv} holds splits {splits}; choose one with --split")
        return splits[0] or "train"
    if split not in splits:
        raise SystemExit(f"error: {csv} has no split {split!r}; it has {splits}")
    return split


def plan_groups(clips: list[Clip], classes: list[str], p: PackParams) -> list[list[dict]]:
    """A seeded shuffle of the videos, cut into groups: a shard never holds one class only."""
    seen, videos = set(), []
    for c in clips:
        if c.video_id not in seen:
            seen.add(c.video_id)
            videos.append({"id": c.video_id, "youtube_id": c.youtube_id, "label": c.label,
                           "cls": classes.index(c.label) if c.label is not None else -1})
    random.Random(p.seed).shuffle(videos)
    return [videos[i:i + p.shard_videos] for i in range(0, len(videos), p.shard_videos)]


def existing_classes(out: Path) -> list[str] | None:
    try:
        return load_manifest(out)["classes"] or None
    except FileNotFoundError:
        return None


def _init_worker() -> None:
    cv2.setNumThreads(1)  # the pool is the parallelism


def main(args: argparse.Namespace) -> int:
    if not 0 <= args.part < args.num_parts:
        raise SystemExit(f"error: --part must be in 0..{args.num_parts - 1}")
    params = PackParams(stride=args.stride, flow=args.flow, flow_len=args.flow_len, flow_bound=args.flow_bound,
                        short_side=args.short_side, quality=args.quality, shard_videos=args.shard_videos,
                        shard_mb=args.shard_mb, seed=args.seed)
    clips = read_clips(args.csv)
    split = choose_split(clips, args.split, args.csv)
    clips = [c for c in clips if c.split == split or (not c.split and split == "train")]
    given = read_class_file(args.classes) if args.classes else existing_classes(args.out)
    if given and not args.classes:
        print(f"using the {len(given)} classes already in {args.out / 'classes.txt'}")
    try:
        classes = class_list(clips, given)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    groups = plan_groups(clips, classes, params)

    split_dir = args.out / split
    plan = {"params": dataclasses.asdict(params), "classes": classes, "groups": groups}
    plan_path = split_dir / "plan.json"
    if plan_path.exists() and read_json(plan_path) != plan:
        raise SystemExit(f"error: {split_dir} was packed from another CSV or with other parameters; "
                         f"re-run with the same arguments, or pack into a new --out")
    for d in ("rgb", "flow", "records"):
        (split_dir / d).mkdir(parents=True, exist_ok=True)
    if not plan_path.exists():
        atomic_write_json(plan_path, plan)

    on_disk = index_videos(args.videos)
    mine = [g for g in range(len(groups)) if g % args.num_parts == args.part]
    todo = [g for g in mine if not (split_dir / "records" / f"{g:05d}.json").exists()]
    for g in todo:  # temporaries of a killed run of this part: shards, indexes, records
        for tmp in split_dir.glob(f"*/.*{g:05d}*.tmp*"):
            tmp.unlink()
    jobs = {g: [{**v, "path": str(on_disk.get(v["id"]) or on_disk.get(v["youtube_id"]) or "") or None}
                for v in groups[g]] for g in todo}
    n_videos = sum(len(j) for j in jobs.values())
    print(f"{split}: {sum(len(g) for g in groups)} videos in {len(groups)} groups; part {args.part}/{args.num_parts}: "
          f"{len(mine)} groups, {len(mine) - len(todo)} already done, packing {n_videos} videos "
          f"with {args.workers} workers ({params.flow} flow)")

    records, start = run_jobs(split_dir, jobs, params, args.workers, n_videos)
    wall = time.perf_counter() - start
    manifest = write_manifest(args.out)
    report(records, manifest["splits"][split], wall, args)
    if not manifest["splits"][split]["complete"] and args.num_parts > 1:
        print(f"other parts are not finished yet; once they are: python -m pack.merge {args.out}")
    return 1 if args.strict and manifest["splits"][split]["failed"] else 0


def run_jobs(split_dir: Path, jobs: dict, params: PackParams, workers: int, n_videos: int):
    """Pack groups in a process pool, with a progress bar fed per video."""
    records = []
    start = time.perf_counter()
    with mp.Manager() as manager, tqdm(total=n_videos, unit="video", smoothing=0.05) as bar:
        progress = manager.Queue()
        frames = 0

        def drain(timeout: float) -> None:
            nonlocal frames
            try:
                while True:
                    f, _ = progress.get(timeout=timeout)
                    frames += f
                    bar.update(1)
                    bar.set_postfix(frames_per_s=f"{frames / (time.perf_counter() - start):.0f}", refresh=False)
                    timeout = 0
            except queue.Empty:
                pass

        if workers <= 1:
            _init_worker()
            for g, videos in jobs.items():
                records.append(pack_group(split_dir, g, videos, params, progress))
                drain(0)
        else:
            with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"), initializer=_init_worker) as pool:
                pending = {pool.submit(pack_group, split_dir, g, v, params, progress) for g, v in jobs.items()}
                while pending:
                    done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                    records += [f.result() for f in done]
                    drain(0.05)
        drain(0)
    return records, start


def report(records: list[dict], split: dict, wall: float, args: argparse.Namespace) -> None:
    """Closing summary: rates, per-stage breakdown, and every video that was not packed."""
    seconds: dict[str, float] = {}
    for r in records:
        for stage, s in r["seconds"].items():
            seconds[stage] = seconds.get(stage, 0.0) + s
    frames = sum(v["frames"] for r in records for v in r["videos"].values())
    samples = sum(v["samples"] for r in records for v in r["videos"].values())
    videos = sum(len(r["videos"]) for r in records)
    total = sum(seconds.values()) or 1e-9
    print(f"packed {videos} videos, {frames} frames, {samples} samples in {wall:.1f}s: "
          f"{videos / wall:.2f} videos/s, {frames / wall:.0f} frames/s, {samples / wall:.1f} samples/s")
    if seconds:
        print("time per stage (summed over workers): " + ", ".join(
            f"{k} {v:.1f}s ({100 * v / total:.0f}%)" for k, v in sorted(seconds.items(), key=lambda kv: -kv[1])))
    state = "complete" if split["complete"] else f"{split['groups_done']}/{split['groups_total']} groups done"
    print(f"split total: {split['videos']} videos, {split['samples']} samples ({state}), "
          f"written to {args.out / 'manifest.json'}")
    if split["failed"]:
        print(f"{len(split['failed'])} videos NOT packed (also listed in the manifest):")
        for vid, reason in sorted(split["failed"].items())[:20]:
            print(f"  {vid}: {reason}")
        if len(split["failed"]) > 20:
            print(f"  ... and {len(split['failed']) - 20} more")


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
