"""Label raw videos with trained streams: no CSV, no packing, the numbers pack -> score -> fuse would give.

    python predict.py VIDEO [VIDEO ...] --rgb runs/rgb/best.pt --flow runs/flow/best.pt

Each video is decoded here and turned into each stream's inputs exactly as `python -m pack`
made its training data (the parameters are in the checkpoint: stride, short side, JPEG
quality, flow method, bound and length), scored as score.py scores (--tta, --class-topk)
and, with both streams, fused as fuse.py fuses (--weights, --fuse-on). Prints the top
classes of each video, writes the Kinetics result JSON (--out) and, with --timeline, a
plot per video of the top classes' scores along its time axis. A video that cannot be
read, or whose scores are not finite (a diverged checkpoint), is reported and the others
go on; the exit status is then 1. The JSON is written with what was predicted even when the
run stops part-way. Existing outputs are replaced only with --overwrite, inputs never.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import signal
import sys
import time
from collections import Counter
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
from outputs import check_outputs, file_identity, replaced_note
from pack.annotations import class_difference
from pack.files import atomic_write_json
from pack.flow import make_flow_fn
from pack.manifest import complete_params, load_manifest
from pack.packer import PackParams, Timer, video_samples
from pack.video import VIDEO_EXTENSIONS, VideoError, frame_rate


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("videos", nargs="+", type=Path, help="video files (any container FFmpeg reads) or folders of them")
    p.add_argument("--rgb", type=Path, metavar="CKPT", help="the RGB stream's train.py checkpoint")
    p.add_argument("--flow", type=Path, metavar="CKPT", help="the flow stream's train.py checkpoint")
    p.add_argument("--data", type=Path, help="the packed DATA a checkpoint was trained on: for checkpoints that do "
                                             "not record how their inputs were made (older than predict.py)")
    p.add_argument("--weights", nargs=2, type=fuse.weight_arg, metavar=("RGB", "FLOW"), help="fusion weights (default: 1 1)")
    p.add_argument("--fuse-on", default="logits", choices=["logits", "scores"], help="as fuse.py: average logits or softmax scores")
    p.add_argument("--tta", default="none", choices=list(score.TTA), help="test-time views, as score.py")
    p.add_argument("--class-topk", type=metrics.class_topk_arg, default=0, help="as score.py: video score per class = mean of its K best frames")
    p.add_argument("--top", type=score.positive_int, default=5, help="classes shown per video")
    p.add_argument("--out", type=Path, metavar="FILE.json", help="write the predictions as Kinetics result JSON (and the report of failures)")
    p.add_argument("--timeline", type=Path, metavar="DIR", help="write DIR/<video>.png: the top classes' scores over time "
                                                               "(<video>-<hash>.png where two videos share a name)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out and timeline PNGs")
    p.add_argument("--batch-size", type=score.positive_int, default=32, help="samples scored at once (memory is bounded by it)")
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
        try:
            params = load_manifest(data)["splits"][ckpt["args"]["train_split"]]["params"]
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: --data: {e}") from None
    a = ckpt["args"]
    stream = Stream(tars=[], indexes=[], modality=a["modality"], flow_len=a["flow_len"] or 1, samples=0,
                    classes=ckpt["classes"])
    return {"name": name, "path": str(path), "model": model, "stream": stream, "crop": a["input_size"],
            "params": PackParams(**complete_params(params)), "provenance": {"checkpoint": str(path), "sha256": ckpt["file_sha256"],
                                                           "iteration": ckpt["iteration"], "trained_on": ckpt.get("data")}}


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


def in_batches(samples: Iterator[tuple], size: int, ended: dict, rgb_only: bool) -> Iterator[list]:
    """Lists of `size` samples (the last may be shorter); then ended["frames"] holds the frames decoded.

    pack refuses a 1-frame video for its flow, after yielding its one sample (the only error that comes after a
    sample): RGB needs that one frame only, so an RGB-only pass keeps it.
    """
    batch, count = [], 0
    while True:
        try:
            batch.append(next(samples))
            count += 1
        except (StopIteration, VideoError) as end:
            if isinstance(end, VideoError) and not (rgb_only and count == 1):
                raise
            ended["frames"] = end.value if isinstance(end, StopIteration) else 1
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
        rgb_only = all(s["stream"].modality == "rgb" for s in group)
        if rgb_only:  # no flow needed: none computed
            params = PackParams(**{**params.__dict__, "flow_len": 0})
        parts = {s["name"]: ([], [], []) for s in group}  # frame indices, logits, scores
        samples = video_samples(path, params, make_flow_fn(params.flow), Timer(), ended)
        with tqdm(desc=f"{path.name} ({', '.join(parts)})", unit="sample", leave=False) as bar:
            for batch in in_batches(samples, args.batch_size, ended, rgb_only):
                for s in group:
                    logits, probs = score_batch(s, batch, args.tta, device)
                    for part, values in zip(parts[s["name"]], ([t for t, _, _ in batch], logits, probs)):
                        part.append(values)
                bar.update(len(batch))
        for name, (times, logits, probs) in parts.items():
            out[name] = {"frames": np.concatenate(times), "logits": np.concatenate(logits),
                         "scores": np.concatenate(probs), "params": params}
    return {"streams": out, "frames": ended["frames"], "notes": display_notes(ended)}


def display_notes(info: dict) -> list[str]:
    """What a video's decoding says beside its figures: a picture turned as a player shows it, which stream was read."""
    turned = [f"rotated {info['rotation']} degrees"] if info.get("rotation") else []
    turned += ["mirrored"] if info.get("mirrored") else []
    notes = [f"{' and '.join(turned)} as its display matrix says (as a player shows it)"] if turned else []
    return notes + ([info["video_stream"]] if "video_stream" in info else [])


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
    try:
        scored = score_video(path, streams, args, device)
    except VideoError as e:
        if str(e).startswith("too short") and len(streams) == 2:
            raise VideoError(f"{e}: the RGB stream alone (--rgb without --flow) can predict it") from None
        raise
    for name, s in scored["streams"].items():
        bad = int((~metrics.finite_rows(s["logits"])).sum())
        if bad and not args.allow_non_finite:
            raise VideoError(f"not finite: {bad} of {len(s['logits'])} {name} samples scored NaN or inf (the model "
                             f"overflows on them); --allow-non-finite predicts it anyway")
    notes = scored["notes"]
    one = {"streams": scored["streams"], "frames": scored["frames"],
           "videos": {n: video_values(s["scores"], args.class_topk) for n, s in scored["streams"].items()}}
    if len(streams) == 2:
        one["fused"], one["fused_frames"] = fused(scored["streams"], weights, args.fuse_on, args.class_topk)
    else:
        one["fused"], one["fused_frames"] = one["videos"][streams[0]["name"]], None
    one["top"] = np.argsort(-one["fused"], kind="stable")
    stack = max(s["params"].flow_len for s in scored["streams"].values())
    if stack and scored["frames"] <= stack:
        notes.append(f"{scored['frames']} frames: shorter than one flow stack ({stack + 1} frames); "
                     f"its last flow image is repeated, as pack does")
    one["note"] = "; ".join(notes) or None
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


def result_key(path: Path, taken: dict) -> str:
    """The Kinetics result key: the YouTube id of a crawler-named file, else the file's stem (its path if taken)."""
    match = re.fullmatch(r"(.+)_\d{6}_\d{6}", path.stem)
    key = match.group(1) if match else path.stem
    return str(path) if key in taken else key


def find_videos(inputs: list[Path]) -> list[Path]:
    """The files given, and the videos in the folders given (a missing path stays: it is reported); each file once."""
    found, seen = [], {}
    for path in inputs:
        listed = sorted(f for f in path.rglob("*") if f.suffix.lower() in VIDEO_EXTENSIONS and f.is_file()) \
            if path.is_dir() else [path]
        for f in listed:
            first = seen.setdefault(file_identity(f), f)
            if first is f:
                found.append(f)
            else:
                print(f"note: {f} given twice{f' (as {first})' if str(first) != str(f) else ''}: predicted once")
    return found


def timeline_names(videos: list[Path]) -> dict[Path, str]:
    """Each video's PNG name: its stem, or where videos share one (clip.avi in two folders, a.avi and a.mp4; letter
    case aside) the stem and a short hash of its absolute path. Never a path: the PNGs all lie in --timeline."""
    stems = Counter(v.stem.lower() for v in videos)
    return {v: f"{v.stem}.png" if stems[v.stem.lower()] == 1 else
            f"{v.stem}-{hashlib.sha256(str(v.absolute()).encode()).hexdigest()[:8]}.png" for v in videos}


# ---------------------------------------------------------------- main


def check_run_outputs(args, videos: list[Path]) -> tuple[dict[Path, Path], list[Path]]:
    """The timeline PNG of each video, and the outputs that will replace a file; refused before any work: an output
    that exists (unless --overwrite), that is an input (a video, a checkpoint), or that two outputs share."""
    pngs = {v: args.timeline / name for v, name in timeline_names(videos).items()} if args.timeline else {}
    outputs = [("--out", args.out)] if args.out else []
    outputs += [("--timeline", png) for png in pngs.values()]
    inputs = [*videos, *(c for c in (args.rgb, args.flow) if c)]
    return pngs, check_outputs(outputs, inputs, args.overwrite)


def load_streams(args, device: torch.device) -> list[dict]:
    """The streams given, checked to be of one class list."""
    streams = [load_stream(name, path, args.data, device, args) for name, path in (("RGB", args.rgb), ("Flow", args.flow))
               if path]
    classes = streams[0]["stream"].classes
    if len(streams) == 2 and streams[1]["stream"].classes != classes:
        raise SystemExit(f"error: {args.rgb} and {args.flow} were trained on other class lists ({len(classes)} vs "
                         f"{len(streams[1]['stream'].classes)} classes: "
                         f"{class_difference(classes, streams[1]['stream'].classes, '--rgb', '--flow')}); "
                         f"fuse streams trained on the same classes")
    return streams


def predict_one(path: Path, streams: list[dict], weights: dict, args, device, done: dict, png: Path | None) -> None:
    """Predict one video into done (results, failed, notes, timelines), printing its table or why it failed."""
    classes = streams[0]["stream"].classes
    try:
        one = predict_video(path, streams, weights, args, device)
    except VideoError as e:
        done["failed"][str(path)] = str(e)
        print(f"{path}: NOT predicted: {e}")
        return
    if one["note"]:
        done["notes"][str(path)] = one["note"]
    key = result_key(path, done["results"])
    done["results"][key] = one  # before anything is printed: a stop (Ctrl-C) once its table shows keeps it
    samples = ", ".join(f"{len(s['frames'])} {n} samples" for n, s in one["streams"].items())
    print(f"\n{path} ({one['frames']} frames; {samples}){': ' + one['note'] if one['note'] else ''}")
    print(table(one, classes, args.top))
    if png is not None:
        try:
            drawn = plot_timeline(png, str(path), one, classes, args.top, frame_rate(path))
        except OSError as e:
            raise SystemExit(f"error: cannot write the timeline {png} ({e.strerror or e})") from None
        one["timeline"] = {"png": str(png), "classes": drawn}
        done["timelines"][str(path)] = str(png)


def write_json(args, streams: list[dict], weights: dict, done: dict, stopped: str | None) -> dict:
    """The run's report, and --out: the Kinetics JSON of what was predicted, with the report (and why it stopped)."""
    report = {"streams": {s["name"]: s["path"] for s in streams},
              "checkpoints": {s["name"]: s["provenance"] for s in streams},
              "weights": weights if len(streams) == 2 else None,
              "fuse_on": args.fuse_on if len(streams) == 2 else None, "tta": args.tta, "class_topk": args.class_topk,
              "failed": done["failed"], "notes": done["notes"], "timelines": done["timelines"],
              **({"stopped": stopped} if stopped else {})}
    if args.out:
        results = done["results"]
        doc = score.results_json(list(results), [r["fused"] for r in results.values()], streams[0]["stream"].classes, {})
        doc["report"] = report
        atomic_write_json(args.out, doc)
    return report


def main(args: argparse.Namespace) -> dict:
    if not (args.rgb or args.flow):
        raise SystemExit("error: give --rgb CHECKPOINT, --flow CHECKPOINT, or both")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    videos = find_videos(args.videos)
    if not videos:
        raise SystemExit(f"error: no videos in {', '.join(map(str, args.videos))} (looked for "
                         f"{', '.join(sorted(VIDEO_EXTENSIONS))})")
    pngs, replaced = check_run_outputs(args, videos)
    streams = load_streams(args, device)
    weights = dict(zip(["RGB", "Flow"], args.weights or [1.0, 1.0]))
    done, stopped = {"results": {}, "failed": {}, "notes": {}, "timelines": {}}, None
    start = time.perf_counter()
    try:
        for path in videos:  # each with its own progress bar (score_video)
            predict_one(path, streams, weights, args, device, done, pngs.get(path))
    except BaseException as e:  # the JSON still gets what was predicted, and says where it stopped
        stopped = (f"stopped after {len(done['results']) + len(done['failed'])} of {len(videos)} video(s): "
                   f"{type(e).__name__}: {e}")
        raise
    finally:
        report = write_json(args, streams, weights, done, stopped)
        if args.out:
            print(f"\nwrote {args.out}{replaced_note(replaced)}" + (f" (what was predicted; {stopped})" if stopped else ""))
    results, failed = done["results"], done["failed"]
    wall = time.perf_counter() - start
    frames = sum(r["frames"] for r in results.values())
    print(f"\npredicted {len(results)} video(s), {frames} frames, in {wall:.1f}s: {len(results) / wall:.2f} videos/s, "
          f"{frames / wall:.0f} frames/s")
    if failed:
        print(f"\n{len(failed)} of {len(videos)} video(s) NOT predicted:")
        for path, reason in failed.items():
            print(f"  {path}: {reason}")
    return {"results": results, "report": report, "classes": streams[0]["stream"].classes}


def stop_on_sigterm(signum, frame) -> None:
    """SIGTERM (a scheduler's kill) ends the run as Ctrl-C does: the JSON still gets what was predicted."""
    raise SystemExit(f"error: stopped by signal {signum} (SIGTERM)")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    outcome = main(get_args_parser().parse_args())
    sys.exit(1 if outcome["report"]["failed"] else 0)
