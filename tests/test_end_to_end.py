"""The whole pipeline on the tiny synthetic set: pack -> train both streams -> score -> fuse."""
from __future__ import annotations

import csv
import json
import shutil

import numpy as np

import fuse
import score
from conftest import PACK_ARGS, run_pack


def test_two_streams_fused_beat_each_alone(trained, tmp_path):
    report = fuse.main(fuse.get_args_parser().parse_args(
        [str(trained["rgb_npz"]), str(trained["flow_npz"]), "--out", str(tmp_path)]))
    rows = report["rows"]
    assert list(rows) == ["RGB", "Flow", "RGB+FLOW"]
    fused = rows["RGB+FLOW"]["video_top1"]
    assert fused > max(rows["RGB"]["video_top1"], rows["Flow"]["video_top1"]) + 0.15
    assert fused >= 0.75
    assert rows["RGB+FLOW"]["videos"] == 12
    table = (tmp_path / "results.md").read_text()
    assert "| RGB+FLOW |" in table and "video_mAP" in table


def test_result_json_structure(trained):
    result = json.loads(trained["rgb_npz"].with_suffix(".json").read_text())
    assert set(result) == {"version", "external_data", "results"}
    assert len(result["results"]) == 12
    for youtube_id, top5 in result["results"].items():
        assert len(youtube_id) == 11  # Kinetics results are keyed by YouTube id
        assert len(top5) == 5 and [set(p) for p in top5] == [{"label", "score"}] * 5
        scores = [p["score"] for p in top5]
        assert scores == sorted(scores, reverse=True)


def test_a_split_without_labels_gives_predictions_only(data, synth, trained, tmp_path, capsys):
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    with open(synth / "val.csv") as f:
        rows = list(csv.DictReader(f))
    test_csv = tmp_path / "test.csv"
    test_csv.write_text("youtube_id,time_start,time_end,split\n" +
                        "".join(f"{r['youtube_id']},{r['time_start']},{r['time_end']},test\n" for r in rows))
    assert run_pack("--csv", test_csv, "--videos", synth / "videos", "--out", copy, "--workers", "2", *PACK_ARGS) == 0
    out = tmp_path / "test.npz"
    figures = score.main(score.get_args_parser().parse_args(
        ["--checkpoint", str(trained["rgb"] / "latest.pt"), "--data", str(copy), "--split", "test", "--out", str(out),
         "--workers", "1", "--tta", "flip"]))
    assert figures == {} and "predictions only" in capsys.readouterr().out
    z = np.load(out)
    assert (z["labels"] == -1).all() and len(set(z["videos"])) == 12
    assert len(json.loads(out.with_suffix(".json").read_text())["results"]) == 12


def test_test_time_views_average_over_crops_and_flips(data, trained, tmp_path, capsys):
    common = ["--checkpoint", str(trained["flow"] / "latest.pt"), "--data", str(data), "--split", "val", "--workers", "1"]
    centre = np.load(trained["flow_npz"])
    for tta in ("3crop", "10crop"):
        out = tmp_path / f"{tta}.npz"
        score.main(score.get_args_parser().parse_args([*common, "--out", str(out), "--tta", tta]))
        assert "not seen in every view" not in capsys.readouterr().out
        z = np.load(out)
        assert z["keys"].tolist() == centre["keys"].tolist()
        assert np.allclose(z["scores"].sum(1), 1.0, atol=1e-4)
        assert not np.allclose(z["scores"], centre["scores"])  # other views, other scores
        assert json.loads(str(z["meta"]))["tta"] == tta
