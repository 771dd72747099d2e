"""Pack videos into WebDataset shards of RGB frames and optical flow, from the annotations as published.

    python -m pack --csv kinetics400/train.csv --videos kinetics400/train --out data --workers 16
    python -m pack --ucf101 ucfTrainTestlist --fold 1 --videos UCF-101 --out data/ucf101-1
    python -m pack --hmdb51 testTrainMulti_7030_splits --fold 1 --videos hmdb51 --out data/hmdb51-1
    python -m pack --list train.txt --split train --videos clips --out data     # "relative/path label" lines
    python -m pack --folders clips/train --split train --out data               # a sub-folder per class

UCF101 and HMDB51 pack both splits of the fold: train, and val from its test list. Re-run the
same command after a crash or kill: finished shard groups are kept, the rest is redone. In
a Slurm job array, each task packs its part (SLURM_ARRAY_TASK_ID); then python -m pack.merge.
See docs/FORMAT.md for what is written.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import multiprocessing as mp
import os
import queue
import random
import signal
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

import cv2
from tqdm import tqdm

from .annotations import (AnnotationError, Annotations, Clip, check_disjoint, class_difference, class_list, deduplicated,
                          read_class_file, read_folders, read_hmdb51, read_kinetics, read_list, read_ucf101, SPLIT_ALIASES)
from .files import Lock, atomic_write_json, check_output_dir
from .flow import DEFAULT_BOUNDS, ENCODINGS, METHODS, make_flow_fn
from .manifest import PLAN_KEYS, BrokenFile, complete_params, data_lock, plan_id, read_json, write_manifest
from .packer import PackParams, pack_group
from .shards import sample_key
from .video import VideoError, VideoIndex
from .workers import die_with_parent, opencv_threads_stopped


def integer(low: int, high: int | None = None):
    """An argparse type: an integer in low..high, else a one-line usage error naming the flag (not a traceback later)."""
    def parse(text: str) -> int:
        value = int(text)
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value} is below {low}" if high is None else f"{value} is not in {low}..{high}")
        return value
    parse.__name__ = "integer"
    return parse


def pixels(text: str) -> float:
    """--flow-bound: a finite number of pixels above 0 (it divides)."""
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text} is not a number of pixels above 0")
    return value


def get_args_parser() -> argparse.ArgumentParser:
    d = PackParams()
    p = argparse.ArgumentParser(prog="python -m pack", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("annotations (one of)").add_mutually_exclusive_group(required=True)
    g.add_argument("--csv", type=Path, help="Kinetics annotation CSV (label,youtube_id,time_start,time_end,split), "
                                            "400, 600 or 700")
    g.add_argument("--ucf101", type=Path, metavar="DIR", help="UCF101's ucfTrainTestlist folder (classInd.txt, "
                                                              "trainlistK.txt, testlistK.txt): packs train and val")
    g.add_argument("--hmdb51", type=Path, metavar="DIR", help="HMDB51's split folder (<class>_test_splitK.txt files): "
                                                              "packs train and val")
    g.add_argument("--list", type=Path, metavar="FILE", help="a list file, 'relative/path label' a line (a class name, "
                                                             "or a 0-based index into --classes); needs --split")
    g.add_argument("--folders", type=Path, metavar="DIR", help="DIR/<class>/<videos>: every video under a class's "
                                                               "folder; needs --split")
    p.add_argument("--fold", type=int, default=1, choices=[1, 2, 3], help="UCF101's or HMDB51's fold")
    p.add_argument("--videos", type=Path, help="folder holding the videos, in any sub-folder layout (not with --folders)")
    p.add_argument("--out", required=True, type=Path, help="DATA folder; shards go to DATA/{split}/{rgb,flow}/")
    p.add_argument("--split", help="--csv: which split of the CSV to pack (default: its only one); --list, --folders: "
                                   "the split's name (train, val, test, ...)")
    p.add_argument("--classes", type=Path, help="class list, one per line (default: the layout's, the sorted labels, "
                                                "or the classes already in DATA so val/test share train's order)")
    p.add_argument("--workers", type=int, default=mp.cpu_count(), help="processes packing in parallel (default: all cores)")
    p.add_argument("--stride", type=integer(1), default=d.stride, help="keep one sample every N frames (the baseline's frame_step)")
    p.add_argument("--flow", choices=METHODS, default=d.flow,
                   help=f"optical flow method (default {d.flow}): farneback (the baseline's), dis, dis-fast, dis-medium "
                        f"(DIS at OpenCV's ultrafast, fast, medium presets), tvl1 (TV-L1, cut down to be affordable for "
                        f"UCF101-sized data; needs opencv-contrib-python-headless); docs/benchmarks.md compares them")
    p.add_argument("--flow-encoding", choices=ENCODINGS, default=d.flow_encoding,
                   help=f"flow image channels (default {d.flow_encoding}): xym, x/y/magnitude (the baseline's), or xy, "
                        f"x/y and a constant third channel (TSN's)")
    p.add_argument("--flow-len", type=integer(1), default=d.flow_len, help="flow images per sample (frames t..t+L)")
    p.add_argument("--flow-bound", type=pixels, help="flow in pixels that maps to the ends of 0..255 (default: "
                   + ", ".join(f"{b:g} for {e}" for e, b in DEFAULT_BOUNDS.items()) + ")")
    p.add_argument("--short-side", type=integer(16), default=d.short_side, help="resize frames so the short side has this many pixels")
    p.add_argument("--quality", type=integer(1, 100), default=d.quality, help="JPEG quality of the RGB frames (and of "
                                                                                "flow, without --flow-quality)")
    p.add_argument("--flow-quality", type=integer(1, 100), help="JPEG quality of the flow images (default: --quality)")
    p.add_argument("--shard-videos", type=integer(1), default=d.shard_videos, help="videos per shard group (the unit of parallel work and resume)")
    p.add_argument("--shard-mb", type=integer(1), default=d.shard_mb, help="start a new shard past this many MB")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the video order across shards")
    p.add_argument("--part", type=integer(0), help="pack only part I of --num-parts (several machines; default: the Slurm "
                                            "array task's, else 0)")
    p.add_argument("--num-parts", type=integer(1), help="how many parts the split is packed in (default: the Slurm array's "
                                                 "task count, else 1)")
    p.add_argument("--strict", action="store_true", help="exit non-zero if any video could not be packed")
    return p


def read_annotations(args, given: list[str] | None) -> Annotations:
    """The clips of each split to pack, from whichever layout was given (given: --classes, for a list's indices)."""
    if (args.videos is None) != (args.folders is not None):
        raise SystemExit("error: --folders holds the videos itself: drop --videos" if args.folders else
                         "error: --videos FOLDER is needed: where the videos are")
    if (args.list or args.folders) and not args.split:
        raise SystemExit("error: --list and --folders need --split NAME (train, val, test, ...): the split they make")
    if args.folders and args.out.resolve().is_relative_to(args.folders.resolve()):
        raise SystemExit(f"error: --out {args.out} is inside --folders {args.folders}: its split folder would be read "
                         f"as a class next time; give an --out outside it")
    if (args.ucf101 or args.hmdb51) and args.split:
        raise SystemExit("error: --ucf101 and --hmdb51 pack both splits of the fold (train and val): drop --split")
    if args.csv:
        annotations = read_kinetics(args.csv)
        split = choose_split(list(annotations.splits), args.split, args.csv)
        annotations.splits = {split: annotations.splits[split]}
    elif args.ucf101:
        annotations = read_ucf101(args.ucf101, args.fold)
    elif args.hmdb51:
        annotations = read_hmdb51(args.hmdb51, args.fold)
    elif args.list:
        annotations = read_list(args.list, args.split, given)
    else:
        annotations = read_folders(args.folders, args.split)
    annotations.splits = {s: deduplicated(clips) for s, clips in annotations.splits.items()}
    check_disjoint(annotations)
    return annotations


def choose_split(splits: list[str], split: str | None, csv: Path) -> str:
    split = SPLIT_ALIASES.get(split, split)
    if split is None:
        if len(splits) != 1:
            raise SystemExit(f"error: {csv} holds splits {sorted(splits)}; choose one with --split")
        return splits[0]
    if split not in splits:
        raise SystemExit(f"error: {csv} has no split {split!r}; it has {sorted(splits)}")
    return split


def slurm_number(name: str, default: int | None = None) -> int:
    """A Slurm array variable as a number; a clear error if it is not one (a wrong job script), rather than a guess."""
    value = os.environ.get(name)
    if value is None and default is not None:
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise SystemExit(f"error: {name}={value!r} is not a number (a Slurm job array sets it); give the part with "
                         f"--part I --num-parts N instead") from None


def choose_part(args) -> tuple[int, int, str]:
    """(part, parts, how they were chosen): the flags, else a Slurm job array's task, else the whole split."""
    in_array = "SLURM_ARRAY_TASK_ID" in os.environ
    if args.num_parts is not None and args.part is None and in_array:
        raise SystemExit(f"error: --num-parts {args.num_parts} without --part in a Slurm job array (task "
                         f"{os.environ['SLURM_ARRAY_TASK_ID']}): every task would pack part 0; give --part too, or "
                         f"drop --num-parts to take the part from the array")
    if args.part is not None or args.num_parts is not None:
        part, parts = args.part or 0, 1 if args.num_parts is None else args.num_parts
        how = "--part/--num-parts"
    elif in_array:
        if "SLURM_ARRAY_TASK_COUNT" not in os.environ:
            raise SystemExit("error: SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not: how many parts "
                             "the split is cut in cannot be told; give --part I --num-parts N")
        task, first = slurm_number("SLURM_ARRAY_TASK_ID"), slurm_number("SLURM_ARRAY_TASK_MIN", 0)
        part, parts = task - first, slurm_number("SLURM_ARRAY_TASK_COUNT")
        how = f"the Slurm job array (task {task} of {first}..{first + parts - 1})"
    else:
        return 0, 1, ""
    if parts < 1 or not 0 <= part < parts:
        raise SystemExit(f"error: part {part} is not in 0..{parts - 1} ({how})")
    return part, parts, how


def plan_groups(clips: list[Clip], classes: list[str], p: PackParams) -> list[list[dict]]:
    """A seeded shuffle of the videos, cut into groups: a shard never holds one class only."""
    videos = [{"id": c.video_id, "youtube_id": c.youtube_id, "label": c.label,
               "cls": classes.index(c.label) if c.label is not None else -1,
               **({"key": sample_key(c.video_id)} if sample_key(c.video_id) != c.video_id else {}),
               **({"file": c.path} if c.path else {})} for c in clips]
    keys: dict[str, Clip] = {}
    for c in clips:  # a safe key is a hash's length from another id's: checked, never assumed
        other = keys.setdefault(sample_key(c.video_id), c)
        if other is not c:
            raise SystemExit(f"error: {c.where}: the videos {c.video_id!r} and {other.video_id!r} ({other.where}) "
                             f"would go under one sample key; rename one of them")
    random.Random(p.seed).shuffle(videos)
    return [videos[i:i + p.shard_videos] for i in range(0, len(videos), p.shard_videos)]


def same_plan(old: dict, new: dict) -> bool:
    """Whether a split's existing plan is this run's (plans written before they recorded their source match without it,
    and before a pack parameter existed, as packed with what it is now set to: complete_params)."""
    old = {**old, "params": complete_params(old["params"])}
    return old == (new if "source" in old else {k: v for k, v in new.items() if k != "source"})


def existing_classes(out: Path) -> list[str] | None:
    """The class list of the splits already in DATA (their plans, written first; call under data_lock)."""
    for plan_path in sorted(Path(out).glob("*/plan.json")):
        classes = read_json(plan_path, needs=PLAN_KEYS)["classes"]
        if classes:
            return classes
    return None


def locate(clips: list[Clip], index: VideoIndex) -> dict[str, tuple[Path | None, str | None]]:
    """Each video's file (by its path, else its id, else its YouTube id), or why none: {id: (path, reason)}.

    Two files that would be one video (`abc.mp4` and `abc.mkv`) stop the pack, naming both:
    which one is meant cannot be told. A `{youtube_id}.mp4` that two clips (two time ranges)
    would both be read from is theirs to neither: which range the file holds cannot be told.
    """
    found, by_youtube = {}, {}
    for c in clips:
        try:
            path = index.find(c.video_id, path=c.path)
            if path is None and c.youtube_id:
                path = index.find(c.youtube_id)
                if path is not None:
                    by_youtube.setdefault(path, []).append(c.video_id)
        except VideoError as e:
            raise SystemExit(f"error: {c.where}: {e}: they would both be the video {c.video_id!r}; remove or "
                             f"rename one of them") from None
        near = [] if path else index.other_case(c.path, c.video_id, c.youtube_id)
        hint = f" (did you mean {', '.join(near[:3])}? its letter case differs)" if near else ""
        found[c.video_id] = (path, None) if path else (None, f"missing: no video file with this name under --videos{hint}")
    for path, ids in by_youtube.items():
        if len(ids) > 1:
            for vid in ids:
                found[vid] = (None, f"ambiguous: {path.name} is the file of {len(ids)} clips ({', '.join(ids[:3])}): "
                                    f"which time range it holds cannot be told; name the files as the crawler does, "
                                    f"{{youtube_id}}_{{start:06d}}_{{end:06d}}.mp4")
    return found


def located(args, split: str, clips: list[Clip], index: VideoIndex) -> dict[str, tuple[Path | None, str | None]]:
    """locate(), where a split with no videos listed, or none of them on disk, is an error: it would pack nothing."""
    source = args.csv or args.ucf101 or args.hmdb51 or args.list or args.folders
    if not clips:
        raise SystemExit(f"error: {source}: split {split} lists no videos; nothing to pack")
    where = locate(clips, index)
    missing = [(vid, reason) for vid, (_, reason) in where.items() if reason and reason.startswith("missing")]
    if len(missing) == len(clips):
        raise SystemExit(f"error: split {split}: none of its {len(clips)} videos is under {args.videos or args.folders} "
                         f"(the first, {missing[0][0]}: {missing[0][1]}); check --videos")
    return where


def split_plan(args, split: str, clips: list[Clip], annotations: Annotations, classes_file: list[str] | None,
               params: PackParams) -> dict:
    """The split's plan; its classes: --classes, else DATA's (val and test keep train's order), else the layout's.

    Call under data_lock: two packs of two splits into one new DATA take one class list.
    """
    packed = existing_classes(args.out)
    given = classes_file or packed
    if packed and not classes_file:
        print(f"using the {len(packed)} classes already in {args.out}")
    layout = annotations.classes
    if given and layout and given != layout and not (annotations.classes_subset and set(layout) <= set(given)):
        raise SystemExit(f"error: {args.out} holds another class list ({len(given)} classes) than these annotations' "
                         f"({len(layout)}: {class_difference(given, layout, str(args.out), 'the annotations')}); "
                         f"pack them into another --out")
    try:
        classes = class_list(clips, given or layout)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    labels = {c.label for c in clips}
    empty = [c for c in classes if c not in labels]
    if empty and None not in labels:
        print(f"warning: split {split} has no videos of {len(empty)} of its {len(classes)} classes: "
              f"{', '.join(empty[:10])}{' ...' if len(empty) > 10 else ''}")
    return {"params": dataclasses.asdict(params), "classes": classes, "groups": plan_groups(clips, classes, params),
            "source": annotations.sources.get(split)}


_progress = None  # in a pool worker: the progress queue (a queue reaches a process only as it starts)


def _init_worker(progress) -> None:
    global _progress
    _progress = progress
    cv2.setNumThreads(1)  # the pool is the parallelism
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the main process's handler, which fork copied
    die_with_parent()


def _pack_in_worker(split_dir: Path, group: int, videos: list[dict], params: PackParams, stamp: dict) -> dict:
    return pack_group(split_dir, group, videos, params, _progress, stamp)


def main(args: argparse.Namespace) -> int:
    try:
        make_flow_fn(args.flow)  # a method this install lacks (tvl1 without OpenCV's contrib) stops before any work
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    part, parts, how = choose_part(args)
    if how:
        print(f"packing part {part} of {parts} (0..{parts - 1}), from {how}")
    try:
        classes_file = read_class_file(args.classes) if args.classes else None
        annotations = read_annotations(args, classes_file)
    except AnnotationError as e:
        raise SystemExit(f"error: {e}") from None
    check_output_dir(args.out, "--out")
    params = PackParams(stride=args.stride, flow=args.flow, flow_len=args.flow_len,
                        flow_bound=args.flow_bound or DEFAULT_BOUNDS[args.flow_encoding],
                        flow_encoding=args.flow_encoding, short_side=args.short_side, quality=args.quality,
                        flow_quality=args.flow_quality or args.quality, shard_videos=args.shard_videos,
                        shard_mb=args.shard_mb, seed=args.seed)
    index = VideoIndex(args.videos or args.folders)
    where = {split: located(args, split, clips, index) for split, clips in annotations.splits.items()}
    failed = False
    for split, clips in annotations.splits.items():
        try:
            failed |= pack_split(args, split, (clips, annotations, classes_file, params), where[split], part, parts)
        except BrokenFile as e:
            raise SystemExit(f"error: {e}: remove it and run the same command again") from None
    return 1 if args.strict and failed else 0


def pack_split(args, split: str, planning: tuple, where: dict, part: int, parts: int) -> bool:
    """Pack this part of one split (what is not done yet); rebuild the manifest. Whether any video failed.

    planning: split_plan's arguments (clips, annotations, classes_file, params); where: locate()'s answer.
    """
    split_dir = args.out / split
    plan_path = split_dir / "plan.json"
    for d in ("rgb", "flow", "records"):
        (split_dir / d).mkdir(parents=True, exist_ok=True)
    with Lock(split_dir / f".pack-part{part}-of-{parts}.lock").acquire(f"{split_dir} (part {part} of {parts})"):
        with data_lock(args.out):
            for tmp in [*args.out.glob(".manifest.json.tmp*"), *args.out.glob(".classes.txt.tmp*")]:
                tmp.unlink()  # of a pack killed while writing them (under the lock: no other is)
            plan = split_plan(args, split, *planning)
            if plan_path.exists():
                packed = read_json(plan_path, needs=PLAN_KEYS)
                if not same_plan(packed, plan):
                    raise SystemExit(f"error: {split_dir} was packed from other annotations or with other parameters; "
                                     f"re-run with the same arguments, or pack into a new --out")
                plan = packed  # its id is the split's, which the records of the groups packed now must carry
            else:
                atomic_write_json(plan_path, plan)
        groups, params = plan["groups"], PackParams(**complete_params(plan["params"]))
        mine = [g for g in range(len(groups)) if g % parts == part]
        todo = [g for g in mine if not (split_dir / "records" / f"{g:05d}.json").exists()]
        for g in todo:  # temporaries of a killed run of this part: shards, indexes, records
            for tmp in split_dir.glob(f"*/.*{g:05d}*.tmp*"):
                tmp.unlink()
        jobs = {g: [{**v, "path": where[v["id"]][0], "reason": where[v["id"]][1]} for v in groups[g]] for g in todo}
        n_videos = sum(len(j) for j in jobs.values())
        print(f"{split}: {sum(len(g) for g in groups)} videos in {len(groups)} groups; part {part}/{parts}: "
              f"{len(mine)} groups, {len(mine) - len(todo)} already done, packing {n_videos} videos "
              f"with {args.workers} workers ({params.flow} flow, {params.flow_encoding} at bound {params.flow_bound:g})")
        try:
            records, start = run_jobs(split_dir, jobs, params, args.workers, n_videos, {"plan": plan_id(plan),
                                                                                        "part": [part, parts]})
        except OSError as e:  # a full disk, a folder made read-only meanwhile
            raise SystemExit(f"error: {split_dir}: cannot write the shards ({e.strerror or e}); the groups finished "
                             f"so far are kept: free space (or fix the folder) and run the same command again") from None
        wall = time.perf_counter() - start
    try:
        manifest = write_manifest(args.out)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    except OSError as e:  # a full disk
        raise SystemExit(f"error: {args.out / 'manifest.json'}: cannot write it ({e.strerror or e}); the shards packed "
                         f"are kept: free space, then run the same command again (it writes the manifest)") from None
    report(records, manifest["splits"][split], wall, args)
    if not manifest["splits"][split]["complete"] and parts > 1:
        print(f"other parts are not finished yet; once they are: python -m pack.merge {args.out}")
    return bool(manifest["splits"][split]["failed"])


def stop_on_sigterm(signum, frame) -> None:
    """SIGTERM (kill PID, a scheduler's cancel) stops the workers too: none goes on writing once the lock is gone."""
    for child in mp.active_children():
        child.kill()
    raise SystemExit("error: stopped by SIGTERM; the shard groups finished so far are kept: run the same command "
                     "again to pack the rest")


def run_jobs(split_dir: Path, jobs: dict, params: PackParams, workers: int, n_videos: int, stamp: dict):
    """Pack groups in a process pool, with a progress bar fed per video; SIGTERM meanwhile stops the pool too."""
    records = []
    start = time.perf_counter()
    progress = queue.SimpleQueue() if workers <= 1 else mp.get_context("fork").Queue()
    previous = signal.signal(signal.SIGTERM, stop_on_sigterm)
    try:
        with tqdm(total=n_videos, unit="video", smoothing=0.05) as bar:
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
                cv2.setNumThreads(1)
                for g, videos in jobs.items():
                    records.append(pack_group(split_dir, g, videos, params, progress, stamp))
                    drain(0)
            else:
                with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"), initializer=_init_worker,
                                         initargs=(progress,)) as pool:
                    with opencv_threads_stopped():  # the pool forks its workers as the jobs are submitted
                        pending = {pool.submit(_pack_in_worker, split_dir, g, v, params, stamp) for g, v in jobs.items()}
                    while pending:
                        done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                        records += [f.result() for f in done]
                        drain(0.05)
                drain(0.2)  # the workers' last puts may still be on their way
    finally:
        signal.signal(signal.SIGTERM, previous)
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
    packed = {vid: v for r in records for vid, v in r["videos"].items()}
    turned = sum(1 for v in packed.values() if v.get("rotation") or v.get("mirrored"))
    if turned:
        print(f"{turned} videos turned upright as a player shows them (their display rotation or mirror; "
              f"video_info's rotation and mirrored in the manifest)")
    for vid, v in sorted(packed.items()):
        if "video_stream" in v:
            print(f"  {vid}: {v['video_stream']}")


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
