"""Fuse the scores of several streams and print the results table (RGB, Flow, RGB+FLOW).

    python fuse.py scores/rgb_val.npz scores/flow_val.npz --weights 1 1.5 --out results/

Fusion is a weighted average of the streams' logits (scores before softmax) by default, as
TSN fuses its streams. Averaging logits multiplies the streams' probabilities, so a stream
that is sure a class is wrong can veto it; averaging softmax scores (--fuse-on scores)
lets a stream that is overconfident where it is blind (RGB on motion direction) outvote
the stream that knows. A video or frame missing from a stream is fused from the streams
that have it, and counted in the report. Scores of part of a split (score.py --allow-partial)
and non-finite scores (counted as wrong) are said beside the table, in results.md and
results.json.

Score files of different data or splits are refused (--allow-mixed fuses them anyway, said
in every output); results.md and results.json record each input's provenance (its hash,
its checkpoint's, the split it was scored on). Existing results are replaced only with
--overwrite.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import zipfile
import zlib
from pathlib import Path

import numpy as np

import metrics
from outputs import check_outputs, replaced_note
from pack.annotations import class_difference
from pack.files import atomic_write_bytes, atomic_write_json, file_sha256

COLUMNS = ["frame_top1", "frame_top3", "video_top1", "video_top5", "mean_error", "video_mAP_anet", "video_mAP_sklearn"]
MAP_NOTE = ("video_mAP_anet: ActivityNet's official Kinetics evaluation, interpolated AP over each video's top-5 labels "
            "(as published); video_mAP_sklearn: AP over every video's score for every class (scikit-learn's "
            "average_precision_score)")
OUTPUTS = ("results.md", "results.json", "confusion.png")
SCORE_ARRAYS = ("keys", "videos", "labels", "scores", "logits", "classes", "meta")


def read_score_file(path: Path) -> tuple[dict, dict]:
    """A score.py file's arrays and meta, or one line saying why it is not one."""
    if not Path(path).is_file():
        raise SystemExit(f"error: scores file {path} not found")
    if not zipfile.is_zipfile(path):
        if Path(path).stat().st_size == 0:
            raise SystemExit(f"error: {path} is empty (0 bytes); score the split again with score.py")
        with open(path, "rb") as f:
            if f.read(4) == b"PK\x03\x04":  # a zip's start without its end (its table of contents is last)
                raise SystemExit(f"error: {path} is cut short (a zip without its end: a copy or a write that did not "
                                 f"finish); copy it again, or score the split again with score.py")
        raise SystemExit(f"error: {path} is not a score file (score.py writes a .npz, a zip of arrays); give the .npz "
                         f"score.py --out wrote")
    try:
        with np.load(path, allow_pickle=False) as z:
            lacking = [k for k in SCORE_ARRAYS if k not in z.files]
            if lacking:
                raise SystemExit(f"error: {path} is not a score.py file (it lacks {', '.join(lacking)}); "
                                 f"give the .npz score.py --out wrote")
            arrays = {k: z[k] for k in SCORE_ARRAYS}
        meta = json.loads(str(arrays.pop("meta")))
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise SystemExit(f"error: {path} is damaged: its bytes are not what score.py wrote ({type(e).__name__}: {e}); "
                         f"copy it again, or score the split again with score.py") from None
    return arrays, meta


def load_scores(path: Path, fuse_on: str, class_topk: int | None) -> dict:
    """One stream's frame and video scores from a score.py file, and the file's hash."""
    z, meta = read_score_file(path)
    values = z["scores"] if fuse_on == "scores" else z["logits"]
    topk = meta.get("class_topk", 0) if class_topk is None else class_topk
    video_ids, vvalues = metrics.video_scores(values, z["videos"], topk)
    labels = dict(zip(z["videos"], z["labels"]))
    return {"path": str(path), "sha256": file_sha256(path), "meta": meta, "classes": list(z["classes"]),
            "frames": dict(zip(z["keys"], values)), "frame_labels": dict(zip(z["keys"], z["labels"])),
            "videos": dict(zip(video_ids, vvalues)), "video_labels": {v: labels[v] for v in video_ids}}


def stream_label(stream: dict) -> str:
    return {"rgb": "RGB", "flow": "Flow"}.get(stream["meta"].get("modality"), Path(stream["path"]).stem)


def name_streams(streams: list[dict]) -> None:
    """Give each stream its row name: its modality, and the file's name where two share one ("RGB (rgb_ckpt32)").

    The same scores given twice (one file, or a copy) are refused: fused with themselves they only weigh more.
    """
    first = {}
    for s in streams:
        twin = first.setdefault(s["sha256"], s)
        if twin is not s:
            raise SystemExit(f"error: {twin['path']} and {s['path']} hold the same scores (sha256 {s['sha256'][:12]}): "
                             f"give each stream once (use --weights to weigh one more)")
    labels = [stream_label(s) for s in streams]
    for s, label in zip(streams, labels):
        s["name"] = label if labels.count(label) == 1 else f"{label} ({Path(s['path']).stem})"
    names = [s["name"] for s in streams]
    for s, label in zip(streams, labels):
        if names.count(s["name"]) > 1:  # one file name in two folders
            s["name"] = f"{label} ({s['path']})"


def identity(stream: dict) -> tuple | None:
    """The split a score file was scored on, as (split, plan id); None for a file that does not say (an older score.py)."""
    scored = stream["meta"].get("scored") or {}
    return (scored["split"], scored["plan"]) if scored.get("plan") else None


def describe(stream: dict) -> str:
    scored = stream["meta"].get("scored")
    if not identity(stream):
        return f"{stream['path']}: split unknown (written by an earlier score.py)"
    return f"{stream['path']}: {scored['data']} split {scored['split']} (plan {scored['plan']})"


def check_one_split(streams: list[dict], allow_mixed: bool) -> str | None:
    """Streams fused per video must be scores of one split of one packed data set: refused otherwise, unless
    --allow-mixed; returns the note every output then carries."""
    ids = [identity(s) for s in streams]
    if len(streams) < 2 or (None not in ids and len(set(ids)) == 1):
        return None
    if None in ids:
        problem = (f"{', '.join(s['path'] for s, i in zip(streams, ids) if i is None)} do(es) not record the split "
                   f"it was scored on (an earlier score.py)")
        fix = "score it again with this score.py"
    else:
        problem = f"the score files are of different data or splits ({'; '.join(describe(s) for s in streams)})"
        fix = "fuse score files of one split"
    if not allow_mixed:
        raise SystemExit(f"error: {problem}: {fix}, or give --allow-mixed to fuse them anyway (noted in every output)")
    return f"mixed inputs, fused anyway (--allow-mixed): {problem}"


def input_record(stream: dict) -> dict:
    """What results.json and results.md record of an input: the file and what it was made from."""
    m = stream["meta"]
    scored = m.get("scored") or {}
    return {"row": stream.get("name"), "path": stream["path"], "sha256": stream["sha256"],
            "checkpoint": m.get("checkpoint"), "checkpoint_sha256": m.get("checkpoint_sha256"),
            "iteration": m.get("iteration"), "modality": m.get("modality"), "data": scored.get("data", m.get("data")),
            "split": scored.get("split", m.get("split")), "plan": scored.get("plan"), "tta": m.get("tta"),
            "class_topk": m.get("class_topk"), "trained_on": m.get("trained_on"),
            "other_pack_params": m.get("other_pack_params")}


def fuse(tables: list[dict], weights: list[float]) -> dict:
    """Weighted average per id over the streams that have it (weights renormalised per id)."""
    out = {}
    for i in set().union(*tables):
        have = [(t[i], w) for t, w in zip(tables, weights) if i in t]
        total = sum(w for _, w in have)
        out[i] = sum(v * w for v, w in have) / (total if total else 1.0)
    return out


def figures(frames: dict, frame_labels: dict, videos: dict, video_labels: dict, logits: bool) -> dict:
    """A row's figures; its ActivityNet mAP from the probabilities a result file would hold (softmax of logits)."""
    fkeys, vkeys = sorted(frames), sorted(videos)
    fl = np.array([frame_labels[k] for k in fkeys])
    vl = np.array([video_labels[k] for k in vkeys])
    vs = np.stack([videos[k] for k in vkeys])
    with np.errstate(invalid="ignore", over="ignore"):  # a non-finite row stays one (it submits nothing)
        submitted = np.exp(vs - vs.max(1, keepdims=True)) if logits else vs
        submitted = submitted / submitted.sum(1, keepdims=True) if logits else vs
    result = metrics.summary(np.stack([frames[k] for k in fkeys]), fl, vs, vl, submitted)
    result["per_class_accuracy"] = [None if np.isnan(a) else float(a) for a in metrics.per_class_accuracy(vs[vl >= 0], vl[vl >= 0])]
    result["_confusion"] = metrics.confusion_matrix(vs[vl >= 0], vl[vl >= 0])
    return result


def labels_of(streams: list[dict], kind: str) -> dict:
    """All streams' labels of one kind ("frame_labels" or "video_labels") in one mapping."""
    return {k: v for s in streams for k, v in s[kind].items()}


def evaluate(streams: list[dict], weights: list[float], logits: bool) -> dict:
    """Figures per stream and fused, keyed by row name."""
    frame_labels, video_labels = labels_of(streams, "frame_labels"), labels_of(streams, "video_labels")
    rows = {s["name"]: figures(s["frames"], s["frame_labels"], s["videos"], s["video_labels"], logits)
            for s in streams}
    if len(streams) == 1:
        return rows
    rows["+".join(stream_label(s).upper() for s in streams)] = figures(fuse([s["frames"] for s in streams], weights), frame_labels,
                               fuse([s["videos"] for s in streams], weights), video_labels, logits)
    return rows


def search_weights(streams: list[dict], grid: list[float]) -> list[float]:
    """The weights (first stream fixed at 1) with the best fused video top-1, then mAP."""
    best, best_key = None, None
    labels = labels_of(streams, "video_labels")
    for rest in itertools.product(grid, repeat=len(streams) - 1):
        weights = [1.0, *rest]
        videos = fuse([s["videos"] for s in streams], weights)
        ids = [k for k in sorted(videos) if labels[k] >= 0]
        scores, y = np.stack([videos[k] for k in ids]), np.array([labels[k] for k in ids])
        key = (metrics.topk_accuracy(scores, y, 1), metrics.mean_average_precision(scores, y)[0])
        if best_key is None or key > best_key:
            best, best_key = weights, key
    return best


def coverage(streams: list[dict]) -> dict:
    """Per stream, how many of all videos it lacks."""
    everything = set().union(*(s["videos"] for s in streams))
    return {s["name"]: len(everything - set(s["videos"])) for s in streams}


def notes(streams: list[dict], rows: dict, missing: dict) -> list[str]:
    """What the table's figures must be read with: videos a stream lacks, streams scored on part of their split or
    on inputs packed otherwise than trained on, non-finite scores."""
    out = [f"{name} lacks {n} video(s) that another stream has; fused from what is there"
           for name, n in missing.items() if n]
    out += [f"{s['name']}: scored on inputs packed otherwise than trained on ({s['meta']['other_pack_params']})"
            for s in streams if s["meta"].get("other_pack_params")]
    out += [f"{s['name']}: scored on part of the split ({s['meta']['coverage']['partial_note']})"
           for s in streams if s["meta"].get("coverage", {}).get("partial")]
    out += same_scores_twice(streams)
    for name, r in rows.items():
        if r["frames_non_finite"] or r["videos_non_finite"]:
            out.append(f"{name}: {r['frames_non_finite']} frames and {r['videos_non_finite']} videos of non-finite "
                       f"scores, counted as wrong")
    return out


def same_scores_twice(streams: list[dict]) -> list[str]:
    """Score files of one checkpoint on one split with the same views (copies of DATA scored apart): their fusion is
    that stream with itself, however their files differ."""
    twins: dict[tuple, list[str]] = {}
    for s in streams:
        m = s["meta"]
        if m.get("checkpoint_sha256") and identity(s):
            twins.setdefault((m["checkpoint_sha256"], identity(s), m.get("tta"), m.get("class_topk")), []).append(s["name"])
    return [f"{' and '.join(names)} are one checkpoint (sha256 {key[0][:12]}) scored on one split (plan {key[1][1]}) with "
            f"the same views: fused, they are that stream with itself, weighed more, not two streams"
            for key, names in twins.items() if len(names) > 1]


def markdown_table(rows: dict) -> str:
    lines = ["| stream | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[c]:.4f}" for c in COLUMNS) + " |")
    return "\n".join(lines)


def inputs_table(records: list[dict]) -> str:
    """results.md's record of the inputs: each file, its hash, its checkpoint's, the split it was scored on."""
    lines = ["| stream | file | sha256 | checkpoint | checkpoint sha256 | iteration | data | split | plan | tta |",
             "|---" * 10 + "|"]
    for r in records:
        lines.append("| " + " | ".join(str(r[k]) if r[k] is not None else "unknown" for k in
                                       ("row", "path", "sha256", "checkpoint", "checkpoint_sha256", "iteration", "data",
                                        "split", "plan", "tta")) + " |")
    return "\n".join(lines)


def plot_confusion(matrix: np.ndarray, classes: list[str], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(classes)
    size = min(4 + 0.35 * n, 40)
    fig, ax = plt.subplots(figsize=(size, size))
    normalised = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    if n <= 60:
        ax.set_xticks(range(n), classes, rotation=90)
        ax.set_yticks(range(n), classes)
        for (i, j), count in np.ndenumerate(matrix):
            if count:
                ax.text(j, i, str(count), ha="center", va="center", fontsize=8,
                        color="white" if normalised[i, j] > 0.5 else "black")
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def weight_arg(text: str) -> float:
    """argparse type of a fusion weight: a finite number >= 0 (NaN or inf would make every fused score NaN)."""
    w = float(text)
    if not (math.isfinite(w) and w >= 0):
        raise argparse.ArgumentTypeError(f"{text}: give a finite number >= 0")
    return w


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scores", nargs="+", type=Path, help="score.py files, one per stream, of the split to report on")
    p.add_argument("--weights", nargs="+", type=weight_arg, help="one weight per stream (default: all 1)")
    p.add_argument("--fuse-on", default="logits", choices=["logits", "scores"],
                   help="average logits (default: a product of the streams' probabilities) or softmax scores")
    p.add_argument("--class-topk", type=metrics.class_topk_arg, help="video scores by per-class top-K frame mean (default: as scored)")
    p.add_argument("--search-weights", nargs="+", type=Path, metavar="TUNE_SCORES",
                   help="score files of another split (same streams, same order) to choose the weights on")
    p.add_argument("--grid", nargs="+", type=weight_arg, default=[x / 4 for x in range(13)], help="weights tried by --search-weights")
    p.add_argument("--out", type=Path, default=Path("results"), help="folder for results.md, results.json, confusion.png")
    p.add_argument("--allow-mixed", action="store_true",
                   help="fuse score files of different data or splits (or that do not say); every output says so")
    p.add_argument("--overwrite", action="store_true", help="replace the results already in --out")
    return p


def load_streams(paths: list[Path], args: argparse.Namespace) -> tuple[list[dict], str | None]:
    """The score files of one kind (reported, or tuned on), named, checked to be of one split and class list."""
    streams = [load_scores(p, args.fuse_on, args.class_topk) for p in paths]
    name_streams(streams)
    for s in streams[1:]:
        if s["classes"] != streams[0]["classes"]:
            raise SystemExit(f"error: {s['path']} has another class list than {streams[0]['path']} "
                             f"({len(s['classes'])} vs {len(streams[0]['classes'])} classes: "
                             f"{class_difference(s['classes'], streams[0]['classes'], s['path'], streams[0]['path'])}); "
                             f"score both on data packed with the same classes")
    return streams, check_one_split(streams, args.allow_mixed)


def tuned_weights(streams: list[dict], args: argparse.Namespace) -> tuple[list[float], list[dict], list[str]]:
    """--search-weights: the weights chosen on the tuning files, those files' records, and their notes."""
    tune, mixed = load_streams(args.search_weights, args)
    if len(tune) != len(streams):
        raise SystemExit("error: --search-weights needs one score file per stream, in the same order")
    if set(tune[0]["videos"]) & set(streams[0]["videos"]):
        raise SystemExit("error: the tuning and reported score files share videos; tune the weights on "
                         "another split than the one reported (e.g. tune on val, report on test)")
    weights = search_weights(tune, args.grid)
    print(f"weights chosen on {tune[0]['meta'].get('split', '?')}: {weights}")
    records = [{**input_record(s), "row": f"{s['name']} (tuning)"} for s in tune]
    return weights, records, [f"tuning files: {mixed}"] if mixed else []


def main(args: argparse.Namespace) -> dict:
    if args.weights and not any(args.weights):
        raise SystemExit("error: --weights are all 0: give at least one stream a weight > 0")
    replaced = check_outputs([("--out", args.out / name) for name in OUTPUTS],
                             [*args.scores, *(args.search_weights or [])], args.overwrite)
    streams, mixed = load_streams(args.scores, args)
    weights = args.weights or [1.0] * len(streams)
    if len(weights) != len(streams):
        raise SystemExit(f"error: {len(weights)} weights for {len(streams)} score files")
    tuned_on, said = None, [mixed] if mixed else []
    if args.search_weights:
        weights, tuned_on, tune_notes = tuned_weights(streams, args)
        said += tune_notes
    missing = coverage(streams)
    rows = evaluate(streams, weights, args.fuse_on == "logits")
    table = markdown_table(rows)
    said += notes(streams, rows, missing)
    print(table + f"\n({MAP_NOTE})" + "".join(f"\nnote: {n}" for n in said))
    if args.fuse_on == "logits":
        print("(video scores here are the mean of the frames' logits, as fused; score.py averages softmax scores,\n"
              " so a stream's video mAP here can differ from the one score.py printed)")

    fused_name = list(rows)[-1]
    classes = streams[0]["classes"]
    plot_confusion(rows[fused_name]["_confusion"], classes, f"{fused_name} video confusion", args.out / "confusion.png")
    inputs = [input_record(s) for s in streams]
    report = {"weights": weights, "fuse_on": args.fuse_on, "weights_tuned_on": tuned_on, "mAP": MAP_NOTE,
              "inputs": inputs, "videos_missing_per_stream": missing, "classes": classes, "notes": said,
              "rows": {name: {k: v for k, v in r.items() if not k.startswith("_")} for name, r in rows.items()}}
    atomic_write_json(args.out / "results.json", report)
    atomic_write_bytes(args.out / "results.md", (f"{table}\n\n{MAP_NOTE}\n\nweights {weights} on {args.fuse_on}\n"
                                                 + "".join(f"\nnote: {n}\n" for n in said)
                                                 + f"\ninputs:\n\n{inputs_table(inputs + (tuned_on or []))}\n").encode())
    print(f"wrote {args.out / 'results.md'}, results.json, confusion.png{replaced_note(replaced)}")
    return report


if __name__ == "__main__":
    main(get_args_parser().parse_args())
