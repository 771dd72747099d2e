"""Score files, results and predictions know where they come from, and nothing is overwritten unasked (issue 21)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import fuse
import predict
import score
import train
from conftest import DATA, ROOT, copy_with_test_split
from pack.files import file_sha256
from pack.manifest import load_manifest, split_identity
from pack.synth import write_video


@pytest.fixture(scope="module")
def tiny(data, tmp_path_factory) -> dict:
    """Both streams trained 2 iterations (their figures do not matter here), and their val scores."""
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for modality in ("rgb", "flow"):
        train.main(train.get_args_parser().parse_args(
            ["--data", str(data), "--modality", modality, "--arch", "resnet18", "--input-size", "32", "--batch-size", "4",
             "--workers", "1", "--max-iterations", "2", "--val-every", "2", "--val-batches", "1",
             "--save-dir", str(root / modality)]))
        out[modality] = root / modality / "latest.pt"
        out[f"{modality}_npz"] = root / f"{modality}_val.npz"
        run_score("--checkpoint", out[modality], "--data", data, "--out", out[f"{modality}_npz"])
    return out


def run_score(*argv) -> dict:
    return score.main(score.get_args_parser().parse_args([str(a) for a in ["--workers", "1", "--backend", "cpu", *argv]]))


def run_fuse(*argv) -> dict:
    return fuse.main(fuse.get_args_parser().parse_args([str(a) for a in argv]))


def run_predict(*argv) -> dict:
    return predict.main(predict.get_args_parser().parse_args([str(a) for a in argv]))


def meta_of(path) -> dict:
    return json.loads(str(np.load(path)["meta"]))


# ---------------------------------------------------------------- score.py


def test_a_score_file_records_its_checkpoint_and_splits_also_on_other_data(data, synth, tiny, tmp_path):
    ckpt = torch.load(tiny["rgb"], map_location="cpu", weights_only=True)
    meta = meta_of(tiny["rgb_npz"])
    assert meta["checkpoint_sha256"] == file_sha256(tiny["rgb"]) and meta["iteration"] == ckpt["iteration"] == 2
    assert meta["trained_on"] == ckpt["data"] and meta["trained_on"]["split"] == "train"
    assert meta["scored"] == split_identity(data, load_manifest(data), "val")
    assert meta["tta"] == "none" and meta["class_topk"] == 0 and meta["other_pack_params"] is None
    # another DATA (a test split packed later, into a copy): normal, and written down
    copy = copy_with_test_split(data, synth, tmp_path)
    run_score("--checkpoint", tiny["rgb"], "--data", copy, "--split", "test", "--out", tmp_path / "t.npz",
              "--tta", "flip", "--class-topk", "2")
    other = meta_of(tmp_path / "t.npz")
    assert other["scored"] == split_identity(copy, load_manifest(copy), "test") and other["scored"]["data"] == str(copy)
    assert other["trained_on"] == ckpt["data"] and other["tta"] == "flip" and other["class_topk"] == 2


def test_inputs_packed_otherwise_than_trained_on_are_refused_unless_allowed(data, tiny, tmp_path, capsys):
    ckpt = torch.load(tiny["rgb"], map_location="cpu", weights_only=True)
    ckpt["pack_params"] = {**ckpt["pack_params"], "short_side": 96}  # trained on data packed at short side 96
    torch.save(ckpt, tmp_path / "other.pt")
    common = ["--checkpoint", tmp_path / "other.pt", "--data", data, "--out", tmp_path / "s.npz"]
    with pytest.raises(SystemExit, match=r"packed with other parameters .*\(short_side 96 vs 72\).*--allow-other-params"):
        run_score(*common)
    assert not (tmp_path / "s.npz").exists()
    run_score(*common, "--allow-other-params")
    note = "other pack parameters than trained on: short_side 96 vs 72"
    assert note in capsys.readouterr().out.splitlines()[-1]  # beside the figures
    assert meta_of(tmp_path / "s.npz")["other_pack_params"] == note
    assert json.loads((tmp_path / "s.json").read_text())["other_pack_params"] == note
    report = run_fuse(tmp_path / "s.npz", tiny["flow_npz"], "--out", tmp_path / "f")
    assert any(note in n for n in report["notes"]) and note in (tmp_path / "f" / "results.md").read_text()


@pytest.mark.parametrize("backend", ["cpu", "dali"])
def test_a_split_where_nothing_is_readable_is_a_clear_error(data, tiny, tmp_path, backend):
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    for piece in load_manifest(copy)["splits"]["val"]["shards"]["rgb"]:
        (copy / piece["tar"]).write_bytes(b"")  # every shard zero bytes
    with pytest.raises(SystemExit, match=r"(?s)0 of 72 samples could be read.*pack.verify") as e:
        score.main(score.get_args_parser().parse_args(
            ["--checkpoint", str(tiny["rgb"]), "--data", str(copy), "--out", str(tmp_path / "s.npz"), "--workers", "1",
             "--backend", backend, "--allow-partial"]))
    assert "shard-" in str(e.value.code) and not (tmp_path / "s.npz").exists() and not (tmp_path / "s.json").exists()


def test_score_outputs_are_never_overwritten_unasked_nor_an_input(data, tiny, tmp_path, capsys):
    common = ["--checkpoint", tiny["rgb"], "--data", data]
    out = tmp_path / "s.npz"
    shutil.copy(tiny["rgb_npz"], out)
    with pytest.raises(SystemExit, match=r"--out .*s.npz exists .*--overwrite"):
        run_score(*common, "--out", out)
    (tmp_path / "r.json").write_text("{}")
    with pytest.raises(SystemExit, match=r"--results-json .*r.json exists"):
        run_score(*common, "--out", tmp_path / "new.npz", "--results-json", tmp_path / "r.json")
    for inputs in (tiny["rgb"], tiny["rgb"].parent / "ckpt-00000002.pt", data / "manifest.json"):  # latest.pt's link too
        with pytest.raises(SystemExit, match="is an input of this run"):
            run_score(*common, "--out", inputs, "--results-json", tmp_path / "x.json", "--overwrite")
    with pytest.raises(SystemExit, match="are one file"):
        run_score(*common, "--out", tmp_path / "a.json")  # its result JSON would be a.json too
    before = file_sha256(out)
    run_score(*common, "--out", out, "--overwrite", "--tta", "flip")
    assert "--overwrite: replaced" in capsys.readouterr().out and file_sha256(out) != before
    assert meta_of(out)["tta"] == "flip"


# ---------------------------------------------------------------- fuse.py


def test_fuse_refuses_scores_of_other_splits_or_without_provenance(data, tiny, tmp_path, capsys):
    flow_train = tmp_path / "flow_train.npz"
    run_score("--checkpoint", tiny["flow"], "--data", data, "--split", "train", "--out", flow_train)
    with pytest.raises(SystemExit, match=r"different data or splits .*split val .*split train.*--allow-mixed"):
        run_fuse(tiny["rgb_npz"], flow_train, "--out", tmp_path / "refused")
    assert not (tmp_path / "refused" / "results.json").exists()
    capsys.readouterr()
    report = run_fuse(tiny["rgb_npz"], flow_train, "--allow-mixed", "--out", tmp_path / "mixed")
    said = "mixed inputs, fused anyway (--allow-mixed)"
    assert said in capsys.readouterr().out and any(n.startswith(said) for n in report["notes"])
    assert said in (tmp_path / "mixed" / "results.md").read_text()
    assert any(n.startswith(said) for n in json.loads((tmp_path / "mixed" / "results.json").read_text())["notes"])
    # the note about videos one stream lacks is in the files too (the train videos are not in val)
    assert any(n.startswith("RGB lacks 30 video(s)") for n in report["notes"])
    assert "RGB lacks 30 video(s)" in (tmp_path / "mixed" / "results.md").read_text()
    # a score file of an earlier score.py (no record of its split)
    z = dict(np.load(tiny["flow_npz"]))
    meta = json.loads(str(z["meta"]))
    del meta["scored"]
    np.savez(tmp_path / "old_flow.npz", **{**z, "meta": np.array(json.dumps(meta))})
    with pytest.raises(SystemExit, match=r"old_flow.npz do\(es\) not record the split .*score it again"):
        run_fuse(tiny["rgb_npz"], tmp_path / "old_flow.npz", "--out", tmp_path / "old")


def test_results_record_every_input_and_two_rgb_files_are_two_rows(data, tiny, tmp_path):
    flip = tmp_path / "rgb_flip.npz"
    run_score("--checkpoint", tiny["rgb"], "--data", data, "--out", flip, "--tta", "flip")
    report = run_fuse(tiny["rgb_npz"], flip, tiny["flow_npz"], "--out", tmp_path / "r")
    assert list(report["rows"]) == ["RGB (rgb_val)", "RGB (rgb_flip)", "Flow", "RGB+RGB+FLOW"]
    alone = run_fuse(flip, "--out", tmp_path / "alone")["rows"]["RGB"]
    assert report["rows"]["RGB (rgb_flip)"]["video_top1"] == alone["video_top1"]  # not overwritten by the other RGB
    assert report["rows"]["RGB (rgb_flip)"]["frame_top1"] == alone["frame_top1"]
    md = (tmp_path / "r" / "results.md").read_text()
    plan = load_manifest(data)["splits"]["val"]["plan"]
    for record, path, ckpt, tta in zip(report["inputs"], (tiny["rgb_npz"], flip, tiny["flow_npz"]),
                                       (tiny["rgb"], tiny["rgb"], tiny["flow"]), ("none", "flip", "none")):
        assert record["path"] == str(path) and record["sha256"] == file_sha256(path)
        assert record["checkpoint_sha256"] == file_sha256(ckpt) and record["tta"] == tta
        assert record["split"] == "val" and record["plan"] == plan and record["data"] == str(data)
        assert record["sha256"] in md and record["checkpoint_sha256"] in md
    assert json.loads((tmp_path / "r" / "results.json").read_text())["inputs"] == report["inputs"]
    with pytest.raises(SystemExit, match="hold the same scores"):
        run_fuse(flip, shutil.copy(flip, tmp_path / "copy.npz"), "--out", tmp_path / "twice")


def test_fuse_results_are_never_overwritten_unasked_nor_an_input(tiny, tmp_path, capsys):
    out = tmp_path / "results"
    run_fuse(tiny["rgb_npz"], tiny["flow_npz"], "--out", out)
    with pytest.raises(SystemExit, match=r"--out .*results.md exists .*--overwrite"):
        run_fuse(tiny["rgb_npz"], tiny["flow_npz"], "--out", out)
    run_fuse(tiny["rgb_npz"], tiny["flow_npz"], "--out", out, "--overwrite")
    assert "--overwrite: replaced" in capsys.readouterr().out
    shutil.copy(tiny["flow_npz"], out / "results.json")  # an input named like an output
    with pytest.raises(SystemExit, match="is an input of this run"):
        run_fuse(tiny["rgb_npz"], out / "results.json", "--out", out, "--overwrite")
    assert (out / "results.json").read_bytes() == tiny["flow_npz"].read_bytes()


# ---------------------------------------------------------------- predict.py


def test_timelines_of_two_videos_of_one_name_are_two_files_in_the_folder(tiny, tmp_path, monkeypatch):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        shutil.copy(DATA / "g1.avi", tmp_path / folder / "clip.avi")
    videos = [tmp_path / "a" / "clip.avi", tmp_path / "b" / "clip.avi"]
    outcome = run_predict(*videos, "--rgb", tiny["rgb"], "--timeline", tmp_path / "tl", "--out", tmp_path / "p.json")
    pngs = sorted((tmp_path / "tl").iterdir())
    assert len(pngs) == 2 and all(p.name.startswith("clip-") and p.suffix == ".png" for p in pngs)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["clip.avi"]  # nothing beside the video
    report = json.loads((tmp_path / "p.json").read_text())
    assert len(report["results"]) == 2 and report["report"]["failed"] == {}
    assert sorted(report["report"]["timelines"].values()) == [str(p) for p in pngs]
    monkeypatch.chdir(tmp_path)  # relative inputs: the same names, in the same folder
    run_predict("a/clip.avi", "b/clip.avi", "--rgb", tiny["rgb"], "--timeline", "tl2")
    assert sorted(p.name for p in (tmp_path / "tl2").iterdir()) == [p.name for p in pngs]
    assert len(outcome["results"]) == 2


def test_a_one_frame_video_needs_no_flow_for_rgb(tiny, tmp_path):
    write_video(tmp_path / "one.mp4", [np.full((72, 96, 3), 90, np.uint8)], 25, "libx264")
    rgb = run_predict(tmp_path / "one.mp4", "--rgb", tiny["rgb"])
    assert rgb["report"]["failed"] == {} and rgb["results"]["one"]["frames"] == 1
    assert len(rgb["results"]["one"]["streams"]["RGB"]["frames"]) == 1
    flow = run_predict(tmp_path / "one.mp4", "--flow", tiny["flow"])["report"]["failed"]
    assert flow == {str(tmp_path / "one.mp4"): "too short: 1 frame, flow needs 2"}
    both = run_predict(tmp_path / "one.mp4", "--rgb", tiny["rgb"], "--flow", tiny["flow"])["report"]["failed"]
    assert both[str(tmp_path / "one.mp4")].endswith("the RGB stream alone (--rgb without --flow) can predict it")


def test_predict_outputs_are_never_overwritten_unasked_nor_an_input(tiny, tmp_path):
    video = shutil.copy(DATA / "g1.avi", tmp_path / "g1.avi")
    (tmp_path / "p.json").write_text("{}")
    with pytest.raises(SystemExit, match=r"--out .*p.json exists .*--overwrite"):
        run_predict(video, "--rgb", tiny["rgb"], "--out", tmp_path / "p.json")
    with pytest.raises(SystemExit, match="is an input of this run"):
        run_predict(video, "--rgb", tiny["rgb"], "--out", video, "--overwrite")
    with pytest.raises(SystemExit, match="are one file"):
        run_predict(video, "--rgb", tiny["rgb"], "--timeline", tmp_path, "--out", tmp_path / "g1.png", "--overwrite")
    run_predict(video, "--rgb", tiny["rgb"], "--timeline", tmp_path / "tl")
    with pytest.raises(SystemExit, match=r"--timeline .*g1.png exists"):
        run_predict(video, "--rgb", tiny["rgb"], "--timeline", tmp_path / "tl")
    run_predict(video, "--rgb", tiny["rgb"], "--timeline", tmp_path / "tl", "--out", tmp_path / "p.json", "--overwrite")
    assert "g1" in json.loads((tmp_path / "p.json").read_text())["results"]


def test_predict_writes_what_it_has_when_stopped(tiny, tmp_path):
    for k in range(40):
        shutil.copy(DATA / "g1.avi", tmp_path / f"clip{k:02d}.avi")
    out = tmp_path / "p.json"
    run = subprocess.Popen([sys.executable, "predict.py", str(tmp_path), "--rgb", str(tiny["rgb"]), "--out", str(out)],
                           cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                           env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in run.stdout:
        if "(16 frames;" in line:  # the first video is predicted
            run.send_signal(signal.SIGINT)
            break
    run.stdout.read()
    assert run.wait(timeout=120) != 0
    doc = json.loads(out.read_text())
    assert 1 <= len(doc["results"]) < 40 and doc["report"]["stopped"].startswith("stopped after ")
    assert "KeyboardInterrupt" in doc["report"]["stopped"]
