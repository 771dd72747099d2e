"""Score a trained stream over every sample of a split: frame scores, video scores, result JSON.

    python score.py --checkpoint runs/rgb/best.pt --data DATA --split val --out scores/rgb_val.npz

Writes the frame-level scores (format in docs/FORMAT.md), prints frame and video accuracy
when the split has labels, and writes video predictions as ActivityNet/Kinetics result JSON.
It refuses to print figures of part of a split (samples lost to damaged shards: the counts
and the shards are printed; --allow-partial labels the figures "partial" instead) or of
scores that are not finite (a diverged checkpoint; --allow-non-finite counts them as wrong).
It refuses a split packed with other input parameters than the checkpoint was trained on
(flow method, flow length, bound, short side; --allow-other-params scores it, noted in every
output), and any existing output (--overwrite). The score file records where its numbers
come from: the checkpoint's SHA-256, its training split's identity, the scored split's.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import loaders
import metrics
import nets
from loaders.common import check_videos, flip_batch, open_stream
from loaders.plan import Segments
from outputs import check_outputs, replaced_note
from pack.annotations import class_difference
from pack.files import Lock, atomic_write_json
from pack.manifest import incomplete_note, load_manifest, params_differ, split_identity
from training.checkpoints import read_checkpoint


VERIFY_HINT = "find every problem with python -m pack.verify {data} --split {split}; re-pack or re-copy those shards"

# Test-time views: (crop position, mirrored). Positions are relative (0..1, 0..1).
CORNERS = [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0), (0.5, 0.5)]
TTA = {"none": [((0.5, 0.5), False)],
       "flip": [((0.5, 0.5), False), ((0.5, 0.5), True)],
       "3crop": [((0.0, 0.0), False), ((0.5, 0.5), False), ((1.0, 1.0), False)],
       "10crop": [(pos, flip) for pos in CORNERS for flip in (False, True)]}


def at_least(low: int):
    """argparse type of a count that must be >= low: a batch of 0 samples would never end, -1 workers is no number."""
    def parse(text: str) -> int:
        n = int(text)
        if n < low:
            raise argparse.ArgumentTypeError(f"{text}: give a number >= {low}")
        return n
    return parse


positive_int = at_least(1)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, type=Path, help="a train.py checkpoint (best.pt, latest.pt, ...)")
    p.add_argument("--data", required=True, type=Path, help="packed DATA folder")
    p.add_argument("--split", default="val", help="split to score")
    p.add_argument("--out", required=True, type=Path, help="frame scores file to write (.npz)")
    p.add_argument("--results-json", type=Path, help="video predictions in Kinetics result JSON (default: OUT with .json)")
    p.add_argument("--tta", default="none", choices=list(TTA), help="test-time views averaged per frame")
    p.add_argument("--class-topk", type=metrics.class_topk_arg, default=0, help="video score per class = mean of its K best frame scores (0: mean of all frames)")
    p.add_argument("--frames", type=positive_int, metavar="N",
                   help="score N evenly spaced frames of each video (the centres of N equal segments of its packed "
                        "samples: TSN's test protocol, 25), not every packed frame; a video of fewer than N samples "
                        "is scored on all of them. Every output says which protocol ran")
    p.add_argument("--batch-size", type=positive_int, default=64, help="samples per batch (videos with --frames)")
    p.add_argument("--backend", default="auto", choices=["auto", "dali", "cpu"], help="loader backend")
    p.add_argument("--workers", type=at_least(0), default=min(4, len(os.sched_getaffinity(0))),
                   help="loader workers (default: the cores this process may use, at most 4)")
    p.add_argument("--device", help="cuda or cpu (default: cuda if present)")
    p.add_argument("--allow-partial", action="store_true",
                   help="score what can be read of a damaged split, or of one packed in part (a --part never run); "
                        "the figures and the JSON then say \"partial\"")
    p.add_argument("--allow-non-finite", action="store_true",
                   help="go on when scores are not finite (NaN, inf): they count as wrong, and the output says how many")
    p.add_argument("--allow-mirrored", action="store_true",
                   help="mirrored test-time views (--tta flip, 10crop) for a stream trained with --no-flip")
    p.add_argument("--allow-other-params", action="store_true",
                   help="score a split packed with other input parameters (flow, flow_len, flow_bound, short_side) "
                        "than the checkpoint was trained on; every output says so")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out / --results-json")
    return p


def load_model(path: Path, device: torch.device, modality: str | None = None) -> tuple[torch.nn.Module, dict]:
    """A train.py checkpoint's network, in eval mode on device, and the checkpoint with its bytes' SHA-256 ("file_sha256");
    refused if its weights are not finite (or not `modality`)."""
    if not path.is_file():
        raise SystemExit(f"error: checkpoint {path} not found")
    ckpt = read_checkpoint(path, f"--{modality}" if modality else "--checkpoint")
    a = ckpt["args"]
    if modality and a["modality"] != modality:
        raise SystemExit(f"error: {path} is a {a['modality']} stream, given as the {modality} one")
    bad = nets.non_finite_tensors(ckpt["model"])
    if bad:
        raise SystemExit(f"error: {path} holds non-finite weights ({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}): "
                         f"its training diverged; use an earlier checkpoint")
    model = nets.build(a["arch"], len(ckpt["classes"]), a["modality"], a["flow_len"] or 1,
                       transform_input=nets.transform_input_of(ckpt))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt


def check_mirrored_views(ckpt: dict, tta: str, allowed: bool, path) -> None:
    """A stream trained without mirroring (--no-flip: left and right differ) is not scored on mirrored views unless asked."""
    if ckpt["args"].get("no_flip") and any(mirrored for _, mirrored in TTA[tta]) and not allowed:
        raise SystemExit(f"error: {path} was trained with --no-flip (its classes tell left from right): --tta {tta} "
                         f"would score it on mirrored views; choose --tta none or 3crop, or give --allow-mirrored")


def check_inputs(ckpt: dict, manifest: dict, split: dict, args) -> str | None:
    """The split against the checkpoint, before any work: its classes, the views asked, its pack parameters.

    Inputs made otherwise than the training data (another flow, flow length, bound, short side) are other
    pictures than the network learnt: refused unless --allow-other-params; returns the note every output then carries.
    """
    if manifest["classes"] and manifest["classes"] != ckpt["classes"]:
        raise SystemExit(f"error: {args.data} has another class list than the checkpoint ({len(manifest['classes'])} "
                         f"vs {len(ckpt['classes'])}: "
                         f"{class_difference(manifest['classes'], ckpt['classes'], str(args.data), 'the checkpoint')}); "
                         f"pack the split with --classes from the training data")
    check_mirrored_views(ckpt, args.tta, args.allow_mirrored, args.checkpoint)
    trained = ckpt.get("pack_params")
    if trained is None:
        print(f"warning: {args.checkpoint} does not record its pack parameters (an older train.py): the inputs "
              f"of {args.data}/{args.split} are not checked against them")
        return None
    differ = params_differ(trained, split["params"], ckpt["args"]["modality"])
    if not differ:
        return None
    what = f"{args.data}/{args.split} was packed with other parameters than {args.checkpoint} was trained on " \
           f"({', '.join(differ)})"
    if not args.allow_other_params:
        raise SystemExit(f"error: {what}; pack the split again with the checkpoint's parameters, or give "
                         f"--allow-other-params to score it anyway (noted in every output)")
    print(f"warning: {what}; scored anyway (--allow-other-params)")
    return f"other pack parameters than trained on: {', '.join(differ)}"


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
def frame_scores(model, ckpt: dict, args, device: torch.device, split: dict) -> tuple[dict, list]:
    """Softmax and logits per sample key, averaged over the test-time views; and what the loaders lost (by shard).

    split: the manifest's entry of args.split (its video ids). --frames N: each video's N
    evenly spaced frames (a frame planned twice, in a video of fewer than N samples, is scored once).
    """
    a = ckpt["args"]
    stream = open_stream(args.data, args.split, a["modality"], a["flow_len"])
    dtype = inference_dtype(device)
    sums: dict[str, list] = {}
    views = TTA[args.tta]
    losses = {}
    for pos, flips in crop_positions(args.tta).items():
        loader = loaders.build(args.data, args.split, a["modality"], False, args.batch_size, crop=a["input_size"],
                               backend=args.backend, device=device, flow_len=a["flow_len"], workers=args.workers,
                               crop_pos=pos, segments=args.frames or 1)
        seen = set()  # this view's keys: --frames repeats the frames of videos shorter than N
        for images, labels, keys in tqdm(loader, desc=f"view {pos}{' and mirrored' if True in flips else ''}",
                                         unit="batch"):
            logits, probs = view_sums(model, images, stream, flips, dtype)
            labels = labels.repeat_interleave(len(keys) // max(len(labels), 1))  # --frames: one label a video
            for key, label, lg, pr in zip(keys, labels.tolist(), logits.cpu().numpy(), probs.cpu().numpy()):
                if key in seen:
                    continue
                seen.add(key)
                entry = sums.setdefault(key, [label, 0, 0.0, 0.0])
                entry[1] += len(flips)
                entry[2] = entry[2] + lg
                entry[3] = entry[3] + pr
        losses.update({loss.shard: loss for loss in loader.losses})
    if not sums:
        raise SystemExit(f"error: {args.data}/{args.split}: 0 of {planned_samples(split, args.frames)} samples could "
                         f"be read, nothing to "
                         f"score{lost_shards(list(losses.values()))}\n{VERIFY_HINT.format(data=args.data, split=args.split)}")
    uneven = [k for k, e in sums.items() if e[1] != len(views)]
    if uneven:
        print(f"warning: {len(uneven)} samples were not seen in every view (e.g. {uneven[0]})")
    keys = sorted(sums)
    video_of = video_ids_by_key(split)
    frames = {"keys": np.array(keys), "videos": np.array([video_of.get(k.rsplit("/", 1)[0], k.rsplit("/", 1)[0]) for k in keys]),
            "frames": np.array([int(k.rsplit("/", 1)[1]) for k in keys]),
            "labels": np.array([sums[k][0] for k in keys], dtype=np.int64),
            "logits": np.stack([sums[k][2] / sums[k][1] for k in keys]).astype(np.float32),
            "scores": np.stack([sums[k][3] / sums[k][1] for k in keys]).astype(np.float32)}
    return frames, list(losses.values())


def video_ids_by_key(split: dict) -> dict[str, str]:
    """Sample-key prefix -> video id (they differ where an id holds what tar and index names cannot)."""
    return {info.get("key", vid): vid for vid, info in split["video_info"].items()}


def planned_samples(split: dict, frames: int | None) -> int:
    """The samples a protocol scores: every packed one, or each video's N evenly spaced ones (--frames N), once each."""
    if not frames:
        return split["samples"]
    lengths = [v["samples"] for v in split["video_info"].values() if v["samples"]]
    return int(sum(len(set(Segments(frames, [n]).frames([0]).tolist())) for n in lengths))


def protocol(frames: int | None) -> str:
    """Which frames of each video were scored, in words (printed, and in the score file's meta)."""
    return f"{frames} evenly spaced frames a video (--frames {frames})" if frames else "every packed frame"


def coverage(frames: dict, split: dict, of_samples: int | None = None) -> dict:
    """What was scored against what the manifest lists (of_samples: what the protocol scores of it): samples and
    videos, and whether that is all (of a whole split)."""
    c = {"samples": len(frames["keys"]), "of_samples": split["samples"] if of_samples is None else of_samples,
         "videos": len(set(frames["videos"].tolist())), "of_videos": len(split["video_info"]),
         "incomplete": incomplete_note(split)}
    c["partial"] = c["samples"] < c["of_samples"] or c["videos"] < c["of_videos"] or c["incomplete"] is not None
    c["partial_note"] = coverage_note(c)
    return c


def coverage_note(c: dict) -> str:
    packed = f" packed; {c['incomplete']}" if c.get("incomplete") else ""
    return f"partial: {c['samples']} of {c['of_samples']} samples, {c['videos']} of {c['of_videos']} videos{packed}"


def lost_shards(losses: list) -> str:
    """The loaders' losses, a shard a line (the first ten)."""
    more = f"\n  ... and {len(losses) - 10} more shard(s)" if len(losses) > 10 else ""
    return "".join(f"\n  {loss}" for loss in losses[:10]) + more


def check_complete(c: dict, losses: list, args) -> None:
    """A split scored in part is an error (its figures would pass for the whole split's) unless --allow-partial."""
    if c["partial"]:
        allow_partial(f"{args.data}/{args.split} was scored in part ({coverage_note(c)}){lost_shards(losses)}",
                      f"\nfind every problem with python -m pack.verify {args.data} --split {args.split}; re-pack or "
                      f"re-copy those shards", args)


def check_whole_split(split: dict, args) -> None:
    """A split packed in part (a --part never run) is refused before any work: its figures would pass for the whole's."""
    note = incomplete_note(split)
    if note is not None:
        allow_partial(f"{args.data}/{args.split}: {note}", f"; run the missing parts' pack commands, then python -m "
                      f"pack.merge {args.data}", args)


def allow_partial(message: str, what_to_do: str, args) -> None:
    """An error saying what to do, or with --allow-partial a warning (the outputs then say partial)."""
    if not args.allow_partial:
        raise SystemExit(f"error: {message}{what_to_do}, or give --allow-partial to score what is there (every output "
                         f"then says partial)")
    print(f"warning: {message}; scored anyway (--allow-partial)")


def check_finite(frames: dict, args) -> int:
    """Rows of non-finite scores: an error unless --allow-non-finite (then they count as wrong)."""
    bad = int((~metrics.finite_rows(frames["logits"]) | ~metrics.finite_rows(frames["scores"])).sum())
    if bad and not args.allow_non_finite:
        raise SystemExit(f"error: {bad} of {len(frames['keys'])} frame scores are not finite (NaN or inf): the model "
                         f"overflows on these inputs; nothing was written. Give --allow-non-finite to count them as wrong")
    return bad


def video_labels(frames: dict, video_ids: np.ndarray) -> np.ndarray:
    first = {}
    for v, label in zip(frames["videos"], frames["labels"]):
        first.setdefault(v, label)
    return np.array([first[v] for v in video_ids], dtype=np.int64)


def results_json(video_ids, scores: np.ndarray, classes: list[str], youtube_ids: dict, partial: str | None = None) -> dict:
    """ActivityNet/Kinetics result format: the top 5 labels and scores per video (a non-finite score: null, ranked last)."""
    results = {}
    for vid, row in zip(video_ids, scores):
        top = np.argsort(-np.where(np.isfinite(row), row, -np.inf), kind="stable")[:5]
        results[youtube_ids.get(vid, vid)] = [{"label": classes[c], "score": float(row[c])} for c in top]
    doc = {"version": "KINETICS-400", "external_data": {"used": False, "details": ""}, "results": results}
    return {**doc, "partial": partial} if partial else doc


def load_split(args) -> tuple[dict, dict]:
    """The manifest and its entry of args.split."""
    try:
        manifest = load_manifest(args.data)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    split = manifest["splits"].get(args.split)
    if split is None:
        raise SystemExit(f"error: {args.data} has no split {args.split!r}; it has {sorted(manifest['splits'])}")
    return manifest, split


def split_files(data: Path, split: dict) -> list[Path]:
    """The files a split is read from (the manifest, shards, indexes): no output may be one of them."""
    pieces = [piece for modality in split["shards"].values() for piece in modality]
    return [data / "manifest.json", *(data / piece[k] for piece in pieces for k in ("tar", "idx"))]


def provenance(args, ckpt: dict, manifest: dict) -> dict:
    """What a score file was made from: the checkpoint (its bytes' hash, iteration, training split), the split scored."""
    return {"checkpoint": str(args.checkpoint), "checkpoint_sha256": ckpt["file_sha256"],
            "iteration": ckpt["iteration"], "trained_on": ckpt.get("data"),
            "scored": split_identity(args.data, manifest, args.split), "data": str(args.data), "split": args.split,
            "tta": args.tta, "class_topk": args.class_topk, "frames": args.frames, "protocol": protocol(args.frames)}


def print_figures(frames: dict, vscores: np.ndarray, vlabels: np.ndarray, notes: list[str]) -> dict:
    """The frame and video figures, with what they must be read with beside them; {} for a split without labels."""
    if not (frames["labels"] >= 0).any():
        print("the split has no labels: predictions only" + (f" ({'; '.join(notes)})" if notes else ""))
        return {}
    figures = metrics.summary(frames["scores"], frames["labels"], vscores, vlabels)
    if figures["frames_non_finite"] or figures["videos_non_finite"]:
        notes = [*notes, f"{figures['frames_non_finite']} frames and {figures['videos_non_finite']} videos of "
                         f"non-finite scores counted as wrong"]
    print(f"frame top-1 {figures['frame_top1']:.4f}  top-3 {figures['frame_top3']:.4f}  |  "
          f"video top-1 {figures['video_top1']:.4f}  top-5 {figures['video_top5']:.4f}  "
          f"mean error {figures['mean_error']:.4f}  mAP {figures['video_mAP_anet']:.4f} (ActivityNet's: interpolated, "
          f"top-5 labels), {figures['video_mAP_sklearn']:.4f} (scikit-learn's: all scores)"
          + (f"  ({'; '.join(notes)})" if notes else ""))
    return figures


def main(args: argparse.Namespace) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    json_path = args.results_json or args.out.with_suffix(".json")
    manifest, split = load_split(args)
    check_whole_split(split, args)
    if args.out.is_file() and not json_path.exists() and not args.overwrite:
        raise SystemExit(f"error: --out {args.out} exists without its result JSON {json_path}: an earlier run was "
                         f"stopped between writing the two (killed?), its result is not whole; give --overwrite to "
                         f"score again")
    replaced = check_outputs([("--out", args.out), ("--results-json", json_path)],
                             [args.checkpoint, *split_files(args.data, split)], args.overwrite)
    with Lock(args.out.with_name(f".{args.out.name}.lock")).acquire(f"--out {args.out}"):  # one run per --out
        remove_stale_temporaries(args.out, json_path)
        return score_split(args, device, json_path, manifest, split, replaced)


def remove_stale_temporaries(*outputs: Path) -> None:
    """Temporaries of an earlier run killed while writing these outputs (under their lock: no run writes them now)."""
    stale = [tmp for path in outputs for tmp in path.parent.glob(f".{path.name}.tmp*")]
    for tmp in stale:
        tmp.unlink()
    if stale:
        print(f"removed {len(stale)} half-written file(s) of an earlier run killed while writing: {stale[0]}")


def score_split(args, device: torch.device, json_path: Path, manifest: dict, split: dict, replaced: list) -> dict:
    """The work of main, under the --out lock: score, write the score file and the result JSON, print the figures."""
    model, ckpt = load_model(args.checkpoint, device)
    other_params = check_inputs(ckpt, manifest, split, args)
    if args.frames:  # each video's frames are found by the manifest's video list
        try:
            check_videos(open_stream(args.data, args.split, ckpt["args"]["modality"], ckpt["args"]["flow_len"]))
        except ValueError as e:
            raise SystemExit(f"error: --frames {args.frames}: {args.data}: {e}") from None
    meta = {"modality": ckpt["args"]["modality"], "arch": ckpt["args"]["arch"], **provenance(args, ckpt, manifest)}
    frames, losses = frame_scores(model, ckpt, args, device, split)
    scored = coverage(frames, split, planned_samples(split, args.frames))
    check_complete(scored, losses, args)
    non_finite = check_finite(frames, args)
    video_ids, vscores = metrics.video_scores(frames["scores"], frames["videos"], args.class_topk)
    partial = scored["partial_note"] if scored["partial"] else None
    meta.update(coverage=scored, non_finite_rows=non_finite, other_pack_params=other_params)
    tmp = args.out.with_name(f".{args.out.name}.tmp{os.getpid()}.npz")
    youtube_ids = {v: info.get("youtube_id") or v for v, info in split["video_info"].items()}
    doc = results_json(video_ids, vscores, ckpt["classes"], youtube_ids, partial)
    doc = {**doc, **({"frames": args.frames} if args.frames else {})}  # the protocol, where not every frame
    try:
        np.savez_compressed(tmp, **frames, classes=np.array(ckpt["classes"]), meta=np.array(json.dumps(meta)))
        tmp.replace(args.out)
        atomic_write_json(json_path, {**doc, "other_pack_params": other_params} if other_params else doc)
    except OSError as e:  # a full disk: nothing half-written stays
        tmp.unlink(missing_ok=True)
        written = f"{args.out} is written, {json_path} not" if args.out.exists() else "nothing is written"
        raise SystemExit(f"error: writing the scores failed ({e.strerror or e}): {written}; free space, then run the "
                         f"same command{' with --overwrite' if args.out.exists() else ''} again") from None
    print(f"{len(frames['keys'])} frames of {len(video_ids)} videos scored ({protocol(args.frames)}) -> {args.out}, "
          f"{json_path}{replaced_note(replaced)}")
    notes = [n for n in (partial, other_params, args.frames and protocol(args.frames)) if n]
    return print_figures(frames, vscores, video_labels(frames, video_ids), notes)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
