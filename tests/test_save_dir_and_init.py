"""train.py never overwrites a run unasked, and --init checks what it starts from (provenance, mirroring, finite weights)."""
from __future__ import annotations

import pickle
import shutil

import pytest
import torch

import train
from conftest import run_pack

TINY = ["--modality", "rgb", "--arch", "resnet18", "--input-size", "32", "--batch-size", "8", "--workers", "1",
        "--val-split", "", "--log-every", "2", "--deterministic", "--lr", "0.01"]


def run_train(*argv) -> dict:
    return train.main(train.get_args_parser().parse_args([str(a) for a in argv]))


def load(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    """A finished 4-iteration run: its folder, and the bytes of its checkpoints."""
    save = tmp_path_factory.mktemp("finished")
    run_train("--data", data, *TINY, "--max-iterations", "4", "--ckpt-every", "2", "--save-dir", save)
    return save


def test_a_fresh_run_refuses_a_folder_that_holds_a_run_and_overwrite_replaces_it(data, finished, tmp_path):
    save = tmp_path / "run"
    save.mkdir()
    for f in finished.iterdir():
        if f.is_file():
            (save / f.name).write_bytes(f.read_bytes())
    before = {f.name: f.read_bytes() for f in save.iterdir() if f.suffix == ".pt"}
    assert {"latest.pt", "best.pt"} <= set(before)
    with pytest.raises(SystemExit, match="holds a run .*--resume to continue it, --overwrite to replace it"):
        run_train("--data", data, *TINY, "--max-iterations", "2", "--save-dir", save)
    assert {f.name: f.read_bytes() for f in save.iterdir() if f.suffix == ".pt"} == before  # not a byte changed

    run_train("--data", data, *TINY, "--max-iterations", "2", "--seed", "1", "--save-dir", save, "--overwrite")
    assert load(save / "latest.pt")["iteration"] == 2 and load(save / "latest.pt")["args"]["seed"] == 1
    assert not (save / "ckpt-00000004.pt").exists()  # the old run's checkpoints are gone, not mixed in
    log = (save / "train.log").read_text()
    assert "--overwrite: removed the run that was in" in log and "it 4 " not in log  # its log went with it
    with pytest.raises(SystemExit, match="--resume continues the run in --save-dir, --overwrite replaces it"):
        run_train("--data", data, *TINY, "--max-iterations", "4", "--save-dir", save, "--overwrite", "--resume")


def test_a_fresh_run_refuses_a_folder_of_other_files_and_takes_one_whose_run_saved_nothing(data, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):  # --overwrite replaces a run, never files train.py did not write
        with pytest.raises(SystemExit, match="holds files train.py did not write \\(notes.txt\\)"):
            run_train("--data", data, *TINY, "--max-iterations", "2", "--save-dir", other, *extra)
    assert (other / "notes.txt").read_text() == "mine"

    failed = tmp_path / "failed"  # a run that stopped before its first checkpoint: its log only
    failed.mkdir()
    (failed / "train.log").write_text("an earlier start that saved nothing\n")
    run_train("--data", data, *TINY, "--max-iterations", "2", "--save-dir", failed)
    assert load(failed / "latest.pt")["iteration"] == 2


def test_init_from_the_folder_it_would_write_is_refused(data, finished, tmp_path):
    save = tmp_path / "run"
    save.mkdir()
    start = save / "best.pt"
    start.write_bytes((finished / "best.pt").read_bytes())
    for extra in ([], ["--overwrite"]):
        with pytest.raises(SystemExit, match="lies in --save-dir .* never writes over its own input"):
            run_train("--data", data, *TINY, "--max-iterations", "2", "--init", start, "--save-dir", save, *extra)
    assert start.read_bytes() == (finished / "best.pt").read_bytes()


def test_init_records_its_checkpoint_and_carries_no_flip(data, tmp_path):
    source = tmp_path / "source"
    run_train("--data", data, *TINY, "--max-iterations", "2", "--no-flip", "--save-dir", source)
    run_train("--data", data, "--modality", "rgb", "--input-size", "32", "--batch-size", "8", "--workers", "1",
              "--val-split", "", "--max-iterations", "2", "--init", source / "latest.pt", "--save-dir", tmp_path / "fine")
    fine = load(tmp_path / "fine" / "latest.pt")
    assert fine["args"]["arch"] == "resnet18"  # --init's architecture, not the default InceptionV3
    assert fine["args"]["no_flip"] is True and fine["init"]["no_flip"] is True  # still a --no-flip stream
    assert "--no-flip carried over from --init" in (tmp_path / "fine" / "train.log").read_text()
    from pack.files import file_sha256

    assert fine["init"]["sha256"] == file_sha256(source / "latest.pt")
    assert fine["init"]["data"] == load(source / "latest.pt")["data"] and fine["data"]["split"] == "train"
    assert fine["data"]["plan"] and fine["data"]["params"] == fine["pack_params"]


def test_init_refuses_what_is_not_a_whole_finite_train_checkpoint(data, finished, tmp_path):
    ckpt = load(finished / "latest.pt")
    bad = tmp_path / "bad.pt"
    common = ["--data", data, *TINY, "--max-iterations", "2", "--init", bad, "--save-dir", tmp_path / "run"]

    bad.write_bytes((finished / "latest.pt").read_bytes()[:5000])
    with pytest.raises(SystemExit, match="does not load .* cut short or damaged"):
        run_train(*common)
    torch.save(ckpt["model"], bad)
    with pytest.raises(SystemExit, match="is not a train.py checkpoint \\(a plain state_dict"):
        run_train(*common)
    with open(bad, "wb") as f:
        pickle.dump({"model": ckpt["model"], "args": argparse_like()}, f)
    with pytest.raises(SystemExit, match="is not a torch checkpoint file"):  # a legacy pickle
        run_train(*common)
    bad.write_bytes(bytes(range(256)) * 20)
    with pytest.raises(SystemExit, match="is not a torch checkpoint file"):
        run_train(*common)
    torch.save({**ckpt, "args": argparse_like()}, bad)  # a checkpoint holding an object: weights_only refuses it
    with pytest.raises(SystemExit, match="holds Python objects beyond tensors"):
        run_train(*common)
    nan = {**ckpt, "model": {**ckpt["model"], "fc.weight": torch.full_like(ckpt["model"]["fc.weight"], float("nan"))}}
    torch.save(nan, bad)
    with pytest.raises(SystemExit, match="holds non-finite weights \\(fc.weight\\)"):
        run_train(*common)
    assert not (tmp_path / "run" / "latest.pt").exists()


class ArgsLike:
    """An object that is not a tensor, a number or a string: a pickle of it can run code when loaded."""


def argparse_like() -> ArgsLike:
    return ArgsLike()


def test_init_and_resume_check_the_data_they_are_given(data, synth, finished, tmp_path):
    other = tmp_path / "other"  # the same videos packed at another short side
    assert run_pack("--csv", synth / "train.csv", "--videos", synth / "videos", "--out", other, "--workers", "1",
                    "--stride", "4", "--flow-len", "2", "--short-side", "48", "--shard-videos", "4", "--flow", "dis") == 0
    common = ["--data", other, *TINY, "--max-iterations", "2", "--init", finished / "latest.pt"]
    with pytest.raises(SystemExit, match="packed with other parameters .*short_side 72 vs 48.*--allow-other-params"):
        run_train(*common, "--save-dir", tmp_path / "a")
    run_train(*common, "--save-dir", tmp_path / "b", "--allow-other-params")
    assert load(tmp_path / "b" / "latest.pt")["init"]["other_params"] is True
    assert "going on (--allow-other-params)" in (tmp_path / "b" / "train.log").read_text()

    resumed = tmp_path / "resumed"
    run_train("--data", data, *TINY, "--max-iterations", "2", "--save-dir", resumed)
    with pytest.raises(SystemExit, match="another packed split .*resume with the data it was trained on"):
        run_train("--data", other, *TINY, "--max-iterations", "4", "--save-dir", resumed, "--resume")
    run_train("--data", data, *TINY, "--max-iterations", "4", "--save-dir", resumed, "--resume")
    assert load(resumed / "latest.pt")["iteration"] == 4


def test_flags_given_anew_on_resume_apply_from_there_or_are_refused(data, tmp_path):
    """--lr, --step-values, --gamma given on --resume rebuild the schedule at the resumed iteration (the weights differ
    from a resume without them, the learning rate is the new schedule's), the log says so, and the checkpoint
    records the values that ran. Flags that cannot apply are refused with the reason."""
    common = ["--data", data, *TINY, "--step-values", "100", "--keep", "10"]
    first = tmp_path / "first"
    run_train(*common, "--max-iterations", "4", "--save-dir", first)
    same, other = tmp_path / "same", tmp_path / "other"
    for save in (same, other):
        shutil.copytree(first, save)
    run_train(*common, "--max-iterations", "8", "--save-dir", same, "--resume")
    run_train(*common, "--max-iterations", "8", "--save-dir", other, "--resume", "--lr", "0.05",
              "--step-values", "6", "--gamma", "0.5")
    a, b = load(same / "latest.pt"), load(other / "latest.pt")
    assert any(not torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert b["args"]["lr"] == 0.05 and b["args"]["step_values"] == [6]
    assert [g["lr"] for g in b["optimizer"]["param_groups"]] == pytest.approx([0.025, 0.05, 0.025])  # dropped at 6
    assert "--resume: given anew, applied from iteration 4 on: --lr 0.05 (was 0.01), --max-iterations 8 (was 4), " \
           "--step-values [6] (was [100]), --gamma 0.5 (was 0.1); the learning rate now 0.05" in (other / "train.log").read_text()
    assert "--resume: given anew, applied from iteration 4 on: --max-iterations 8 (was 4); the learning rate now 0.01" \
           in (same / "train.log").read_text()
    assert a["args"]["step_values"] == [100]  # not given anew: the run's own, not the default
    with pytest.raises(SystemExit, match="--pretrained imagenet sets the weights a new run starts from"):
        run_train(*common, "--max-iterations", "12", "--save-dir", same, "--resume", "--pretrained", "imagenet")
    with pytest.raises(SystemExit, match="--max-iterations 6, but the run .* is at iteration 8 already"):
        run_train(*common, "--max-iterations", "6", "--save-dir", same, "--resume")
    with pytest.raises(SystemExit, match="--amp fp16, but the run was trained with --amp auto"):
        run_train(*common, "--max-iterations", "12", "--save-dir", same, "--resume", "--amp", "fp16")
    with pytest.raises(SystemExit, match="--seed 3, but the run was trained with --seed 0: its data order"):
        run_train(*common, "--max-iterations", "12", "--save-dir", same, "--resume", "--seed", "3")
    for flag, value in (("--lr", "nan"), ("--lr", "-1"), ("--gamma", "inf"), ("--step-values", "-5"),
                        ("--max-iterations", "0"), ("--momentum", "2")):
        with pytest.raises(SystemExit):  # argparse's one-line usage error, before any work
            run_train(*common, "--save-dir", same, "--resume", flag, value)


def test_a_finished_run_extended_records_what_an_unstopped_longer_run_does(data, tmp_path):
    """A run of 5 iterations logs its end at 5 (off the --log-every 2 grid); extended to 8, its records are those of
    an unstopped run of 8: the line at 6 holds the losses of 5 and 6."""
    common = ["--data", data, *TINY, "--val-split", "val", "--val-every", "4", "--val-batches", "1"]
    whole, extended = tmp_path / "whole", tmp_path / "extended"
    run_train(*common, "--max-iterations", "8", "--save-dir", whole)
    run_train(*common, "--max-iterations", "5", "--save-dir", extended)
    assert load(extended / "latest.pt")["history"]["train"][-1][0] == 5
    run_train(*common, "--max-iterations", "8", "--save-dir", extended, "--resume")
    a, b = load(whole / "latest.pt"), load(extended / "latest.pt")
    assert a["history"] == b["history"] and a["best"] == b["best"]
    assert "the log line and validation written at iteration 5 as the end of the shorter run are left out" in \
           (extended / "train.log").read_text()
