"""The whole pipeline on the tiny synthetic set: pack -> train both streams -> score -> fuse."""
from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch

import fuse
import score
from conftest import copy_with_test_split, run_pack
from pack.manifest import load_manifest


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
    copy = copy_with_test_split(data, synth, tmp_path)
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


def run_score(*argv) -> dict:
    return score.main(score.get_args_parser().parse_args([str(a) for a in argv]))


def test_a_split_scored_in_part_is_refused_unless_allowed(data, trained, tmp_path, capsys):
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    split = load_manifest(copy)["splits"]["val"]
    piece = split["shards"]["rgb"][0]
    tar = copy / piece["tar"]
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    common = ["--checkpoint", trained["rgb"] / "latest.pt", "--data", copy, "--split", "val", "--workers", "1"]
    out = tmp_path / "scores.npz"
    for backend in ("cpu", "dali"):
        with pytest.raises(SystemExit) as e:
            run_score(*common, "--backend", backend, "--out", out)
        message = str(e.value.code)
        assert re.search(rf"partial: (\d+) of {split['samples']} samples, (\d+) of {len(split['video_info'])} videos",
                         message), message
        assert tar.name in message and "pack.verify" in message and not out.exists()
    figures = run_score(*common, "--out", out, "--allow-partial")
    printed = capsys.readouterr().out
    lost = int(re.search(r"(\d+) sample\(s\) lost", printed).group(1))
    note = f"partial: {split['samples'] - lost} of {split['samples']} samples"
    assert note in printed.splitlines()[-1] and figures["frames"] == split["samples"] - lost
    assert json.loads(out.with_suffix(".json").read_text())["partial"].startswith(note)
    assert json.loads(str(np.load(out)["meta"]))["coverage"]["partial"]
    report = fuse.main(fuse.get_args_parser().parse_args([str(out), str(trained["flow_npz"]), "--out", str(tmp_path / "f")]))
    assert any(n.startswith("RGB: scored on part of the split (" + note) for n in report["notes"])
    assert note in (tmp_path / "f" / "results.md").read_text()


def test_non_finite_weights_and_scores_are_refused(data, trained, tmp_path):
    ckpt = torch.load(trained["rgb"] / "latest.pt", map_location="cpu", weights_only=True)
    common = ["--data", data, "--split", "val", "--workers", "1", "--out", tmp_path / "s.npz"]
    nan = {**ckpt, "model": {**ckpt["model"], "fc.bias": torch.full_like(ckpt["model"]["fc.bias"], float("nan"))}}
    torch.save(nan, tmp_path / "nan.pt")
    with pytest.raises(SystemExit, match="holds non-finite weights \\(fc.bias\\)"):
        run_score("--checkpoint", tmp_path / "nan.pt", *common)
    # finite weights whose logits overflow: inf logits, NaN softmax
    huge = {**ckpt, "model": {**ckpt["model"], "fc.weight": ckpt["model"]["fc.weight"].sign() * 3e38}}
    torch.save(huge, tmp_path / "huge.pt")
    with pytest.raises(SystemExit, match=r"(\d+) of 72 frame scores are not finite"):
        run_score("--checkpoint", tmp_path / "huge.pt", *common)
    assert not (tmp_path / "s.npz").exists()
    figures = run_score("--checkpoint", tmp_path / "huge.pt", *common, "--allow-non-finite")
    assert figures["frames_non_finite"] > 0 and figures["frame_top1"] <= 1 - figures["frames_non_finite"] / 72

    def refuse(constant):
        raise ValueError(constant)

    json.loads((tmp_path / "s.json").read_text(), parse_constant=refuse)  # valid JSON: no bare NaN


def test_outputs_are_checked_before_any_work(data, trained, tmp_path):
    (tmp_path / "a_file").write_text("")
    (tmp_path / "a_folder").mkdir()
    common = ["--checkpoint", trained["rgb"] / "latest.pt", "--data", data, "--workers", "1"]
    with pytest.raises(SystemExit, match="--out .*a_folder is a folder"):
        run_score(*common, "--out", tmp_path / "a_folder")
    with pytest.raises(SystemExit, match="a_file is a file, not a folder"):
        run_score(*common, "--out", tmp_path / "a_file" / "s.npz")
    with pytest.raises(SystemExit, match="--results-json .*a_file is a file, not a folder"):
        run_score(*common, "--out", tmp_path / "s.npz", "--results-json", tmp_path / "a_file" / "r.json")
    (tmp_path / "clips" / "walk").mkdir(parents=True)
    with pytest.raises(SystemExit, match="--out .*a_file is a file, not a folder"):
        run_pack("--folders", tmp_path / "clips", "--split", "train", "--out", tmp_path / "a_file" / "d")
