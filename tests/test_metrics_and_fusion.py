"""Metrics against hand-computed cases, fusion on constructed scores, score files and result JSON."""
from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest

import fuse
import metrics


def test_topk_with_ties_counts_against_the_prediction():
    scores = np.array([[0.5, 0.5, 0.0],   # tie between true class 0 and class 1: not top-1, is top-2
                       [0.2, 0.7, 0.1],   # true 1: top-1
                       [0.6, 0.3, 0.1],   # true 2: third
                       [1 / 3, 1 / 3, 1 / 3]])  # all tied: never right within top-2
    labels = np.array([0, 1, 2, 0])
    assert metrics.true_class_rank(scores, labels).tolist() == [1, 0, 2, 2]
    assert metrics.topk_accuracy(scores, labels, 1) == 0.25
    assert metrics.topk_accuracy(scores, labels, 2) == 0.5
    assert metrics.topk_accuracy(scores, labels, 3) == 1.0
    assert metrics.mean_error(0.25, 1.0) == 0.375


def test_average_precision_by_hand():
    # ranked: +, -, +, -  -> precision at the positives 1/1 and 2/3: AP = (1 + 2/3) / 2
    assert metrics.average_precision(np.array([0.9, 0.8, 0.7, 0.1]), np.array([1, 0, 1, 0], bool)) == pytest.approx(5 / 6)
    # a tie between a positive and a negative is one threshold: precision 1/2 there
    assert metrics.average_precision(np.array([0.5, 0.5]), np.array([1, 0], bool)) == pytest.approx(0.5)
    # a class with no positive has no AP and is left out of the mean
    scores = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.6, 0.4, 0.0]])
    mAP, left_out = metrics.mean_average_precision(scores, np.array([0, 1, 0]))
    assert left_out == 1 and mAP == pytest.approx((1.0 + 1.0) / 2)


def test_video_scores_mean_and_class_topk():
    frames = np.array([[0.9, 0.1], [0.1, 0.9], [0.2, 0.8], [0.6, 0.4]])
    videos = np.array(["b", "a", "a", "a"])
    ids, mean = metrics.video_scores(frames, videos)
    assert ids.tolist() == ["a", "b"]
    assert mean[0] == pytest.approx([0.3, 0.7]) and mean[1] == pytest.approx([0.9, 0.1])
    _, top1 = metrics.video_scores(frames, videos, class_topk=1)
    assert top1[0] == pytest.approx([0.6, 0.9])


def test_per_class_accuracy_and_confusion():
    scores = np.array([[0.9, 0.1, 0], [0.2, 0.8, 0], [0.7, 0.3, 0]])
    labels = np.array([0, 1, 1])
    acc = metrics.per_class_accuracy(scores, labels)
    assert acc[0] == 1.0 and acc[1] == 0.5 and np.isnan(acc[2])
    assert metrics.confusion_matrix(scores, labels).tolist() == [[1, 0, 0], [1, 1, 0], [0, 0, 0]]


def write_scores(path, videos: dict[str, tuple[int, list[float]]], modality: str, classes=("a", "b"), split="val",
                 plan=None, compressed=False, **meta):
    """A score.py-format file with one frame per video, scored on `split` (of plan `plan`, default one per split)."""
    keys = sorted(videos)
    (np.savez_compressed if compressed else np.savez)(path, keys=np.array([f"{v}/000000" for v in keys]), videos=np.array(keys), frames=np.zeros(len(keys), int),
             labels=np.array([videos[v][0] for v in keys]), scores=np.array([videos[v][1] for v in keys], np.float32),
             logits=np.log(np.array([videos[v][1] for v in keys], np.float32)), classes=np.array(classes),
             meta=np.array(json.dumps({"modality": modality, "split": split, "checkpoint": f"{modality}.pt",
                                       "scored": {"data": "data", "split": split, "plan": plan or f"plan-{split}"},
                                       **meta})))
    return path


def run_fuse(*argv) -> dict:
    return fuse.main(fuse.get_args_parser().parse_args([str(a) for a in argv]))


def test_fusion_weights_change_the_result_as_expected(tmp_path):
    # RGB is sure and wrong on v1, right on v2; flow is mildly right on v1, mildly wrong on v2.
    rgb = write_scores(tmp_path / "rgb.npz", {"v1": (1, [0.9, 0.1]), "v2": (0, [0.9, 0.1])}, "rgb")
    flow = write_scores(tmp_path / "flow.npz", {"v1": (1, [0.3, 0.7]), "v2": (0, [0.4, 0.6])}, "flow")
    equal = run_fuse(rgb, flow, "--fuse-on", "scores", "--out", tmp_path / "a")["rows"]
    assert equal["RGB"]["video_top1"] == 0.5 and equal["Flow"]["video_top1"] == 0.5
    assert equal["RGB+FLOW"]["video_top1"] == 0.5  # RGB's confidence wins v1 and v2 alike
    flow_heavy = run_fuse(rgb, flow, "--fuse-on", "scores", "--weights", "1", "3", "--out", tmp_path / "b")["rows"]["RGB+FLOW"]
    # v1: (0.9 + 3 * 0.3) / 4 = 0.45 for a -> b wins (right); v2: (0.9 + 1.2) / 4 = 0.525 for a (right)
    assert flow_heavy["video_top1"] == 1.0
    only_flow = run_fuse(rgb, flow, "--fuse-on", "scores", "--weights", "0", "1", "--out", tmp_path / "c")["rows"]["RGB+FLOW"]
    assert only_flow["video_top1"] == equal["Flow"]["video_top1"]
    assert (tmp_path / "b" / "results.md").read_text().startswith("| stream |")
    assert (tmp_path / "b" / "confusion.png").stat().st_size > 1000
    report = json.loads((tmp_path / "b" / "results.json").read_text())
    assert report["rows"]["RGB+FLOW"]["per_class_accuracy"] == [1.0, 1.0]


def test_logit_fusion_lets_a_stream_veto_what_it_is_sure_is_wrong(tmp_path):
    # RGB leans to class a; flow is sure it is not a. Averaged probabilities follow RGB (a),
    # averaged logits (a product of probabilities, the default) follow the veto (b, right).
    rgb = write_scores(tmp_path / "rgb.npz", {"v1": (1, [0.8, 0.15, 0.05])}, "rgb", classes=("a", "b", "c"))
    flow = write_scores(tmp_path / "flow.npz", {"v1": (1, [0.001, 0.5, 0.499])}, "flow", classes=("a", "b", "c"))
    assert run_fuse(rgb, flow, "--fuse-on", "scores", "--out", tmp_path / "s")["rows"]["RGB+FLOW"]["video_top1"] == 0.0
    assert run_fuse(rgb, flow, "--out", tmp_path / "l")["rows"]["RGB+FLOW"]["video_top1"] == 1.0


def test_videos_missing_from_a_stream_are_counted_and_fused_from_what_is_there(tmp_path):
    rgb = write_scores(tmp_path / "rgb.npz", {"v1": (0, [0.8, 0.2]), "v2": (1, [0.3, 0.7])}, "rgb")
    flow = write_scores(tmp_path / "flow.npz", {"v1": (0, [0.6, 0.4])}, "flow")
    report = run_fuse(rgb, flow, "--out", tmp_path)
    assert report["videos_missing_per_stream"] == {"RGB": 0, "Flow": 1}
    assert report["rows"]["RGB+FLOW"]["videos"] == 2 and report["rows"]["RGB+FLOW"]["video_top1"] == 1.0
    note = "Flow lacks 1 video(s) that another stream has; fused from what is there"
    assert note in report["notes"] and f"note: {note}" in (tmp_path / "results.md").read_text()
    assert note in json.loads((tmp_path / "results.json").read_text())["notes"]


def test_streams_of_one_modality_and_one_file_name_get_their_own_rows(tmp_path):
    for folder, score in (("a", [0.8, 0.2]), ("b", [0.3, 0.7])):
        (tmp_path / folder).mkdir()
        write_scores(tmp_path / folder / "rgb.npz", {"v1": (0, score)}, "rgb")
    rows = run_fuse(tmp_path / "a" / "rgb.npz", tmp_path / "b" / "rgb.npz", "--out", tmp_path / "o")["rows"]
    assert list(rows) == [f"RGB ({tmp_path / 'a' / 'rgb.npz'})", f"RGB ({tmp_path / 'b' / 'rgb.npz'})", "RGB+RGB"]
    assert [r["video_top1"] for r in rows.values()] == [1.0, 0.0, 1.0]


def test_mismatched_classes_are_an_error(tmp_path):
    rgb = write_scores(tmp_path / "rgb.npz", {"v1": (0, [0.8, 0.2])}, "rgb")
    flow = write_scores(tmp_path / "flow.npz", {"v1": (0, [0.6, 0.4])}, "flow", classes=("a", "c"))
    with pytest.raises(SystemExit, match="another class list"):
        run_fuse(rgb, flow, "--out", tmp_path)


def test_search_weights_tunes_on_one_split_and_reports_on_another(tmp_path):
    tune = [write_scores(tmp_path / "rt.npz", {"t1": (1, [0.9, 0.1]), "t2": (0, [0.9, 0.1])}, "rgb", split="val"),
            write_scores(tmp_path / "ft.npz", {"t1": (1, [0.3, 0.7]), "t2": (0, [0.4, 0.6])}, "flow", split="val")]
    test = [write_scores(tmp_path / "r.npz", {"v1": (1, [0.9, 0.1]), "v2": (0, [0.9, 0.1])}, "rgb", split="test"),
            write_scores(tmp_path / "f.npz", {"v1": (1, [0.3, 0.7]), "v2": (0, [0.4, 0.6])}, "flow", split="test")]
    report = run_fuse(*test, "--search-weights", *tune, "--out", tmp_path / "o")
    assert report["weights"][0] == 1.0 and 2.0 < report["weights"][1] < 4.0  # flow must outweigh RGB here
    assert report["rows"]["RGB+FLOW"]["video_top1"] == 1.0
    with pytest.raises(SystemExit, match="another split"):
        run_fuse(*test, "--search-weights", *test, "--out", tmp_path / "p")


def test_non_finite_rows_count_as_wrong_everywhere():
    """NaN compares false with everything: without care a NaN row would rank its true class first."""
    nan, inf = float("nan"), float("inf")
    scores = np.array([[nan, nan, nan], [0.7, 0.2, 0.1], [inf, 0.0, 0.0], [0.1, 0.8, nan]])
    labels = np.array([0, 0, 0, 1])
    assert metrics.true_class_rank(scores, labels).tolist() == [3, 0, 3, 3]
    assert metrics.topk_accuracy(scores, labels, 1) == 0.25 and metrics.topk_accuracy(scores, labels, 3) == 0.25
    assert metrics.per_class_accuracy(scores, labels)[0] == pytest.approx(1 / 3)
    assert metrics.confusion_matrix(scores, labels).sum() == 1  # the finite row only
    # class 1's one positive (row 3) is non-finite: it ranks last, below three finite negatives... of which none score
    # for class 1 above it? they do, and it is tied with the other non-finite rows: AP = 1 / (the rows at or above it)
    mAP_, _ = metrics.mean_average_precision(scores, labels)
    assert 0 < mAP_ < 1
    s = metrics.summary(scores, labels, scores, labels)
    assert s["frames_non_finite"] == s["videos_non_finite"] == 3 and s["video_top1"] == 0.25


def test_every_json_written_is_valid_json(tmp_path):
    """A split without labels gives NaN figures: results.json must hold null there, not a bare NaN."""
    rgb = write_scores(tmp_path / "rgb.npz", {"v1": (-1, [0.8, 0.2]), "v2": (-1, [0.3, 0.7])}, "rgb")
    flow = write_scores(tmp_path / "flow.npz", {"v1": (-1, [0.6, 0.4]), "v2": (-1, [float("nan"), 0.4])}, "flow")
    run_fuse(rgb, flow, "--out", tmp_path / "out")
    text = (tmp_path / "out" / "results.json").read_text()

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    report = json.loads(text, parse_constant=refuse)
    assert report["rows"]["RGB"]["video_top1"] is None


def test_fuse_checks_its_output_folder_first(tmp_path):
    rgb = write_scores(tmp_path / "rgb.npz", {"v1": (0, [0.8, 0.2])}, "rgb")
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit, match="is a file, not a folder"):
        run_fuse(rgb, "--out", tmp_path / "a_file")


def activitynet_evaluation(result: dict, truth: dict[str, str]) -> float:
    """ActivityNet's eval_classification.py on a result JSON, its loops as written there (without pandas):
    per class, the submitted (video, score) pairs best first, a hit the first time a video of that class comes up,
    precision made non-increasing from the right (VOC 2011), summed at each change of recall."""
    classes = sorted(set(truth.values()))
    aps = []
    for c in classes:
        positives = [v for v, label in truth.items() if label == c]
        predictions = sorted(((entry["score"], v) for v, entries in result["results"].items() for entry in entries
                              if entry["label"] == c), key=lambda p: -p[0])
        locked, tp, fp = set(), [], []
        for _, v in predictions:
            hit = v in positives and v not in locked
            locked |= {v} if hit else set()
            tp.append(int(hit))
            fp.append(int(not hit))
        tp, fp = np.cumsum(tp, dtype=float), np.cumsum(fp, dtype=float)
        rec, prec = list(tp / len(positives)), list(tp / np.maximum(tp + fp, 1e-12))
        mprec, mrec = [0.0] + prec + [0.0], [0.0] + rec + [1.0]
        for i in range(len(mprec) - 2, -1, -1):
            mprec[i] = max(mprec[i], mprec[i + 1])
        aps.append(sum((mrec[i] - mrec[i - 1]) * mprec[i] for i in range(1, len(mrec)) if mrec[i] != mrec[i - 1]))
    return float(np.mean(aps))


def test_activitynet_map_is_the_official_evaluation_of_the_result_json():
    """The mAP published for Kinetics: ActivityNet's evaluation of the top-5 result JSON score.py writes. It differs
    from scikit-learn's AP over all scores (a class that a video ranks 6th is not submitted, and AP is interpolated)."""
    import score

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 20, 60)
    scores = rng.random((60, 20)) + 0.4 * np.eye(20)[labels]
    scores /= scores.sum(1, keepdims=True)
    classes = [f"class {c}" for c in range(20)]
    videos = [f"v{i:02d}" for i in range(60)]
    result = score.results_json(videos, scores, classes, {})
    official = activitynet_evaluation(result, {v: classes[y] for v, y in zip(videos, labels)})
    assert metrics.activitynet_map(scores, labels) == pytest.approx(official, abs=1e-12)
    figures = metrics.summary(scores, labels, scores, labels)
    assert figures["video_mAP_anet"] == pytest.approx(official)
    assert abs(figures["video_mAP_sklearn"] - official) > 0.01
    # by hand: class 0's two videos, submitted at ranks 1 and 3 of its three submissions -> interpolated (1 + 2/3) / 2;
    # class 1's one video does not submit it (top 1 only): AP 0
    hand = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3]])
    assert metrics.activitynet_map(hand, np.array([0, 1, 0]), top=1) == pytest.approx(((1 + 2 / 3) / 2 + 0) / 2)


def test_the_table_and_results_name_both_maps(tmp_path, capsys):
    rgb = write_scores(tmp_path / "rgb.npz", {"v1": (0, [0.8, 0.2]), "v2": (1, [0.3, 0.7]), "v3": (1, [0.6, 0.4])}, "rgb")
    report = run_fuse(rgb, "--out", tmp_path / "out")
    row = report["rows"]["RGB"]
    # on logits (the default) its result file would hold their softmax: the probabilities written
    assert row["video_mAP_anet"] == pytest.approx(metrics.activitynet_map(np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4]]),
                                                                          np.array([0, 1, 1])))
    assert set(row) >= {"video_mAP_anet", "video_mAP_sklearn"} and "ActivityNet's official" in report["mAP"]
    markdown = (tmp_path / "out" / "results.md").read_text()
    assert "| video_mAP_anet | video_mAP_sklearn |" in markdown and "scikit-learn's average_precision_score" in markdown
    assert "ActivityNet's official" in capsys.readouterr().out


def test_score_workers_default_fits_the_cores_it_may_use():
    """More DataLoader workers than cores draws torch's warning and slows the machine: on 1 core, score.py takes 1."""
    import subprocess
    import sys

    from conftest import ROOT

    code = ("import os, sys; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); import score; "
            "print(score.get_args_parser().parse_args(['--checkpoint', 'c', '--data', 'd', '--out', 'o']).workers)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "1"
    import score

    with pytest.raises(SystemExit):  # one usage line, not the DataLoader's ValueError after the model is loaded
        score.get_args_parser().parse_args(["--checkpoint", "c", "--data", "d", "--out", "o", "--workers", "-1"])


def test_score_files_that_do_not_fit_are_named_for_what_is_wrong(tmp_path):
    """Another class list names the classes; a file cut short is called cut short, a damaged one damaged (score.py
    writes compressed arrays: a flipped byte is a zlib error inside numpy), each in one line."""
    rgb = write_scores(tmp_path / "rgb.npz", {"v1": (0, [0.8, 0.1, 0.1]), "v2": (1, [0.2, 0.7, 0.1])}, "rgb",
                       classes=("a", "b", "c"), compressed=True)
    flow = write_scores(tmp_path / "flow.npz", {"v1": (0, [0.8, 0.1, 0.1]), "v2": (1, [0.2, 0.7, 0.1])}, "flow",
                        classes=("a", "c", "d"))
    with pytest.raises(SystemExit, match=r"another class list .*only in .*flow.npz: 'd'; only in .*rgb.npz: 'b'"):
        run_fuse(rgb, flow, "--out", tmp_path / "out")
    data = rgb.read_bytes()
    cut = tmp_path / "cut.npz"
    cut.write_bytes(data[:len(data) // 2])
    with pytest.raises(SystemExit, match="cut.npz is cut short"):
        run_fuse(cut, "--out", tmp_path / "out")
    with zipfile.ZipFile(rgb) as z:
        member = z.getinfo("scores.npy")
    damaged = tmp_path / "damaged.npz"
    middle = member.header_offset + 30 + len(member.filename) + member.compress_size // 2
    damaged.write_bytes(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:])
    with pytest.raises(SystemExit, match=r"damaged.npz is damaged: its bytes are not what score.py wrote \((error|BadZipFile)"):
        run_fuse(damaged, "--out", tmp_path / "out")


def test_one_checkpoint_scored_on_two_copies_of_the_data_and_fused_gets_a_note(tmp_path, capsys):
    videos = {"v1": (0, [0.8, 0.2]), "v2": (1, [0.3, 0.7])}
    same = {"checkpoint_sha256": "ab" * 32, "tta": "none", "class_topk": 0}
    a = write_scores(tmp_path / "a.npz", videos, "rgb", **same)
    b = write_scores(tmp_path / "b.npz", videos, "rgb", **same, data="copy")  # another DATA path: another file
    report = run_fuse(a, b, "--out", tmp_path / "out")
    note = ("RGB (a) and RGB (b) are one checkpoint (sha256 abababababab) scored on one split (plan plan-val) with the "
            "same views: fused, they are that stream with itself, weighed more, not two streams")
    assert note in report["notes"] and f"note: {note}" in capsys.readouterr().out
