"""A split packed in part (one --part of two never run) is not taken for the whole: refused, or marked everywhere."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import fuse
import score
import train
from conftest import PACK_ARGS, run_pack

TINY = ["--modality", "rgb", "--arch", "resnet18", "--input-size", "32", "--batch-size", "8", "--workers", "1",
        "--log-every", "1", "--val-every", "2", "--val-batches", "2", "--deterministic", "--lr", "0.01",
        "--max-iterations", "2"]
MISSING = r"incomplete split: \d of \d shard groups packed, part\(s\) 1 of 2 \(0..1\) have not finished"


@pytest.fixture(scope="module")
def half(synth, tmp_path_factory):
    """train and val, each packed by part 0 of 2 only."""
    out = tmp_path_factory.mktemp("half")
    for split in ("train", "val"):
        run_pack("--csv", synth / f"{split}.csv", "--videos", synth / "videos", "--out", out, "--workers", "2",
                 "--part", "0", "--num-parts", "2", *PACK_ARGS)
    return out


def test_train_refuses_an_incomplete_split_and_allow_partial_marks_the_run(half, tmp_path):
    args = ["--data", str(half), *TINY, "--save-dir", str(tmp_path / "run")]
    with pytest.raises(SystemExit, match=f"error: {half}/train: {MISSING}.*--allow-partial"):
        train.main(train.get_args_parser().parse_args(args))
    assert not (tmp_path / "run" / "latest.pt").exists()
    summary = train.main(train.get_args_parser().parse_args(args + ["--allow-partial"]))
    assert len(summary["partial"]) == 2  # train and val
    log = (tmp_path / "run" / "train.log").read_text()
    assert all(f"note: {half}/{split}: incomplete split" in log for split in ("train", "val"))
    assert "validation at 2: frame top-1" in log and f"; partial: {half}/val: incomplete split" in log
    ckpt = torch.load(tmp_path / "run" / "latest.pt", map_location="cpu", weights_only=True)
    assert "part(s) 1 of 2" in ckpt["data"]["incomplete"] and "incomplete split" in ckpt["history"]["val"][-1][1]["partial"]


def test_score_refuses_an_incomplete_split_and_allow_partial_marks_every_output(half, tmp_path, capsys):
    train.main(train.get_args_parser().parse_args(["--data", str(half), *TINY, "--save-dir", str(tmp_path / "run"),
                                                   "--allow-partial"]))
    out = tmp_path / "rgb.npz"
    args = ["--checkpoint", str(tmp_path / "run" / "latest.pt"), "--data", str(half), "--out", str(out), "--workers", "1"]
    with pytest.raises(SystemExit, match=f"error: {half}/val: {MISSING}.*--allow-partial"):
        score.main(score.get_args_parser().parse_args(args))
    assert not out.exists()
    score.main(score.get_args_parser().parse_args(args + ["--allow-partial"]))
    printed = capsys.readouterr().out
    meta = json.loads(str(np.load(out)["meta"]))
    assert meta["coverage"]["partial"] and "part(s) 1 of 2" in meta["coverage"]["partial_note"]
    assert "part(s) 1 of 2" in meta["scored"]["incomplete"]
    assert "part(s) 1 of 2" in json.loads(out.with_suffix(".json").read_text())["partial"]
    assert "mAP" in printed and "packed; incomplete split" in printed.split("mAP")[-1]  # beside the figures
    fuse.main(fuse.get_args_parser().parse_args([str(out), "--out", str(tmp_path / "results")]))
    assert "part(s) 1 of 2" in capsys.readouterr().out
    assert "part(s) 1 of 2" in (tmp_path / "results" / "results.md").read_text()
    assert any("part(s) 1 of 2" in note for note in json.loads((tmp_path / "results" / "results.json").read_text())["notes"])
