"""Processes and disks: what kill -9 of a launcher, a killed loader worker, a full disk and two runs at once leave behind.

A full disk is made two ways: a file size limit (RLIMIT_FSIZE: the kernel refuses the write, works for any user) where
the file that must fail is the largest the command writes, and a small tmpfs where that is not so (mounting one needs
root: skipped otherwise, and said).
"""
from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import score
import train
from conftest import PACK_ARGS, ROOT
from pack.files import Lock

TINY = ["--modality", "rgb", "--arch", "resnet18", "--input-size", "32", "--batch-size", "8", "--val-split", "",
        "--log-every", "2", "--lr", "0.01"]


def descendants(pid: int) -> list[int]:
    """Every process below pid (its children, theirs, ...)."""
    try:
        children = [int(c) for t in os.listdir(f"/proc/{pid}/task")
                    for c in open(f"/proc/{pid}/task/{t}/children").read().split()]
    except FileNotFoundError:
        return []
    return children + [d for c in children for d in descendants(c)]


def running(pid: int) -> bool:
    """Whether a process runs (a zombie, dead and not yet reaped by whoever inherited it, does not)."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_for(condition, what: str, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def limited(max_bytes: int):
    """preexec_fn: no file this process writes may grow past max_bytes (Python ignores SIGXFSZ: the write fails)."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))


def logged(save: Path, text: str) -> bool:
    log = save / "train.log"
    return log.exists() and text in log.read_text()


def test_kill_9_of_torchrun_ends_its_ranks_and_their_workers(data, tmp_path):
    save = tmp_path / "ddp"
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29547", "train.py",
         "--data", str(data), *TINY, "--max-iterations", "100000", "--workers", "1", "--device", "cpu",
         "--save-dir", str(save)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    below = []
    try:
        wait_for(lambda: logged(save, "\nit 2 ") or proc.poll() is not None, "the first log line")
        assert proc.poll() is None, "torchrun ended before it could be killed"
        below = descendants(proc.pid)
        assert len(below) >= 4, f"expected 2 ranks and their loader workers, found {below}"
        proc.kill()  # kill -9 of the launcher alone
        proc.wait()
        wait_for(lambda: not any(map(running, below)), "the ranks and their workers to die", timeout=20)
    finally:
        for pid in [proc.pid, *below]:  # torchrun starts each rank in a session of its own: each by its id
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_a_loader_worker_killed_is_one_line_in_train_log_without_a_traceback(data, tmp_path):
    """The out-of-memory killer sends SIGKILL to the largest process, often a loader worker."""
    save = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "train.py", "--data", str(data), *TINY, "--max-iterations", "100000",
                             "--workers", "2", "--backend", "cpu", "--save-dir", str(save)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for(lambda: logged(save, "\nit 2 ") or proc.poll() is not None, "the first log line")
        workers = descendants(proc.pid)
        assert workers, "no loader worker to kill"
        os.kill(workers[0], signal.SIGKILL)
        _, stderr = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):  # the group is gone: nothing left to end
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 1 and "Traceback" not in stderr, stderr[-2000:]
    said = stderr.strip().splitlines()[-1]
    assert said.startswith("error: a loader worker died at iteration ") and "was killed by signal SIGKILL" in said
    assert "out-of-memory killer" in said and said in (save / "train.log").read_text()


def test_resume_without_a_checkpoint_yet_starts_the_run_and_says_so(data, tmp_path):
    """A requeued job killed before its first save runs `train.py ... --resume` on a save-dir without a checkpoint."""
    save = tmp_path / "requeued"
    train.main(train.get_args_parser().parse_args(
        ["--data", str(data), *TINY, "--max-iterations", "2", "--workers", "1", "--save-dir", str(save), "--resume"]))
    assert torch.load(save / "latest.pt", weights_only=True)["iteration"] == 2
    assert logged(save, "--resume: no checkpoint in") and logged(save, "starting the run from iteration 0")


def test_a_full_disk_while_checkpointing_is_one_line_and_leaves_no_temporary(data, tmp_path):
    """A resnet18 checkpoint is ~45 MB, everything else a run writes far less: a 16 MB file size limit fails only
    its save. The next run removes the temporaries of one killed while saving."""
    save = tmp_path / "run"
    argv = [sys.executable, "train.py", "--data", str(data), *TINY, "--max-iterations", "2", "--workers", "1",
            "--backend", "cpu", "--save-dir", str(save)]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, preexec_fn=limited(16 << 20))
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    said = done.stderr.strip().splitlines()[-1]
    assert said.startswith(f"error: the checkpoint {save / 'ckpt-00000002.pt'} could not be written")
    assert "nothing half-written is left" in said and said in (save / "train.log").read_text()
    assert not [p.name for p in save.iterdir() if ".tmp" in p.name]

    (save / ".ckpt-00000002.pt.tmp4242").write_bytes(b"half a checkpoint")  # a run killed -9 while saving
    done = subprocess.run(argv + ["--resume"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not (save / ".ckpt-00000002.pt.tmp4242").exists() and logged(save, "removed 1 half-written checkpoint")


def test_a_full_disk_while_writing_the_manifest_is_one_line_and_leaves_no_temporary(synth, tmp_path):
    """Rerun on a finished pack, only the manifest is written: a limit below its size fails it."""
    out = tmp_path / "data"
    argv = [sys.executable, "-m", "pack", "--csv", str(synth / "val.csv"), "--videos", str(synth / "videos"),
            "--out", str(out), "--workers", "1", *PACK_ARGS]
    assert subprocess.run(argv, cwd=ROOT, capture_output=True).returncode == 0
    size = (out / "manifest.json").stat().st_size
    (out / ".manifest.json.tmp4242").write_text("{")  # of a pack killed -9 while writing it
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, preexec_fn=limited(size // 2))
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: {out / 'manifest.json'}: cannot write it (File too large)")
    assert not list(out.glob(".manifest.json.tmp*")) and (out / "manifest.json").stat().st_size == size


@pytest.fixture(scope="module")
def checkpoint(data, tmp_path_factory) -> Path:
    save = tmp_path_factory.mktemp("score") / "run"
    train.main(train.get_args_parser().parse_args(
        ["--data", str(data), *TINY, "--max-iterations", "1", "--workers", "1", "--save-dir", str(save)]))
    return save / "latest.pt"


def run_score(*argv) -> dict:
    return score.main(score.get_args_parser().parse_args([str(a) for a in ["--workers", "1", "--backend", "cpu", *argv]]))


def test_two_score_runs_on_one_out_the_second_is_refused_naming_the_first(data, checkpoint, tmp_path):
    out = tmp_path / "scores" / "rgb.npz"
    out.parent.mkdir()
    with Lock(out.with_name(".rgb.npz.lock")).acquire("--out"):  # a score.py run holding --out (this process)
        with pytest.raises(SystemExit, match=f"--out {out} is in use by pid {os.getpid()} on "):
            run_score("--checkpoint", checkpoint, "--data", data, "--out", out)
    (out.parent / ".rgb.npz.tmp4242.npz").write_bytes(b"PK")  # of a run killed -9 while writing
    run_score("--checkpoint", checkpoint, "--data", data, "--out", out)
    assert out.exists() and out.with_suffix(".json").exists() and not list(out.parent.glob("*.tmp*"))


def test_a_score_run_killed_between_its_npz_and_its_json_is_said_by_the_rerun(data, checkpoint, tmp_path):
    out = tmp_path / "rgb.npz"
    run_score("--checkpoint", checkpoint, "--data", data, "--out", out)
    out.with_suffix(".json").unlink()  # as if killed after renaming the .npz, before the .json
    with pytest.raises(SystemExit, match="exists without its result JSON .*stopped between writing the two"):
        run_score("--checkpoint", checkpoint, "--data", data, "--out", out)
    run_score("--checkpoint", checkpoint, "--data", data, "--out", out, "--overwrite")
    assert out.with_suffix(".json").exists()


def test_a_full_disk_while_writing_scores_is_one_line_and_leaves_no_temporary(data, checkpoint, tmp_path):
    """The score file is smaller than the shared memory the loader's workers map, so no file size limit fails it
    alone: a tmpfs of one free page (taken by the --out lock) does."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root (and a system that allows it)")
    try:
        free = shutil.disk_usage(disk).free
        (disk / "filler").write_bytes(b"\0" * (free - 4096))
        done = subprocess.run([sys.executable, "score.py", "--checkpoint", str(checkpoint), "--data", str(data),
                               "--out", str(disk / "rgb.npz"), "--workers", "1", "--backend", "cpu"],
                              cwd=ROOT, capture_output=True, text=True)
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
        assert done.stderr.strip().splitlines()[-1].startswith(
            "error: writing the scores failed (No space left on device): nothing is written; free space")
        assert sorted(p.name for p in disk.iterdir()) == [".rgb.npz.lock", "filler"]
    finally:
        subprocess.run(["umount", str(disk)], check=True)
