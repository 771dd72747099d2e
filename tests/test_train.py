"""train.py: it learns, it resumes after kill -9, it runs under DDP, it refuses bad set-ups early."""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import train
from conftest import PACK_ARGS, ROOT, run_pack
from pack.files import file_sha256
from pack.manifest import load_manifest
from training.run import Run, param_groups
from training.step import TrainStep, graph_decision

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
        return graph_decision(args, torch.device(device), dtype, world)

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


def checkpoint_files(save_dir) -> list:
    return sorted(p.name for p in save_dir.glob("*.pt"))


def test_a_loss_that_is_not_finite_stops_training_and_nothing_non_finite_is_saved(data, tmp_path):
    """--lr 1e6: the loss overflows within a few steps. An error naming the iteration and the last good checkpoint."""
    save = tmp_path / "run"
    with pytest.raises(SystemExit, match=r"the training loss is not finite at iteration (\d+); stopped at iteration \d+") as e:
        run_train("--data", data, "--modality", "rgb", *TINY, "--lr", "1e6", "--max-iterations", "12", "--ckpt-every",
                  "2", "--val-split", "", "--save-dir", save)
    message = str(e.value.code)
    first_bad = int(re.search(r"not finite at iteration (\d+)", message).group(1))
    assert first_bad <= 12 and "--init" in message and "lower the learning rate" in message.lower()
    assert message in (save / "train.log").read_text()
    for name in checkpoint_files(save):  # everything written is finite, and from before the first bad step
        ckpt = torch.load(save / name, map_location="cpu", weights_only=True)
        assert ckpt["iteration"] < first_bad
        assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    if checkpoint_files(save):
        assert re.search(r"last good checkpoint is \S+ckpt-\d+\.pt", message)


def test_fp16_skipped_steps_are_counted_and_a_collapsed_loss_scale_stops(data, tmp_path, monkeypatch):
    common = ["--data", data, "--modality", "rgb", *TINY, "--amp", "fp16", "--val-split", "", "--ckpt-every", "100"]
    summary = run_train(*common, "--max-iterations", "4", "--save-dir", tmp_path / "a")
    assert isinstance(summary["fp16_skipped_steps"], int) and "fp16-skipped-steps" in (tmp_path / "a" / "train.log").read_text()
    monkeypatch.setattr(train, "MIN_LOSS_SCALE", 2.0 ** 17)  # above GradScaler's starting scale: "collapsed" at once
    with pytest.raises(SystemExit, match="the fp16 loss scale fell to"):
        run_train(*common, "--max-iterations", "4", "--save-dir", tmp_path / "b")
    assert not checkpoint_files(tmp_path / "b")


@pytest.mark.parametrize("to_group", [False, True])
def test_sigterm_stops_at_a_step_with_a_checkpoint_and_resume_goes_on(data, tmp_path, to_group):
    """kill PID, or a scheduler's SIGTERM to the whole process group (the loader's workers die with it)."""
    save = tmp_path / "run"
    args = [sys.executable, "train.py", "--data", str(data), "--modality", "rgb", *TINY, "--workers", "2",
            "--max-iterations", "400", "--ckpt-every", "1000", "--val-split", "", "--save-dir", str(save)]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=to_group)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        log = save / "train.log"
        if log.exists() and "\nit 4 " in log.read_text():
            break
        time.sleep(0.05)
    if to_group:
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 128 + signal.SIGTERM, proc.stderr.read()[-2000:]
    log = (save / "train.log").read_text()
    stopped = int(re.search(r"stopped by SIGTERM after iteration (\d+), checkpoint written", log).group(1))
    assert 4 <= stopped < 400 and final_checkpoint(save)["iteration"] == stopped
    assert not list(save.glob(".*.tmp*"))
    end = args.index("--max-iterations") + 1
    done = subprocess.run(args[:end] + [str(stopped + 4)] + args[end + 1:] + ["--resume"], cwd=ROOT, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert final_checkpoint(save)["iteration"] == stopped + 4
    assert f"resumed from iteration {stopped}" in (save / "train.log").read_text()


def test_a_run_killed_while_saving_leaves_nothing_behind_and_one_save_dir_has_one_run(data, tmp_path):
    save = tmp_path / "run"
    save.mkdir()
    (save / ".ckpt-00000004.pt.tmp99999").write_bytes(b"half a checkpoint")
    (save / ".latest.pt.tmp99999").write_bytes(b"")
    run_train("--data", data, "--modality", "rgb", *TINY, "--max-iterations", "2", "--val-split", "", "--save-dir", save)
    assert not list(save.glob(".*.tmp*")) and "removed 2 half-written checkpoint(s)" in (save / "train.log").read_text()
    from pack.files import Lock

    with Lock(save / ".train.lock").acquire("a run"):  # as if another train.py were at work there
        with pytest.raises(SystemExit, match="in use by pid"):
            run_train("--data", data, "--modality", "rgb", *TINY, "--max-iterations", "4", "--val-split", "",
                      "--save-dir", save, "--resume")


def test_resume_refuses_flags_that_disagree_with_the_checkpoint(data, tmp_path):
    common = ["--data", data, *TINY, "--val-split", "", "--save-dir", tmp_path]
    run_train(*common, "--modality", "flow", "--max-iterations", "2")
    with pytest.raises(SystemExit, match="--modality rgb, but the run .* was trained with flow"):
        run_train(*common, "--modality", "rgb", "--max-iterations", "4", "--resume")
    with pytest.raises(SystemExit, match="--input-size 48, but the run .* was trained with 32"):
        run_train(*[a if a != "32" else "48" for a in common], "--modality", "flow", "--max-iterations", "4", "--resume")
    run_train("--data", data, "--arch", "resnet18", "--batch-size", "8", "--workers", "1", "--log-every", "2",  # as saved
              "--val-split", "", "--save-dir", tmp_path, "--modality", "flow", "--max-iterations", "4", "--resume")
    assert final_checkpoint(tmp_path)["iteration"] == 4 and final_checkpoint(tmp_path)["args"]["input_size"] == 32


def test_unlabelled_splits_are_refused_at_start(data, synth, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    rows = (synth / "val.csv").read_text().splitlines()[1:]
    test_csv = tmp_path / "test.csv"
    test_csv.write_text("youtube_id,time_start,time_end,split\n" + "".join(
        f"{r.split(',')[1]},{r.split(',')[2]},{r.split(',')[3]},test\n" for r in rows))
    run_pack("--csv", test_csv, "--videos", synth / "videos", "--out", copy, "--workers", "1", *PACK_ARGS)
    for flags in (["--val-split", "test"], ["--train-split", "test", "--val-split", ""]):
        with pytest.raises(SystemExit, match=r"/test has no labels"):
            run_train("--data", copy, "--modality", "rgb", *TINY, "--max-iterations", "2", *flags,
                      "--save-dir", tmp_path / "run")


TRANSFER = ["--modality", "rgb", "--arch", "resnet18", "--input-size", "32", "--batch-size", "8", "--workers", "1",
            "--val-split", "", "--deterministic", "--lr", "0.01", "--ckpt-every", "1000", "--log-every", "10"]


def run_args(*argv):
    return train.get_args_parser().parse_args([str(a) for a in argv])


def test_init_starts_from_a_trained_stream_with_a_new_classifier_or_its_own(real_folders, tmp_path):
    source = tmp_path / "source"
    run_train("--data", real_folders["source"], *TRANSFER, "--max-iterations", "10", "--save-dir", source)
    trained_on = torch.load(source / "latest.pt", map_location="cpu", weights_only=True)
    for data, kept in ((real_folders["target"], False), (real_folders["source"], True)):
        args = run_args("--data", data, *TRANSFER, "--init", source / "latest.pt", "--save-dir", tmp_path / "x")
        classes = train.check_before_work(args, 1)
        lines = []
        run = Run(args, classes, 1, 0, 1, torch.device("cpu"), None, lines.append)
        weights = run.model.state_dict()
        for key, value in trained_on["model"].items():
            same = torch.equal(weights[key], value)
            assert same if (kept or key not in ("fc.weight", "fc.bias")) else not same, key
        assert run.init == {"checkpoint": str(source / "latest.pt"), "sha256": file_sha256(source / "latest.pt"),
                            "iteration": 10, "classes": 2, "classifier": "kept" if kept else "new",
                            "data": trained_on["data"], "no_flip": False, "other_params": False, "from": None}
        assert ("the classifier kept" if kept else "the classifier made anew") in lines[0]
    run_train("--data", real_folders["target"], *TRANSFER, "--max-iterations", "2", "--init", source / "latest.pt",
              "--save-dir", tmp_path / "fine")
    saved = final_checkpoint(tmp_path / "fine")
    assert saved["iteration"] == 2 and saved["init"]["checkpoint"] == str(source / "latest.pt")
    assert saved["optimizer"]["param_groups"][0]["lr"] == 0.01  # its own schedule, from the start


def test_init_refuses_what_does_not_fit(real_folders, data, tmp_path):
    source = tmp_path / "source"
    run_train("--data", real_folders["source"], *TRANSFER, "--max-iterations", "2", "--save-dir", source)
    ckpt = source / "latest.pt"
    common = ["--data", real_folders["target"], *TRANSFER, "--max-iterations", "2", "--save-dir", tmp_path / "x"]
    with pytest.raises(SystemExit, match="--resume continues a run, --init starts a new one"):
        run_train(*common, "--init", ckpt, "--resume")
    with pytest.raises(SystemExit, match="--init already gives the starting weights"):
        run_train(*common, "--init", ckpt, "--pretrained", ckpt)
    with pytest.raises(SystemExit, match="is a resnet18 network, this run's --arch is resnet50"):
        run_train(*common, "--init", ckpt, "--arch", "resnet50")
    with pytest.raises(SystemExit, match="is a rgb network, this run's --modality is flow"):
        run_train(*[a if a != "rgb" else "flow" for a in common], "--init", ckpt)
    flow = tmp_path / "flow"
    run_train("--data", data, "--modality", "flow", *TINY, "--max-iterations", "2", "--val-split", "", "--save-dir", flow)
    with pytest.raises(SystemExit, match="stacks 2 flow images, this run 1"):
        run_train(*[a if a != "rgb" else "flow" for a in common], "--flow-len", "1", "--init", flow / "latest.pt")


def test_transfer_helps_a_stream_trained_on_other_classes_learns_faster_than_from_scratch(real_folders, tmp_path):
    """The same seed, data and 30 iterations: from the street-vs-car stream, indoors-vs-outdoors learns faster.

    Loading nothing would make the two runs the same (deterministic), and the test fail.
    """
    run_train("--data", real_folders["source"], *TRANSFER, "--max-iterations", "60", "--save-dir", tmp_path / "source")
    losses = {}
    for name, extra in (("scratch", []), ("init", ["--init", tmp_path / "source" / "latest.pt"])):
        run_train("--data", real_folders["target"], *TRANSFER, "--max-iterations", "30", *extra, "--save-dir",
                  tmp_path / name)
        losses[name] = [loss for _, loss in final_checkpoint(tmp_path / name)["history"]["train"]]
    assert len(losses["init"]) == len(losses["scratch"]) == 3
    assert losses["init"][-1] < losses["scratch"][-1], losses  # the loss after 30 iterations (its last 10)
    assert sum(losses["init"]) < sum(losses["scratch"]), losses  # and along the way


def test_no_flip_is_recorded_and_mirrored_views_refused_unless_asked(data, tmp_path):
    run_train("--data", data, "--modality", "rgb", *TINY, "--max-iterations", "2", "--val-split", "", "--no-flip",
              "--save-dir", tmp_path)
    assert final_checkpoint(tmp_path)["args"]["no_flip"] is True
    import predict
    import score

    common = ["--checkpoint", str(tmp_path / "latest.pt"), "--data", str(data), "--workers", "1"]
    for tta in ("flip", "10crop"):
        with pytest.raises(SystemExit, match=f"trained with --no-flip .* --tta {tta} would score it on mirrored views"):
            score.main(score.get_args_parser().parse_args([*common, "--out", str(tmp_path / "s.npz"), "--tta", tta]))
    score.main(score.get_args_parser().parse_args([*common, "--out", str(tmp_path / "s.npz"), "--tta", "3crop"]))
    score.main(score.get_args_parser().parse_args([*common, "--out", str(tmp_path / "f.npz"), "--tta", "flip",
                                                   "--allow-mirrored"]))
    from conftest import DATA

    with pytest.raises(SystemExit, match="trained with --no-flip"):
        predict.main(predict.get_args_parser().parse_args([str(DATA / "g1.avi"), "--rgb", str(tmp_path / "latest.pt"),
                                                           "--tta", "flip"]))


class FakeCuda:
    """Enough of torch.cuda for TrainStep's graphed path on the CPU: streams do nothing; a capture records nothing.

    capture_fails: entering the capture raises, as a CUDA capture does on an operation it cannot record. Otherwise
    the capture's body runs (Python cannot skip a with-block) and what it did is undone, as if nothing had run;
    a replay then runs the step for real on the static batch (bad_replay: and leaves NaN, as a broken graph would).
    """

    def __init__(self, monkeypatch, capture_fails: bool = False, bad_replay: bool = False):
        self.capture_fails, self.bad_replay, self.step = capture_fails, bad_replay, None
        fake = self

        class Stream:
            def wait_stream(self, other):
                pass

        class Graph:
            def replay(self):
                loss = fake.step.eager(fake.step.images, fake.step.labels)
                fake.step.loss.copy_(torch.full_like(loss, float("nan")) if fake.bad_replay else loss)
                if fake.bad_replay:
                    next(fake.step.model.parameters()).data.fill_(float("nan"))

        @contextlib.contextmanager
        def graph(g, stream=None):
            if fake.capture_fails:
                raise RuntimeError("operation not permitted when stream is capturing")
            before = [t.detach().clone() for t in fake.step.state()]
            fake.step.images.zero_()  # the body runs here on the static batch (uninitialised memory): valid values
            fake.step.labels.zero_()
            yield
            for tensor, saved in zip(fake.step.state(), before):
                tensor.copy_(saved)

        for name, value in (("Stream", Stream), ("current_stream", Stream), ("stream", contextlib.nullcontext),
                            ("CUDAGraph", Graph), ("graph", graph)):
            monkeypatch.setattr(torch.cuda, name, value)

    def run(self, graphed: bool, steps: int = 7, strict: bool = False, segments: int = 1):
        """Losses and final weights of `steps` steps on batches of 4 (videos of `segments` images), and the log."""
        import nets

        torch.manual_seed(0)
        model = nets.build("resnet18", 4, "rgb")
        optimizer = torch.optim.SGD(param_groups(model, argparse.Namespace(lr=0.01, weight_decay=5e-4)),
                                    lr=0.01, momentum=0.9)
        lines = []
        self.step = TrainStep(model, optimizer, torch.amp.GradScaler("cpu", enabled=False), None, graphed,
                              strict=strict, log=lines.append, segments=segments)
        batches = torch.Generator().manual_seed(1)
        losses = [self.step(torch.randn(4 * segments, 3, 32, 32, generator=batches),
                            torch.randint(0, 4, (4,), generator=batches)).item() for _ in range(steps)]
        return losses, model.state_dict(), lines


@pytest.mark.parametrize("case", ["capture fails", "bad first replay"])
def test_a_graph_that_fails_falls_back_to_eager_steps_or_stops_when_on(monkeypatch, case):
    """--cuda-graph auto: the run goes on eagerly from the state before, with one log line; on: an error."""
    fake = FakeCuda(monkeypatch, capture_fails=case == "capture fails", bad_replay=case == "bad first replay")
    eager_losses, eager_weights, _ = fake.run(graphed=False)
    losses, weights, lines = fake.run(graphed=True)
    assert losses == eager_losses and all(torch.equal(weights[k], eager_weights[k]) for k in weights)
    why = "the capture failed (RuntimeError: operation not permitted" if case == "capture fails" else \
        "the first replay's loss is not finite, the eager warm-up steps' were"
    assert len(lines) == 1 and lines[0].startswith(f"CUDA graph off from step 4: {why}"), lines
    with pytest.raises(SystemExit, match=f"--cuda-graph on: {re.escape(why)}"):
        fake.run(graphed=True, strict=True)


def test_a_graph_that_works_is_replayed(monkeypatch):
    """The fake's replays run the step as eager steps do: the same losses and weights, and no fallback."""
    fake = FakeCuda(monkeypatch)
    eager_losses, eager_weights, _ = fake.run(graphed=False)
    losses, weights, lines = fake.run(graphed=True)
    assert fake.step.graphed and fake.step.graph is not None and not lines
    assert losses == pytest.approx(eager_losses, rel=1e-5)
    assert all(torch.allclose(weights[k].float(), eager_weights[k].float(), rtol=1e-4, atol=1e-6) for k in weights)
