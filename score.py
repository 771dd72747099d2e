"""Score a trained stream over every sample of a split: frame scores, video scores, result JSON.

    python score.py --checkpoint runs/rgb/best.pt --data DATA --split val --out scores/rgb_val.npz

Writes the frame-level scores (format in docs/FORMAT.md), prints frame and video accuracy
when the split has labels, and writes video predictions as ActivityNet/Kinetics result JSON.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import loaders
import metrics
import nets
from loaders.common import flip_batch, open_stream
from pack.manifest import load_manifest

# Test-time views: (crop position, mirrored). Positions are relative (0..1, 0..1).
CORNERS = [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0), (0.5, 0.5)]
TTA = {"none": [((0.5, 0.5), False)],
       "flip": [((0.5, 0.5), False), ((0.5, 0.5), True)],
       "3crop": [((0.0, 0.0), False), ((0.5, 0.5), False), ((1.0, 1.0), False)],
       "10crop": [(pos, flip) for pos in CORNERS for flip in (False, True)]}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, type=Path, help="a train.py checkpoint (best.pt, latest.pt, ...)")
    p.add_argument("--data", required=True, type=Path, help="packed DATA folder")
    p.add_argument("--split", default="val", help="split to score")
    p.add_argument("--out", required=True, type=Path, help="frame scores file to write (.npz)")
    p.add_argument("--results-json", type=Path, help="video predictions in Kinetics result JSON (default: OUT with .json)")
    p.add_argument("--tta", default="none", choices=list(TTA), help="test-time views averaged per frame")
    p.add_argument("--class-topk", type=int, default=0, help="video score per class = mean of its K best frame scores (0: mean of all frames)")
    p.add_argument("--batch-size", type=int, default=64, help="samples per batch")
    p.add_argument("--backend", default="auto", choices=["auto", "dali", "cpu"], help="loader backend")
    p.add_argument("--workers", type=int, default=4, help="loader workers")
    p.add_argument("--device", help="cuda or cpu (default: cuda if present)")
    return p


def load_model(path: Path, device: torch.device) -> tuple[torch.nn.Module, dict]:
    if not path.is_file():
        raise SystemExit(f"error: checkpoint {path} not found")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    a = ckpt["args"]
    model = nets.build(a["arch"], len(ckpt["classes"]), a["modality"], a["flow_len"] or 1)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt


def inference_dtype(device: torch.device) -> torch.dtype | None:
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None


def crop_positions(tta: str) -> dict[tuple, list[bool]]:
    """The test-time views by crop position: each position is decoded once, its mirror flipped on the device."""
    positions: dict[tuple, list[bool]] = {}
    for pos, mirrored in TTA[tta]:
        positions.setdefault(pos, []).append(mirrored)
    return positions


@torch.no_grad()
def view_sums(model, images: torch.Tensor, stream, flips: list[bool], dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and softmax scores of a batch of one crop position, summed over its views (as is, mirrored)."""
    logit_sum = prob_sum = 0
    for mirrored in flips:
        view = flip_batch(images, stream) if mirrored else images
        with torch.autocast(images.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model(view).float()
        logit_sum, prob_sum = logit_sum + logits, prob_sum + logits.softmax(1)
    return logit_sum, prob_sum


@torch.no_grad()
def frame_scores(model, ckpt: dict, args, device: torch.device) -> dict:
    """Softmax and logits per sample key, averaged over the test-time views."""
    a = ckpt["args"]
    stream = open_stream(args.data, args.split, a["modality"], a["flow_len"])
    dtype = inference_dtype(device)
    sums: dict[str, list] = {}
    views = TTA[args.tta]
    for pos, flips in crop_positions(args.tta).items():
        loader = loaders.build(args.data, args.split, a["modality"], False, args.batch_size, crop=a["input_size"],
                               backend=args.backend, device=device, flow_len=a["flow_len"], workers=args.workers,
                               crop_pos=pos)
        for images, labels, keys in tqdm(loader, desc=f"view {pos}{' and mirrored' if True in flips else ''}",
                                         unit="batch"):
            logits, probs = view_sums(model, images, stream, flips, dtype)
            for key, label, lg, pr in zip(keys, labels.tolist(), logits.cpu().numpy(), probs.cpu().numpy()):
                entry = sums.setdefault(key, [label, 0, 0.0, 0.0])
                entry[1] += len(flips)
                entry[2] = entry[2] + lg
                entry[3] = entry[3] + pr
        if getattr(loader, "skipped", 0):
            print(f"warning: {loader.skipped} bad samples were skipped")
    uneven = [k for k, e in sums.items() if e[1] != len(views)]
    if uneven:
        print(f"warning: {len(uneven)} samples were not seen in every view (e.g. {uneven[0]})")
    keys = sorted(sums)
    return {"keys": np.array(keys), "videos": np.array([k.rsplit("/", 1)[0] for k in keys]),
            "frames": np.array([int(k.rsplit("/", 1)[1]) for k in keys]),
            "labels": np.array([sums[k][0] for k in keys], dtype=np.int64),
            "logits": np.stack([sums[k][2] / sums[k][1] for k in keys]).astype(np.float32),
            "scores": np.stack([sums[k][3] / sums[k][1] for k in keys]).astype(np.float32)}


def video_labels(frames: dict, video_ids: np.ndarray) -> np.ndarray:
    first = {}
    for v, label in zip(frames["videos"], frames["labels"]):
        first.setdefault(v, label)
    return np.array([first[v] for v in video_ids], dtype=np.int64)


def results_json(video_ids, scores: np.ndarray, classes: list[str], youtube_ids: dict) -> dict:
    """ActivityNet/Kinetics result format: the top 5 labels and scores per video."""
    results = {}
    for vid, row in zip(video_ids, scores):
        top = np.argsort(-row, kind="stable")[:5]
        results[youtube_ids.get(vid, vid)] = [{"label": classes[c], "score": float(row[c])} for c in top]
    return {"version": "KINETICS-400", "external_data": {"used": False, "details": ""}, "results": results}


def main(args: argparse.Namespace) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, ckpt = load_model(args.checkpoint, device)
    classes = ckpt["classes"]
    manifest = load_manifest(args.data)
    if manifest["classes"] and manifest["classes"] != classes:
        raise SystemExit(f"error: {args.data} has another class list than the checkpoint ({len(manifest['classes'])} "
                         f"vs {len(classes)}); pack the split with --classes from the training data")
    frames = frame_scores(model, ckpt, args, device)
    video_ids, vscores = metrics.video_scores(frames["scores"], frames["videos"], args.class_topk)
    vlabels = video_labels(frames, video_ids)
    meta = {"modality": ckpt["args"]["modality"], "arch": ckpt["args"]["arch"], "checkpoint": str(args.checkpoint),
            "iteration": ckpt["iteration"], "data": str(args.data), "split": args.split, "tta": args.tta,
            "class_topk": args.class_topk}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp.npz")
    np.savez_compressed(tmp, **frames, classes=np.array(classes), meta=np.array(json.dumps(meta)))
    tmp.replace(args.out)

    youtube_ids = {v: info.get("youtube_id", v) for v, info in manifest["splits"][args.split]["video_info"].items()}
    json_path = args.results_json or args.out.with_suffix(".json")
    json_path.write_text(json.dumps(results_json(video_ids, vscores, classes, youtube_ids), indent=1))
    print(f"{len(frames['keys'])} frames of {len(video_ids)} videos scored -> {args.out}, {json_path}")
    figures = {}
    if (frames["labels"] >= 0).any():
        figures = metrics.summary(frames["scores"], frames["labels"], vscores, vlabels)
        print(f"frame top-1 {figures['frame_top1']:.4f}  top-3 {figures['frame_top3']:.4f}  |  "
              f"video top-1 {figures['video_top1']:.4f}  top-5 {figures['video_top5']:.4f}  "
              f"mean error {figures['mean_error']:.4f}  mAP {figures['video_mAP']:.4f}")
    else:
        print("the split has no labels: predictions only")
    return figures


if __name__ == "__main__":
    main(get_args_parser().parse_args())
