"""train.py: it learns, it resumes after kill -9, it runs under DDP, it refuses bad set-ups early."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import train
from conftest import ROOT, run_pack
from pack.manifest import load_manifest

TINY = ["--arch", "resnet18", "--input-size", "32", "--batch-size", "8", "--workers", "1", "--log-every", "2"]


def run_train(*argv) -> dict:
    return train.main(train.get_args_parser().parse_args([str(a) for a in argv]))


def final_checkpoint(save_dir):
    return torch.load(save_dir / "latest.pt", map_location="cpu", weights_only=True)


def test_streams_learn_their_half_of_the_label(trained):
    """RGB tells the colour, flow the direction (classes are sorted: colour-major, direction-minor)."""
    for modality, part in (("rgb", lambda y: y // 2), ("flow", lambda y: y % 2)):
        ckpt = final_checkpoint(trained[modality])
        losses = [loss for _, loss in ckpt["history"]["train"]]
        assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, f"{modality}: loss did not fall"
        scores = trained[f"{modality}_scores"]
        predicted, labels = torch.tensor(scores["scores"]).argmax(1), torch.tensor(scores["labels"])
        accuracy = (part(predicted) == part(labels)).float().mean().item()
        chance = 1 / 3 if modality == "rgb" else 1 / 2
        assert accuracy > chance + 0.3, f"{modality}: {accuracy:.2f} on its half of the label"


def test_kill_and_resume_ends_at_the_same_iteration_and_schedule(data, tmp_path):
    save = tmp_path / "run"
    args = [sys.executable, "train.py", "--data", str(data), "--modality", "rgb", *TINY, "--max-iterations", "40",
            "--step-values", "12", "30", "--lr", "0.01", "--ckpt-every", "4", "--val-every", "20", "--val-batches", "2",
            "--save-dir", str(save)]
    proc = subprocess.Popen(args, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(save.glob("ckpt-0000001[26].pt")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(save / "latest.pt", map_location="cpu", weights_only=True)["iteration"]
    assert 8 <= killed_at < 40, "the kill should land mid-run"

    done = subprocess.run(args + ["--resume"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    ckpt = final_checkpoint(save)
    assert ckpt["iteration"] == 40 and ckpt["scheduler"]["last_epoch"] == 40
    assert ckpt["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.01 * 0.1 * 0.1)
    assert ckpt["optimizer"]["param_groups"][1]["lr"] == pytest.approx(0.02 * 0.1 * 0.1)  # biases at 2x
    assert f"resumed from iteration {killed_at}" in (save / "train.log").read_text()
    logged = [it for it, _ in ckpt["history"]["train"]]
    assert logged[-1] == 40 and all(b > a for a, b in zip(logged, logged[1:])), "each iteration once"


def test_a_broken_checkpoint_falls_back_to_the_previous(data, tmp_path):
    save = tmp_path / "run"
    common = ["--data", data, "--modality", "rgb", *TINY, "--ckpt-every", "4", "--val-split", "", "--save-dir", save]
    run_train(*common, "--max-iterations", "12")
    latest = save / "latest.pt"
    latest.write_bytes(latest.read_bytes()[:1000])  # truncated in place (ckpt-12 shares its bytes)
    run_train(*common, "--max-iterations", "16", "--resume")
    log = (save / "train.log").read_text()
    assert "does not load" in log and "resumed from iteration 8" in log
    assert final_checkpoint(save)["iteration"] == 16


def test_ddp_with_gloo_two_processes(data, tmp_path):
    save = tmp_path / "ddp"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533",
         "train.py", "--data", str(data), "--modality", "flow", *TINY, "--backend", "cpu", "--device", "cpu",
         "--max-iterations", "6", "--val-every", "6", "--val-batches", "2", "--save-dir", str(save)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    log = (save / "train.log").read_text()
    assert log.count("training resnet18") == 1 and "2 process(es)" in log  # only rank 0 logs
    assert final_checkpoint(save)["iteration"] == 6


def test_synthetic_data_measures_the_model_alone(data, tmp_path):
    summary = run_train("--data", data, "--modality", "flow", *TINY, "--synthetic-data", "--max-iterations", "4",
                        "--save-dir", tmp_path)
    assert summary["images_per_s"] > 0 and summary["data_wait"] < 0.5
    assert (tmp_path / "curves.png").stat().st_size > 1000


def test_clear_errors_before_work(data, tmp_path):
    common = ["--data", data, *TINY, "--max-iterations", "2", "--save-dir", tmp_path / "a"]
    with pytest.raises(SystemExit, match="flow-len 2"):
        run_train(*common, "--modality", "flow", "--flow-len", "5")
    with pytest.raises(SystemExit, match="no checkpoint"):
        run_train(*common, "--modality", "rgb", "--resume")
    with pytest.raises(SystemExit, match="no such file"):
        run_train(*common, "--modality", "rgb", "--pretrained", tmp_path / "missing.pth")
    with pytest.raises(SystemExit, match="pack the data first"):
        run_train("--data", tmp_path / "nothing", "--modality", "rgb", "--save-dir", tmp_path / "b")
    # a checkpoint trained on 6 classes cannot resume on data with 2
    run_train(*common, "--modality", "rgb", "--val-split", "")
    synth_csv = tmp_path / "two.csv"
    rows = (data.parent / "synth0" / "train.csv").read_text().splitlines()
    synth_csv.write_text("\n".join([rows[0]] + [r for r in rows[1:] if "red" in r]) + "\n")
    run_pack("--csv", synth_csv, "--videos", data.parent / "synth0" / "videos", "--out", tmp_path / "two",
             "--workers", "1", "--short-side", "48", "--flow", "dis")
    with pytest.raises(SystemExit, match="6 classes"):
        run_train("--data", tmp_path / "two", *TINY, "--modality", "rgb", "--val-split", "", "--max-iterations", "4",
                  "--save-dir", tmp_path / "a", "--resume")


def test_cuda_graph_where_it_works_and_clear_refusals(data, tmp_path):
    """Which steps are graphed (the graph itself needs a GPU: benchmarks/gpu_check.sh runs it)."""
    def decide(extra, device, dtype, world=1):
        args = train.get_args_parser().parse_args(["--data", str(data), "--modality", "rgb", *extra])
        return train.graph_decision(args, torch.device(device), dtype, world)

    assert decide([], "cuda", torch.bfloat16)[0] and decide([], "cuda", None)[0]  # bf16 and fp32
    assert decide(["--cuda-graph", "off"], "cuda", torch.bfloat16) == (False, "off (--cuda-graph off)")
    for why, extra, device, dtype, world in [("CUDA device", [], "cpu", None, 1),
                                             ("fp16", [], "cuda", torch.float16, 1),
                                             ("--compile", ["--compile"], "cuda", torch.bfloat16, 1),
                                             ("DDP", [], "cuda", torch.bfloat16, 2)]:
        graphed, note = decide(extra, device, dtype, world)
        assert not graphed and why in note
        with pytest.raises(SystemExit, match=f"--cuda-graph on: .*{why}"):
            decide(["--cuda-graph", "on", *extra], device, dtype, world)
    run_train("--data", data, "--modality", "rgb", *TINY, "--max-iterations", "2", "--val-split", "",
              "--save-dir", tmp_path)
    assert "CUDA graph off: it needs a CUDA device" in (tmp_path / "train.log").read_text()
    assert final_checkpoint(tmp_path)["pack_params"] == load_manifest(data)["splits"]["train"]["params"]


def test_a_split_that_cannot_fill_one_batch_is_refused(data, tmp_path):
    samples = load_manifest(data)["splits"]["train"]["samples"]
    with pytest.raises(SystemExit, match=f"{samples} training samples: not one full batch of {samples + 1}"):
        run_train("--data", data, "--modality", "rgb", *TINY, "--batch-size", samples + 1, "--save-dir", tmp_path)


def test_deterministic_runs_give_the_same_weights(data, tmp_path):
    """What makes `make demo` print the same table run after run (two workers, shuffled, pooled remainders)."""
    weights = []
    for run in ("a", "b"):
        run_train("--data", data, "--modality", "flow", *TINY, "--workers", "2", "--max-iterations", "6",
                  "--val-split", "", "--deterministic", "--save-dir", tmp_path / run)
        weights.append(final_checkpoint(tmp_path / run)["model"])
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
