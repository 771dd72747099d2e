"""Which flow to pack: what a flow stream learns from each, per pack-second.

    python benchmarks/flow_choice.py ../shared/real-videos --work /tmp/flow_choice

Makes videos with known motion from real footage (the clips of FOOTAGE): a textured patch
cut from one clip moves over a background cut from another, and the camera pans (the
background moves, at a random speed and direction). The class is the patch's motion
relative to the background: up or down, slow (under 1 px a frame) or fast (over 8 px a
frame, past the baseline's bound), or none (it moves with the background). No single frame
tells the class; the flow's difference between the patch and its surroundings does. The
training videos are cut from the first half of the clips (sorted by name), the test videos
from the others: scenes the stream never saw.

For each configuration (pack flags) it packs both splits with `python -m pack`, trains a
flow stream on them with `train.py` for each seed and scores it with `score.py`, as a user
would, and prints side by side: pack seconds per 1,000 frames (the stages' seconds pack
records, one worker, this run), flow milliseconds per sample (per frame pair, times the
flow images a sample holds) at 256x602 on real footage (each method in turn, several
rounds), the flow stream's frame and video top-1 on
the test videos (mean and spread over the seeds), and the end-point error of the stored
flow images (decoded, so bound, encoding and JPEG included) against the known motion, on
the patch (slow and fast) and the background.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import av
import cv2
import numpy as np

from pack.annotations import crawler_stem
from pack.flow import decode_flow, make_flow_fn
from pack.manifest import load_manifest
from pack.synth import ID_CHARS, write_video
from pack.video import VIDEO_EXTENSIONS

# name: pack flags. The first is today's default, the baseline of every comparison.
REPO = Path(__file__).resolve().parents[1]
CONFIGS = {
    "farneback": ["--flow", "farneback"],
    "dis": ["--flow", "dis"],
    "dis-fast": ["--flow", "dis-fast"],
    "dis-medium": ["--flow", "dis-medium"],
    "tvl1": ["--flow", "tvl1"],
    "dis-medium/xy": ["--flow", "dis-medium", "--flow-encoding", "xy"],
    "dis-medium/q75": ["--flow", "dis-medium", "--flow-quality", "75"],
    "dis-fast/len5": ["--flow", "dis-fast", "--flow-len", "5"],
}
# The relative motion of each class (pixels a frame at the packed size, y down): a speed range, a direction.
CLASSES = {"up fast": ((8.5, 10.0), -1), "up slow": ((0.4, 0.9), -1), "none": ((0.0, 0.0), 0),
           "down slow": ((0.4, 0.9), 1), "down fast": ((8.5, 10.0), 1)}
# Short videos, so that a fast patch is still in the picture at the first and last samples (frames 0, 3, 6).
WIDTH, HEIGHT, FRAMES, STRIDE = 96, 96, 8, 3  # packed at short side 96: the motion is known at the packed size
PATCH = 32  # the moving patch's size in pixels
PAN = (0.5, 2.5)  # camera pan speed range, pixels a frame, any direction


def load_footage(folder: Path) -> list[tuple[str, list[np.ndarray]]]:
    """Every 4th frame of each clip (RGB, short side 160), by clip, sorted by file name."""
    if not folder.is_dir():
        raise SystemExit(f"error: {folder}: no such folder (give a folder of real video clips)")
    clips = []
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in VIDEO_EXTENSIONS):
        frames = []
        try:
            with av.open(str(path)) as container:
                for i, frame in enumerate(container.decode(video=0)):
                    if i % 4 == 0:
                        image = frame.to_ndarray(format="rgb24")
                        scale = 160 / min(image.shape[:2])
                        frames.append(cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA))
        except av.FFmpegError as e:
            print(f"warning: {path}: not used, it does not decode ({e})")
        if frames:
            clips.append((path.name, frames))
    if len(clips) < 2:
        raise SystemExit(f"error: {folder}: {len(clips)} readable clips; need 2 or more (train and test footage apart)")
    return clips


def shift(image: np.ndarray, dx: float, dy: float, size: tuple[int, int]) -> np.ndarray:
    """image moved by (dx, dy) pixels (sub-pixel, bilinear) into a canvas of size (width, height)."""
    return cv2.warpAffine(image, np.float32([[1, 0, dx], [0, 1, dy]]), size, flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REFLECT)


def textured_patch(rng: np.random.Generator, frame: np.ndarray) -> np.ndarray:
    """The most textured of a few PATCH-sized squares of a frame: something flow can follow."""
    h, w = frame.shape[:2]
    tries = [frame[y:y + PATCH, x:x + PATCH] for y, x in zip(rng.integers(0, h - PATCH, 12), rng.integers(0, w - PATCH, 12))]
    return max(tries, key=lambda p: cv2.Laplacian(cv2.cvtColor(p, cv2.COLOR_RGB2GRAY), cv2.CV_32F).var())


def render(rng: np.random.Generator, footage: list, label: str) -> tuple[list[np.ndarray], dict]:
    """A video of one class and its motion: frames, and {"camera": c, "relative": r, "masks": patch masks}."""
    (lo, hi), sign = CLASSES[label]
    a, b = rng.choice(len(footage), 2, replace=len(footage) < 2)
    background = footage[a][1][rng.integers(len(footage[a][1]))]
    patch = textured_patch(rng, footage[b][1][rng.integers(len(footage[b][1]))]).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    camera = rng.uniform(*PAN) * np.array([np.cos(angle), np.sin(angle)])  # the view moves by c: the scene by -c
    relative = np.array([0.0, sign * rng.uniform(lo, hi)])
    span = np.abs(camera) * (FRAMES - 1)
    bh, bw = background.shape[:2]
    start = np.array([rng.uniform(0, bw - WIDTH - span[0]), rng.uniform(0, bh - HEIGHT - span[1])])
    start += np.where(camera < 0, span, 0)
    middle = np.array([rng.uniform(0, WIDTH - PATCH), rng.uniform(0, HEIGHT - PATCH)])  # where it is half-way (top left)
    yy, xx = np.mgrid[:PATCH, :PATCH]
    disc = (((yy - PATCH / 2 + 0.5) / (PATCH / 2)) ** 2 + ((xx - PATCH / 2 + 0.5) / (PATCH / 2.6)) ** 2 <= 1)
    frames, masks = [], []
    for t in range(FRAMES):
        view = start + camera * t
        back = shift(background, -view[0], -view[1], (WIDTH, HEIGHT)).astype(np.float32)
        where = middle + (relative - camera) * (t - (FRAMES - 1) / 2)
        mask = cv2.warpAffine(disc.astype(np.float32), np.float32([[1, 0, where[0]], [0, 1, where[1]]]),
                              (WIDTH, HEIGHT), flags=cv2.INTER_LINEAR)[..., None]
        moved = shift(patch, where[0], where[1], (WIDTH, HEIGHT))
        image = mask * moved + (1 - mask) * back + rng.normal(0, 2.0, back.shape)  # sensor noise
        frames.append(np.clip(image, 0, 255).astype(np.uint8))
        masks.append(mask[..., 0] > 0.5)
    return frames, {"camera": camera, "relative": relative, "masks": np.stack(masks)}


def make_videos(footage: list, out: Path, per_class: dict, seed: int) -> dict:
    """Write out/videos/{split}/*.mp4 and out/{split}.csv; return the test split's motion by video id."""
    rng = np.random.default_rng(seed)
    half = len(footage) // 2
    parts = {"train": footage[:half], "val": footage[half:]}
    truth = {}
    for split, clips in parts.items():
        rows = ["label,youtube_id,time_start,time_end,split"]
        folder = out / "videos" / split
        folder.mkdir(parents=True, exist_ok=True)
        for label in CLASSES:
            for _ in range(per_class[split]):
                youtube_id = "".join(rng.choice(list(ID_CHARS), 11))
                frames, motion = render(rng, clips, label)
                stem = crawler_stem(youtube_id, 0, 10)
                write_video(folder / f"{stem}.mp4", frames, 25, "libx264")
                rows.append(f'"{label}",{youtube_id},0,10,{split}')
                if split == "val":
                    truth[stem] = {**motion, "label": label}
        (out / f"{split}.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    print(f"footage: train {', '.join(n for n, _ in parts['train'])}; test {', '.join(n for n, _ in parts['val'])}")
    return truth


def run(command: list[str], log: Path) -> str:
    """Run a user's command; its output goes to log, and a failure stops the benchmark naming the log."""
    # One thread a run: on a box shared with other jobs two threads ran training 10x slower (spinning on each other).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, *command], capture_output=True, text=True, cwd=REPO, env=env)
    log.write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise SystemExit(f"error: {' '.join(command[:3])} ... failed (exit {result.returncode}); see {log}")
    return result.stdout


def pack(work: Path, name: str, flags: list[str]) -> tuple[Path, float]:
    """Pack both splits; the seconds per 1,000 frames pack's records give (one worker: its stages' sum)."""
    data = work / "data" / name.replace("/", "_")
    for split in ("train", "val"):
        run(["-m", "pack", "--csv", str(work / f"{split}.csv"), "--videos", str(work / "videos"), "--out", str(data),
             "--stride", str(STRIDE), "--short-side", str(WIDTH), "--workers", "1", *flags],
            work / "logs" / f"pack-{name.replace('/', '_')}-{split}.log")
    seconds = frames = 0.0
    for record in data.glob("*/records/*.json"):
        r = json.loads(record.read_text())
        seconds += sum(r["seconds"].values())
        frames += sum(v["frames"] for v in r["videos"].values())
    return data, 1000 * seconds / frames


def stored_flow_error(data: Path, truth: dict) -> dict:
    """Mean end-point error (px) of the test split's first flow images, decoded, against the known motion."""
    manifest = load_manifest(data)
    split = manifest["splits"]["val"]
    bound = split["params"]["flow_bound"]
    errors = {"slow": [], "fast": [], "none": [], "background": []}
    for piece in split["shards"]["flow"]:
        with tarfile.open(data / piece["tar"]) as tar:
            for member in tar:
                if not member.name.endswith(".flow0.jpg"):
                    continue
                stem, t = member.name.split(".")[0].split("/")
                motion = truth[stem]
                pair = min(int(t), FRAMES - 2)  # the last sample's flow is the video's last pair
                image = cv2.imdecode(np.frombuffer(tar.extractfile(member).read(), np.uint8), cv2.IMREAD_COLOR)
                flow = decode_flow(cv2.cvtColor(image, cv2.COLOR_BGR2RGB), bound)
                mask = motion["masks"][pair]
                scene = -motion["camera"]
                error = np.linalg.norm(flow - np.where(mask[..., None], scene + motion["relative"], scene), axis=2)
                speed = motion["label"].split()[-1]
                if mask.any():
                    errors[speed].append(float(error[mask].mean()))
                errors["background"].append(float(error[~mask].mean()))
    return {k: float(np.mean(v)) for k, v in errors.items()}


def train_and_score(work: Path, name: str, data: Path, seed: int, args) -> tuple[float, float]:
    """A flow stream trained on data's train split with this seed; its frame and video top-1 on val."""
    save = work / "runs" / f"{name.replace('/', '_')}-seed{seed}"
    tag = save.name
    run(["train.py", "--data", str(data), "--modality", "flow", "--arch", "resnet18", "--input-size", "32",
         "--batch-size", "32", "--lr", "0.01", "--max-iterations", str(args.iterations),
         "--step-values", str(args.iterations * 3 // 4), "--val-split", "", "--ckpt-every", str(args.iterations),
         "--log-every", "50", "--workers", "1", "--seed", str(seed), "--deterministic", "--save-dir", str(save)],
        work / "logs" / f"train-{tag}.log")
    out = run(["score.py", "--checkpoint", str(save / "latest.pt"), "--data", str(data), "--split", "val",
               "--out", str(work / "scores" / f"{tag}.npz"), "--workers", "1"], work / "logs" / f"score-{tag}.log")
    found = re.search(r"frame top-1 ([0-9.]+) .* video top-1 ([0-9.]+)", out)
    if not found or "partial" in out or "non-finite" in out:
        raise SystemExit(f"error: score.py's figures of {tag} are not of the whole split: see {work}/logs/score-{tag}.log")
    return float(found.group(1)), float(found.group(2))


def flow_milliseconds(folder: Path, footage: list, methods: list[str], rounds: int) -> dict:
    """Milliseconds per frame pair at short side 256 on real footage, one thread, each method in turn each round."""
    name = max(footage, key=lambda clip: clip[1][0].shape[1] / clip[1][0].shape[0])[0]  # the widest clip
    with av.open(str(folder / name)) as container:
        frames = [f.to_ndarray(format="gray") for _, f in zip(range(4), container.decode(video=0))]
    scale = 256 / min(frames[0].shape)
    gray = [cv2.resize(f, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) for f in frames]
    cv2.setNumThreads(1)
    fns = {m: make_flow_fn(m) for m in methods}
    times = {m: [] for m in methods}
    for _ in range(rounds):
        for m, fn in fns.items():
            start = time.perf_counter()
            for a, b in zip(gray, gray[1:]):
                fn(a, b)
            times[m].append(1000 * (time.perf_counter() - start) / (len(gray) - 1))
    print(f"flow per pair: {name}'s first frames at {gray[0].shape[1]}x{gray[0].shape[0]}, median of {rounds} rounds")
    return {m: statistics.median(v) for m, v in times.items()}


def spread(values: list[float]) -> str:
    mean = statistics.mean(values)
    return f"{mean:.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{mean:.3f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("footage", type=Path, help="a folder of real video clips (2 or more): ../shared/real-videos")
    p.add_argument("--work", type=Path, required=True, help="a new folder for the videos, packed data, runs and logs")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS), metavar="NAME",
                   help=f"configurations to compare (default all: {', '.join(CONFIGS)})")
    p.add_argument("--seeds", type=int, default=2, help="training seeds per configuration")
    p.add_argument("--first-seed", type=int, default=0, help="seeds --first-seed .. --first-seed + --seeds - 1 (more "
                                                             "seeds of a run: the same videos, runs and figures per seed)")
    p.add_argument("--iterations", type=int, default=250, help="training iterations per run")
    p.add_argument("--train-per-class", type=int, default=40, help="training videos per class")
    p.add_argument("--test-per-class", type=int, default=16, help="test videos per class")
    p.add_argument("--rounds", type=int, default=5, help="rounds of the flow-per-pair timing")
    args = p.parse_args()
    if args.work.exists():
        raise SystemExit(f"error: --work {args.work} exists; give a new folder (a run never replaces another's)")
    if args.seeds < 1 or args.iterations < 4:
        raise SystemExit("error: --seeds must be 1 or more, --iterations 4 or more")
    begin = time.perf_counter()
    footage = load_footage(args.footage)
    for d in ("logs", "scores"):
        (args.work / d).mkdir(parents=True)
    truth = make_videos(footage, args.work, {"train": args.train_per_class, "val": args.test_per_class}, seed=0)
    methods = sorted({CONFIGS[c][1] for c in args.configs}, key=[f for flags in CONFIGS.values() for f in flags].index)
    per_pair = flow_milliseconds(args.footage, footage, methods, args.rounds)
    rows = []
    for name in args.configs:
        data, pack_rate = pack(args.work, name, CONFIGS[name])
        epe = stored_flow_error(data, truth)
        scores = [train_and_score(args.work, name, data, seed, args)
                  for seed in range(args.first_seed, args.first_seed + args.seeds)]
        flows = int(CONFIGS[name][CONFIGS[name].index("--flow-len") + 1]) if "--flow-len" in CONFIGS[name] else 1
        rows.append((name, pack_rate, per_pair[CONFIGS[name][1]] * flows, epe, scores))
        print(f"{name}: done ({time.perf_counter() - begin:.0f} s so far)", flush=True)
    lines = [f"{len(CLASSES)} classes, {args.train_per_class} training and {args.test_per_class} test videos each, "
             f"{FRAMES} frames of {WIDTH}x{HEIGHT}; ResNet-18 at 32, {args.iterations} iterations, seeds "
             f"{args.first_seed}..{args.first_seed + args.seeds - 1} (mean ± standard deviation); chance 1/{len(CLASSES)}; {os.cpu_count()} cores, "
             f"{time.perf_counter() - begin:.0f} s in all",
             "| config | pack s / 1000 frames | flow ms / sample (256 short side) | frame top-1 | video top-1 | "
             "EPE slow | EPE fast | EPE none | EPE background |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, pack_rate, ms, epe, scores in rows:
        lines.append(f"| {name} | {pack_rate:.2f} | {ms:.1f} | {spread([f for f, _ in scores])} | "
                     f"{spread([v for _, v in scores])} | {epe['slow']:.2f} | {epe['fast']:.2f} | {epe['none']:.2f} | "
                     f"{epe['background']:.2f} |")
    print("\n" + "\n".join(lines))
    (args.work / "table.md").write_text("\n".join(lines) + "\n")
    (args.work / "results.json").write_text(json.dumps(
        [{"config": n, "pack_s_per_1000_frames": r, "flow_ms_per_sample": ms, "epe": e, "seeds": s}
         for n, r, ms, e, s in rows], indent=1))


if __name__ == "__main__":
    main()
