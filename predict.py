"""Label raw videos with trained streams: no CSV, no packing, the numbers pack -> score -> fuse would give.

    python predict.py VIDEO [VIDEO ...] --rgb runs/rgb/best.pt --flow runs/flow/best.pt

Each video is decoded here and turned into each stream's inputs exactly as `python -m pack`
made its training data (the parameters are in the checkpoint: stride, short side, JPEG
quality, flow method, bound and length), scored as score.py scores (--tta, --class-topk)
and, with both streams, fused as fuse.py fuses (--weights, --fuse-on). Prints the top
classes of each video, writes the Kinetics result JSON (--out) and, with --timeline, a
plot per video of the top classes' scores along its time axis. A video that cannot be
read, or whose scores are not finite (a diverged checkpoint), is reported and the others
go on; the exit status is then 1.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import fuse
import metrics
import score
from loaders.common import RESIZE_RATIO, Stream, normalise
from loaders.cpu import eval_view
from pack.files import atomic_write_json, check_output_dir, check_output_file
from pack.flow import make_flow_fn
from pack.manifest import load_manifest
from pack.packer import PackParams, Timer, video_samples
from pack.video import VIDEO_EXTENSIONS, VideoError, frame_rate


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("videos", nargs="+", type=Path, help="video files (any container FFmpeg reads) or folders of them")
    p.add_argument("--rgb", type=Path, metavar="CKPT", help="the RGB stream's train.py checkpoint")
    p.add_argument("--flow", type=Path, metavar="CKPT", help="the flow stream's train.py checkpoint")
    p.add_argument("--data", type=Path, help="the packed DATA a checkpoint was trained on: for checkpoints that do "
                                             "not record how their inputs were made (older than predict.py)")
    p.add_argument("--weights", nargs=2, type=float, metavar=("RGB", "FLOW"), help="fusion weights (default: 1 1)")
    p.add_argument("--fuse-on", default="logits", choices=["logits", "scores"], help="as fuse.py: average logits or softmax scores")
    p.add_argument("--tta", default="none", choices=list(score.TTA), help="test-time views, as score.py")
    p.add_argument("--class-topk", type=int, default=0, help="as score.py: video score per class = mean of its K best frames")
    p.add_argument("--top", type=int, default=5, help="classes shown per video")
    p.add_argument("--out", type=Path, metavar="FILE.json", help="write the predictions as Kinetics result JSON (and the report of failures)")
    p.add_argument("--timeline", type=Path, metavar="DIR", help="write DIR/<video>.png: the top classes' scores over time")
    p.add_argument("--batch-size", type=int, default=32, help="samples scored at once (memory is bounded by it)")
    p.add_argument("--device", help="cuda or cpu (default: cuda if present)")
    p.add_argument("--allow-non-finite", action="store_true",
                   help="predict a video whose scores are not finite (NaN, inf) instead of reporting it: they count as last")
    p.add_argument("--allow-mirrored", action="store_true",
                   help="mirrored test-time views (--tta flip, 10crop) for a stream trained with --no-flip")
    return p


# ---------------------------------------------------------------- the streams


def load_stream(name: str, path: Path, data: Path | None, device: torch.device, args) -> dict:
    """A checkpoint's model and what its inputs must be: its Stream (modality, flow length, classes), crop, pack parameters."""
    model, ckpt = score.load_model(path, device, modality=name.lower())
    score.check_mirrored_views(ckpt, args.tta, args.allow_mirrored, path)
    params = ckpt.get("pack_params")
    if params is None:
        if data is None:
            raise SystemExit(f"error: {path} does not record how its inputs were packed (trained before predict.py "
                             f"existed); give --data DATA, the packed folder it was trained on")
        params = load_manifest(data)["splits"][ckpt["args"]["train_split"]]["params"]
    a = ckpt["args"]
    stream = Stream(tars=[], indexes=[], modality=a["modality"], flow_len=a["flow_len"] or 1, samples=0,
                    classes=ckpt["classes"])
    return {"name": name, "path": str(path), "model": model, "stream": stream, "crop": a["input_size"],
            "params": PackParams(**params)}


def stream_inputs(stream: dict, samples: list, pos: tuple[float, float]) -> torch.Tensor:
    """A batch of samples as the eval loader gives them: each JPEG's view at pos, normalised (NCHW float)."""
    crop, s = stream["crop"], stream["stream"]
    images = np.empty((len(samples), len(s.exts), crop, crop, 3), np.uint8)
    for row, (_, rgb, flows) in zip(images, samples):
        for image, jpeg in zip(row, [rgb] if s.modality == "rgb" else flows[:s.flow_len]):
            image[:] = eval_view(jpeg, crop, crop * RESIZE_RATIO, pos)
    return normalise(torch.from_numpy(images), s, torch.float32, channels_last=False)


def score_batch(stream: dict, samples: list, tta: str, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Frame logits and softmax scores of a batch, averaged over the test-time views (score.py's way)."""
    logits = probs = 0
    for pos, flips in score.crop_positions(tta).items():
        images = stream_inputs(stream, samples, pos).to(device)
        lg, pr = score.view_sums(stream["model"], images, stream["stream"], flips, score.inference_dtype(device))
        logits, probs = logits + lg, probs + pr
    views = len(score.TTA[tta])
    return (logits / views).cpu().numpy(), (probs / views).cpu().numpy()


def in_batches(samples: Iterator[tuple], size: int, ended: dict) -> Iterator[list]:
    """Lists of `size` samples (the last may be shorter); then ended["frames"] holds the frames decoded."""
    batch = []
    while True:
        try:
            batch.append(next(samples))
        except StopIteration as end:
            ended["frames"] = end.value
            if batch:
                yield batch
            return
        if len(batch) == size:
            yield batch
            batch = []


def score_video(path: Path, streams: list[dict], args, device: torch.device) -> dict:
    """Frame times, logits and scores of each stream over the whole video, one batch of samples at a time.

    Streams packed with the same parameters share one decoding pass; others get their own.
    Held at any time: a few frames, one batch of samples, and C numbers per sample per stream.
    """
    out, ended = {}, {}
    by_params: dict[PackParams, list[dict]] = {}
    for s in streams:
        by_params.setdefault(s["params"], []).append(s)
    for params, group in by_params.items():
        if all(s["stream"].modality == "rgb" for s in group):  # no flow needed: none computed
            params = PackParams(**{**params.__dict__, "flow_len": 0})
        parts = {s["name"]: ([], [], []) for s in group}  # frame indices, logits, scores
        bar = tqdm(desc=f"{path.name} ({', '.join(parts)})", unit="sample", leave=False)
        for batch in in_batches(video_samples(path, params, make_flow_fn(params.flow), Timer()), args.batch_size, ended):
            for s in group:
                logits, probs = score_batch(s, batch, args.tta, device)
                for part, values in zip(parts[s["name"]], ([t for t, _, _ in batch], logits, probs)):
                    part.append(values)
            bar.update(len(batch))
        bar.close()
        for name, (times, logits, probs) in parts.items():
            out[name] = {"frames": np.concatenate(times), "logits": np.concatenate(logits),
                         "scores": np.concatenate(probs), "params": params}
    return {"streams": out, "frames": ended["frames"]}


def video_values(frame_values: np.ndarray, class_topk: int) -> np.ndarray:
    """One video's score per class from its frames' (score.py's and fuse.py's aggregation)."""
    return metrics.video_scores(frame_values, np.zeros(len(frame_values), dtype=np.int64), class_topk)[1][0]


def fused(streams: dict, weights: dict, fuse_on: str, class_topk: int) -> tuple[np.ndarray, tuple]:
    """fuse.py's fusion of the streams: the fused video values and (frames, fused frame values), softmaxed on logits.

    A frame that only one stream has (streams packed with other strides) is that stream's, as in fuse.py.
    """
    w = [weights[name] for name in streams]
    videos = fuse.fuse([{0: video_values(s[fuse_on], class_topk)} for s in streams.values()], w)[0]
    per_frame = fuse.fuse([dict(zip(s["frames"].tolist(), s[fuse_on])) for s in streams.values()], w)
    frames = np.array(sorted(per_frame))
    values = np.stack([per_frame[f] for f in frames])
    if fuse_on == "logits":
        videos, values = softmax(videos), softmax(values)
    return videos, (frames, values)


def predict_video(path: Path, streams: list[dict], weights: dict, args, device: torch.device) -> dict:
    """A video's frame and video scores per stream, fused, its classes best first, and a note if it is very short."""
    if not path.is_file():
        raise VideoError("missing: no such file")
    scored = score_video(path, streams, args, device)
    for name, s in scored["streams"].items():
        bad = int((~metrics.finite_rows(s["logits"])).sum())
        if bad and not args.allow_non_finite:
            raise VideoError(f"not finite: {bad} of {len(s['logits'])} {name} samples scored NaN or inf (the model "
                             f"overflows on them); --allow-non-finite predicts it anyway")
    one = {"streams": scored["streams"], "frames": scored["frames"], "note": None,
           "videos": {n: video_values(s["scores"], args.class_topk) for n, s in scored["streams"].items()}}
    if len(streams) == 2:
        one["fused"], one["fused_frames"] = fused(scored["streams"], weights, args.fuse_on, args.class_topk)
    else:
        one["fused"], one["fused_frames"] = one["videos"][streams[0]["name"]], None
    one["top"] = np.argsort(-one["fused"], kind="stable")
    stack = max(s["params"].flow_len for s in scored["streams"].values())
    if stack and scored["frames"] <= stack:
        one["note"] = (f"{scored['frames']} frames: shorter than one flow stack ({stack + 1} frames); "
                       f"its last flow image is repeated, as pack does")
    return one


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# ---------------------------------------------------------------- output


def table(result: dict, classes: list[str], top: int) -> str:
    scores = {"fused": result["fused"]} if len(result["videos"]) > 1 else {}
    scores.update(result["videos"])
    lines = [f"| class | {' | '.join(scores)} |", "|---" * (len(scores) + 1) + "|"]
    for c in result["top"][:top]:
        lines.append(f"| {classes[c]} | {' | '.join(f'{v[c]:.3f}' for v in scores.values())} |")
    return "\n".join(lines)


def plot_timeline(path: Path, video: str, result: dict, classes: list[str], top: int, fps: float | None) -> list[str]:
    """The top classes' frame scores along the video, one panel per stream and one fused; returns the classes drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {name: (s["frames"], s["scores"]) for name, s in result["streams"].items()}
    if len(panels) > 1:
        panels["fused"] = result["fused_frames"]
    drawn = [classes[c] for c in result["top"][:top]]
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 2.2 * len(panels) + 0.8), sharex=True, squeeze=False)
    for ax, (name, (frames, values)) in zip(axes[:, 0], panels.items()):
        times = frames / (fps or 1.0)
        for c, label in zip(result["top"][:top], drawn):
            ax.plot(times, values[:, c], marker="." if len(times) < 40 else None, label=label)
        ax.set(ylabel=f"{name} score", ylim=(0, 1))
        ax.grid(alpha=0.3)
    axes[0, 0].set_title(video)
    axes[0, 0].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    axes[-1, 0].set_xlabel("time (s)" if fps else "frame")
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Description": json.dumps({"video": video, "classes": drawn,
                                                                     "panels": list(panels)})})
    plt.close(fig)
    return drawn


def result_key(path: Path, taken: set) -> str:
    """The Kinetics result key: the YouTube id of a crawler-named file, else the file's stem (its path if taken)."""
    match = re.fullmatch(r"(.+)_\d{6}_\d{6}", path.stem)
    key = match.group(1) if match else path.stem
    return str(path) if key in taken else key


def find_videos(inputs: list[Path]) -> list[Path]:
    """The files given, and the videos in the folders given (a missing path stays: it is reported)."""
    found = []
    for path in inputs:
        if path.is_dir():
            found += sorted(f for f in path.rglob("*") if f.suffix.lower() in VIDEO_EXTENSIONS and f.is_file())
        else:
            found.append(path)
    return found


# ---------------------------------------------------------------- main


def main(args: argparse.Namespace) -> dict:
    if not (args.rgb or args.flow):
        raise SystemExit("error: give --rgb CHECKPOINT, --flow CHECKPOINT, or both")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.out:
        check_output_file(args.out, "--out")
    if args.timeline:
        check_output_dir(args.timeline, "--timeline")
    videos = find_videos(args.videos)
    if not videos:
        raise SystemExit(f"error: no videos in {', '.join(map(str, args.videos))} (looked for "
                         f"{', '.join(sorted(VIDEO_EXTENSIONS))})")
    streams = [load_stream(name, path, args.data, device, args) for name, path in (("RGB", args.rgb), ("Flow", args.flow))
               if path]
    classes = streams[0]["stream"].classes
    if len(streams) == 2 and streams[1]["stream"].classes != classes:
        raise SystemExit(f"error: {args.rgb} and {args.flow} were trained on other class lists ({len(classes)} vs "
                         f"{len(streams[1]['stream'].classes)} classes); fuse streams trained on the same classes")
    weights = dict(zip(["RGB", "Flow"], args.weights or [1.0, 1.0]))
    results, failed, notes, keys = {}, {}, {}, set()
    start = time.perf_counter()
    for path in videos:  # each with its own progress bar (score_video)
        try:
            one = predict_video(path, streams, weights, args, device)
        except VideoError as e:
            failed[str(path)] = str(e)
            print(f"{path}: NOT predicted: {e}")
            continue
        if one["note"]:
            notes[str(path)] = one["note"]
        key = result_key(path, keys)
        keys.add(key)
        samples = ", ".join(f"{len(s['frames'])} {n} samples" for n, s in one["streams"].items())
        print(f"\n{path} ({one['frames']} frames; {samples}){': ' + one['note'] if one['note'] else ''}")
        print(table(one, classes, args.top))
        if args.timeline:
            png = args.timeline / f"{key}.png"
            one["timeline"] = {"png": str(png), "classes": plot_timeline(png, path.name, one, classes, args.top,
                                                                         frame_rate(path))}
        results[key] = one

    wall = time.perf_counter() - start
    frames = sum(r["frames"] for r in results.values())
    print(f"\npredicted {len(results)} video(s), {frames} frames, in {wall:.1f}s: {len(results) / wall:.2f} videos/s, "
          f"{frames / wall:.0f} frames/s")
    report = {"streams": {s["name"]: s["path"] for s in streams}, "weights": weights if len(streams) == 2 else None,
              "fuse_on": args.fuse_on if len(streams) == 2 else None, "tta": args.tta, "class_topk": args.class_topk,
              "failed": failed, "notes": notes}
    if args.out:
        doc = score.results_json(list(results), [r["fused"] for r in results.values()], classes, {})
        doc["report"] = report
        atomic_write_json(args.out, doc)
        print(f"\nwrote {args.out}")
    if failed:
        print(f"\n{len(failed)} of {len(videos)} video(s) NOT predicted:")
        for path, reason in failed.items():
            print(f"  {path}: {reason}")
    return {"results": results, "report": report, "classes": classes}


if __name__ == "__main__":
    outcome = main(get_args_parser().parse_args())
    sys.exit(1 if outcome["report"]["failed"] else 0)
