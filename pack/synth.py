"""A small synthetic Kinetics-style dataset where each stream alone is half-blind.

    python -m pack.synth --out demo/raw

Class = colour x motion direction of a textured disc sliding over a textured background.
One RGB frame shows the colour but not the direction; flow shows the direction but not
the colour; only the two streams together can name the class. Written as real videos
(H.264 mp4, or MPEG-4) with Kinetics-format train.csv and val.csv.
"""
from __future__ import annotations

import argparse
import string
from pathlib import Path

import av
import cv2
import numpy as np

from .annotations import crawler_stem

COLOURS = {"red": (1.0, 0.3, 0.3), "green": (0.2, 0.7, 0.2), "blue": (0.35, 0.45, 1.0), "yellow": (0.6, 0.6, 0.1)}
LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # BT.601, as video and OpenCV's grey conversion
# Vertical only: a horizontal flip, the standard augmentation, must not change the label.
DIRECTIONS = {"up": (0, -1), "down": (0, 1)}
ID_CHARS = string.ascii_letters + string.digits + "-_"


def texture(rng: np.random.Generator, height: int, width: int, blur: float) -> np.ndarray:
    """Smooth random texture in [0, 1]: something for optical flow to track."""
    noise = cv2.GaussianBlur(rng.random((height, width), dtype=np.float32), (0, 0), blur)
    return (noise - noise.min()) / (np.ptp(noise) + 1e-6)


def render(rng: np.random.Generator, colour, direction, frames: int, width: int, height: int, speed: float):
    """Yield RGB uint8 frames of a tinted textured disc moving (wrapping round) over a background."""
    background = 0.25 + 0.5 * texture(rng, height, width, 3.0)
    radius = min(width, height) // 4
    yy, xx = np.mgrid[:height, :width]
    disc = ((yy - height // 2) ** 2 + (xx - width // 2) ** 2 <= radius**2).astype(np.float32)
    sprite = 0.55 + 0.45 * texture(rng, height, width, 1.5)
    x0, y0 = rng.uniform(0, width), rng.uniform(0, height)  # a single frame says nothing of direction
    # Every colour at the same luma: flow, computed on grey frames, cannot tell them apart.
    tint = np.array(colour, np.float32) * (0.5 / float(np.dot(colour, LUMA)))
    for t in range(frames):
        dx, dy = round(x0 + direction[0] * speed * t), round(y0 + direction[1] * speed * t)
        mask = np.roll(disc, (dy, dx), axis=(0, 1))[..., None]
        obj = np.roll(sprite, (dy, dx), axis=(0, 1))[..., None] * tint
        image = mask * obj + (1 - mask) * background[..., None]
        yield (np.clip(image, 0, 1) * 255).astype(np.uint8)


def write_video(path: Path, frames: list[np.ndarray], fps: int, codec: str, display: tuple[int, bool] = (0, False)) -> None:
    """Frames (RGB uint8) as a video; display: (degrees counter-clockwise, mirrored) a player turns them by, as a
    phone records its clips (the stream's display matrix)."""
    with av.open(str(path), "w") as container:
        # cpu-independent: without it x264's CPU-dependent code made a few files in 40 differ from run to run (the same
        # frames in); with it the same seed gives the same bytes, hence the same demo and test figures.
        x264 = {"crf": "16", "threads": "1", "x264-params": "cpu-independent=1"}
        stream = container.add_stream(codec, rate=fps, options=x264 if codec == "libx264" else {})
        if codec != "libx264":
            stream.bit_rate = 2_000_000
        stream.pix_fmt = "yuv420p"
        stream.height, stream.width = frames[0].shape[:2]
        if display != (0, False):
            stream.set_display_rotation(display[0], hflip=display[1])
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def make_dataset(out: Path, colours: int = 3, directions: int = 2, train_per_class: int = 16,
                 val_per_class: int = 4, frames: int = 32, width: int = 128, height: int = 96,
                 speed: float = 3.0, fps: int = 25, codec: str = "libx264", seed: int = 0) -> list[str]:
    """Write out/videos/{split}/{label}/*.mp4 and out/{split}.csv; return the class labels."""
    rng = np.random.default_rng(seed)
    classes = [(c, d) for c in list(COLOURS)[:colours] for d in list(DIRECTIONS)[:directions]]
    suffix = ".mp4" if codec == "libx264" else ".avi"
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        rows = ["label,youtube_id,time_start,time_end,split"]
        for colour, direction in classes:
            label = f"{colour} moving {direction}"
            folder = out / "videos" / split / label.replace(" ", "_")
            folder.mkdir(parents=True, exist_ok=True)
            for _ in range(per_class):
                youtube_id = "".join(rng.choice(list(ID_CHARS), 11))
                start = int(rng.integers(0, 300))
                video = list(render(rng, COLOURS[colour], DIRECTIONS[direction], frames, width, height, speed))
                write_video(folder / f"{crawler_stem(youtube_id, start, start + 10)}{suffix}", video, fps, codec)
                rows.append(f'"{label}",{youtube_id},{start},{start + 10},{split}')
        (out / f"{split}.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return [f"{c} moving {d}" for c, d in classes]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m pack.synth", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="folder for videos/ and train.csv, val.csv")
    p.add_argument("--colours", type=int, default=3, choices=range(1, len(COLOURS) + 1), help="number of colours")
    p.add_argument("--directions", type=int, default=2, choices=range(1, len(DIRECTIONS) + 1), help="number of motion directions")
    p.add_argument("--train-per-class", type=int, default=16, help="training videos per class")
    p.add_argument("--val-per-class", type=int, default=4, help="validation videos per class")
    p.add_argument("--frames", type=int, default=32, help="frames per video")
    p.add_argument("--size", default="128x96", help="WIDTHxHEIGHT of the videos")
    p.add_argument("--speed", type=float, default=3.0, help="pixels per frame the object moves")
    p.add_argument("--codec", default="libx264", choices=["libx264", "mpeg4"], help="H.264 in .mp4 or MPEG-4 Part 2 in .avi")
    p.add_argument("--seed", type=int, default=0, help="random seed: same seed, same dataset")
    args = p.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))
    classes = make_dataset(args.out, args.colours, args.directions, args.train_per_class, args.val_per_class,
                           args.frames, width, height, args.speed, codec=args.codec, seed=args.seed)
    print(f"wrote {len(classes)} classes ({', '.join(classes)}) to {args.out}")


if __name__ == "__main__":
    main()
