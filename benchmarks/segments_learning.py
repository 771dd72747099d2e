"""Does TSN's segment sampling learn what a video's frames mostly do not show? K = 1 against K = 3, on real footage.

    python benchmarks/segments_learning.py ../shared/real-videos --out /tmp/segments [--seeds 0 1]

The task, built from the real clips of the folder (bikes.mp4, balle-jbart.mp4,
carphone_pristine.mp4, g1.avi, g2.avi): each video is 24 frames of neutral footage (a street,
a blackboard) with a short stretch of 4 frames that defines its class:
- `car`: 4 frames of the man in his car (carphone_pristine.mp4);
- `schoolyard`: 4 frames of the schoolyard (g1.avi in training, g2.avi in testing);
- `negative`: 4 frames of the neutral footage itself in inverted colours.
Packed at stride 2, a video is 12 samples of which 2 show its class. Training videos take
their neutral footage from the left half of the first 60% of bikes.mp4 and balle-jbart.mp4,
test videos from the right half of the last 40%: scenes never seen in training (the car
and schoolyard stretches come from other frames too). Each run trains resnet18 from
scratch (at --input-size, 32 by default) for the same number of images (--images): K = 1
with batches of 24 frames, K = 3 with batches of 8 videos x 3 frames; both are scored by
score.py on every packed frame of the test videos (video score = mean of its frames'
softmax), and with --frames 3.
Prints one line per run and a table (mean and range over the seeds).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import statistics
import time
from pathlib import Path

import av
import cv2
import numpy as np

import score
import train
from pack.__main__ import get_args_parser as pack_parser
from pack.__main__ import main as pack_main
from pack.synth import write_video

SIZE = (96, 64)  # every frame resized to this (width, height)
FRAMES, STRETCH = 24, 4  # a video's frames, of which the class-defining stretch


def frames_of(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def pieces(frames: list[np.ndarray], part: str) -> list[np.ndarray]:
    """Neutral footage: training's the left half of the first 60% of the frames, testing's the right half of the rest."""
    cut = int(len(frames) * 0.6)
    chosen = frames[:cut] if part == "train" else frames[cut:]
    w = chosen[0].shape[1] // 2
    return [cv2.resize(f[:, :w] if part == "train" else f[:, w:], SIZE, interpolation=cv2.INTER_AREA) for f in chosen]


def make_videos(source: Path, out: Path, per_class: dict[str, int], seed: int = 0) -> None:
    """out/{train,test}/{car,negative,schoolyard}/*.mp4, as the module's docstring says."""
    clips = {name: frames_of(source / name) for name in
             ("bikes.mp4", "balle-jbart.mp4", "carphone_pristine.mp4", "g1.avi", "g2.avi")}
    rng = random.Random(seed)
    for part, count in per_class.items():
        neutral = [pieces(clips["bikes.mp4"], part), pieces(clips["balle-jbart.mp4"], part)]
        car = clips["carphone_pristine.mp4"]
        car = car[:80] if part == "train" else car[80:]
        inserts = {"car": [cv2.resize(f, SIZE, interpolation=cv2.INTER_AREA) for f in car],
                   "schoolyard": [cv2.resize(f, SIZE, interpolation=cv2.INTER_AREA)
                                  for f in clips["g1.avi" if part == "train" else "g2.avi"]]}
        for label in ("car", "negative", "schoolyard"):
            folder = out / part / label
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pool = neutral[i % 2]
                start = rng.randrange(len(pool) - FRAMES)
                video = [f.copy() for f in pool[start:start + FRAMES]]
                at = rng.randrange(FRAMES - STRETCH + 1)
                if label == "negative":
                    stretch = [255 - f for f in video[at:at + STRETCH]]
                else:
                    first = rng.randrange(len(inserts[label]) - STRETCH + 1)
                    stretch = inserts[label][first:first + STRETCH]
                video[at:at + STRETCH] = stretch
                write_video(folder / f"{part}_{label}_{i:03d}.mp4", video, 25, "libx264")


def pack(videos: Path, data: Path) -> None:
    for part in ("train", "test"):
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            status = pack_main(pack_parser().parse_args(
                ["--folders", str(videos / part), "--split", part, "--out", str(data), "--stride", "2",
                 "--short-side", "64", "--flow-len", "1", "--flow", "dis", "--workers", "2", "--shard-videos", "8"]))
        if status:
            raise SystemExit(f"error: packing {videos / part} failed")


def run(data: Path, save: Path, segments: int, seed: int, images: int, batch_images: int, size: int) -> dict:
    """Train at K = segments for `images` images seen, score on the test split (every frame, and --frames 3)."""
    iterations = images // batch_images
    argv = ["--data", str(data), "--modality", "rgb", "--arch", "resnet18", "--input-size", str(size),
            "--batch-size", str(batch_images // segments), "--segments", str(segments), "--lr", "0.01",
            "--max-iterations", str(iterations), "--step-values", str(iterations * 2 // 3),
            "--val-split", "", "--log-every", "25", "--ckpt-every", str(iterations), "--workers", "2",
            "--seed", str(seed), "--deterministic", "--save-dir", str(save), "--overwrite"]
    (save.parent / "scores").mkdir(exist_ok=True)
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        train.main(train.get_args_parser().parse_args(argv))
    seconds = time.perf_counter() - started
    out = {"segments": segments, "seed": seed, "iterations": iterations, "train_seconds": seconds}
    for name, frames in (("all", []), ("frames3", ["--frames", "3"])):
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            figures = score.main(score.get_args_parser().parse_args(
                ["--checkpoint", str(save / "latest.pt"), "--data", str(data), "--split", "test", "--out",
                 str(save.parent / "scores" / f"{save.name}_{name}.npz"), "--workers", "2", "--overwrite", *frames]))
        out[f"video_top1_{name}"], out[f"frame_top1_{name}"] = figures["video_top1"], figures["frame_top1"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("videos", type=Path, help="the folder of the real clips (../shared/real-videos)")
    p.add_argument("--out", type=Path, default=Path("/tmp/segments"), help="work folder (videos, DATA, runs)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds (each K runs each)")
    p.add_argument("--images", type=int, default=2400, help="images seen per run (the same for every K)")
    p.add_argument("--input-size", type=int, default=32, help="the network's input size")
    p.add_argument("--train-videos", type=int, default=40, help="training videos per class")
    p.add_argument("--test-videos", type=int, default=20, help="test videos per class")
    args = p.parse_args()
    missing = [n for n in ("bikes.mp4", "balle-jbart.mp4", "carphone_pristine.mp4", "g1.avi", "g2.avi")
               if not (args.videos / n).is_file()]
    if missing:
        raise SystemExit(f"error: {args.videos} lacks {', '.join(missing)} (the clips of ../shared/real-videos)")
    data = args.out / "data"
    if not (data / "manifest.json").exists():
        make_videos(args.videos, args.out / "videos", {"train": args.train_videos, "test": args.test_videos})
        pack(args.out / "videos", data)
    results = []
    for seed in args.seeds:
        for k in (1, 3):
            results.append(run(data, args.out / f"k{k}-seed{seed}", k, seed, args.images, 24, args.input_size))
            print(json.dumps(results[-1]), flush=True)
    print(f"\nresnet18 at {args.input_size} from scratch, {args.images} images seen a run (batches of 24 images), "
          f"{args.train_videos * 3} training videos, {args.test_videos * 3} test videos of unseen scenes; "
          f"seeds {args.seeds}")
    print("| training | test video top-1, every frame (mean, min-max) | test video top-1, --frames 3 | "
          "test frame top-1, every frame |")
    print("|---|---|---|---|")
    for k in (1, 3):
        mine = [r for r in results if r["segments"] == k]

        def cell(key: str) -> str:
            values = [r[key] for r in mine]
            return f"{statistics.mean(values):.3f} ({min(values):.3f}-{max(values):.3f})"

        print(f"| K = {k} | {cell('video_top1_all')} | {cell('video_top1_frames3')} | {cell('frame_top1_all')} |")


if __name__ == "__main__":
    main()
