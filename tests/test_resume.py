"""Exact resume: the data order is part of a run's state, so a stopped run ends as the same run unstopped would.

A stopped run, resumed at once each time with another --workers, whatever stopped it
(SIGKILL, SIGTERM, mid-interval between checkpoints, across epoch boundaries), ends with
every weight equal to the unstopped run's and logs the same losses; on both loaders.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import loaders
import train
from conftest import ROOT

BACKENDS = ["cpu", "dali"]


def epochs_of_batches(loader, batches: int, clone=True) -> list:
    """The next `batches` batches of a training loader, across its epochs: (images, labels, keys) each."""
    out = []
    while len(out) < batches:
        for images, labels, keys in loader:
            out.append((images.clone() if clone else images, labels, keys))
            if len(out) == batches:
                break
    return out


def train_loader(data, backend: str, workers: int, position=None, segments: int = 1, **kw):
    """16 frames a batch; with segments, 4 videos of `segments` frames (30 videos: 7 batches an epoch)."""
    return loaders.build(data, "train", "flow", True, 16 if segments == 1 else 4, crop=40, backend=backend,
                         device="cpu", workers=workers, seed=3, scale_jitter=(0.9, 1.1), position=position,
                         segments=segments, **kw)


@pytest.mark.parametrize("segments", [1, 3])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_loader_made_at_a_position_goes_on_with_the_very_batches_and_the_workers_do_not_matter(data, backend,
                                                                                                 segments):
    epoch = len(train_loader(data, backend, 1, segments=segments))
    unstopped = epochs_of_batches(train_loader(data, backend, 2, segments=segments), 2 * epoch + 3)
    for stop in (3, epoch - 1, epoch, epoch + 2):  # mid-epoch, at an epoch's last batch, at its end, in the next
        first = train_loader(data, backend, 1, segments=segments)
        head = epochs_of_batches(first, stop)
        position = first.position()
        tail = epochs_of_batches(train_loader(data, backend, 3 if backend == "cpu" else 1, position=position,
                                              segments=segments), len(unstopped) - stop)
        for i, ((a, y, k), (b, z, m)) in enumerate(zip(unstopped, head + tail)):
            assert k == m and torch.equal(y, z) and torch.equal(a, b), f"stopped after {stop}: batch {i} differs"


@pytest.mark.parametrize("segments", [1, 3])
def test_both_loaders_draw_the_same_samples_in_the_same_order(data, segments):
    """The plan is the loaders': the same samples, batch by batch, from DALI and the CPU workers (the pixels differ
    by their decoders' rounding, by at most a few levels: the same crops and flips). With segments, each video's 3
    frames come one from each third of its samples, and a label a video."""
    batches = {backend: epochs_of_batches(train_loader(data, backend, 2, segments=segments), 15)
               for backend in BACKENDS}
    for (a, y, k), (b, z, m) in zip(batches["cpu"], batches["dali"]):
        assert k == m and torch.equal(y, z) and len(k) == len(y) * segments and a.shape == b.shape
        assert (a - b).abs().mean() < 0.05, "other crops or flips"  # normalised units: a level is 1/58
    if segments > 1:
        keys = [key for _, _, k in batches["cpu"] for key in k]
        for i in range(0, len(keys), segments):
            video = {key.rsplit("/", 1)[0] for key in keys[i:i + segments]}
            t = [int(key.rsplit("/", 1)[1]) for key in keys[i:i + segments]]
            assert len(video) == 1 and [x // 8 for x in t] == [0, 1, 2], t  # 6 samples, stride 4: thirds of 8 frames


def test_a_position_of_another_plan_is_refused(data):
    first = train_loader(data, "cpu", 1)
    epochs_of_batches(first, 2)
    with pytest.raises(ValueError, match="seed 3 then, 4 now"):
        loaders.build(data, "train", "flow", True, 16, crop=40, backend="cpu", device="cpu", seed=4,
                      position=first.position())
    with pytest.raises(ValueError, match="world_size 1 then, 2 now"):
        train_loader(data, "cpu", 1, position=first.position(), world_size=2)


TRAIN = ["--modality", "rgb", "--arch", "resnet18", "--input-size", "32", "--batch-size", "16", "--lr", "0.01",
         "--max-iterations", "30", "--step-values", "20", "--log-every", "3", "--ckpt-every", "4", "--val-every", "10",
         "--val-batches", "2", "--scale-jitter", "0.9", "1.1", "--deterministic"]


def command(data, save, backend: str, workers: int, segments: int = 1) -> list[str]:
    """TRAIN; with segments, batches of 4 videos (30 videos: 7 batches an epoch)."""
    more = ["--segments", str(segments), "--batch-size", "4"] if segments > 1 else []
    return [sys.executable, "train.py", "--data", str(data), *TRAIN, "--backend", backend, "--workers", str(workers),
            "--save-dir", str(save), *more]


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in open(f"/proc/{pid}/task/{pid}/children").read().split()]
    except FileNotFoundError:
        return []


def running(pid: int) -> bool:
    """Whether a process runs (a zombie, dead and not yet reaped by whoever inherited it, does not)."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def run_until(argv, save, seen, sig: int, whole_group: bool = False, meanwhile=None) -> tuple[int, list[int]]:
    """Start a run (then call `meanwhile`), send it `sig` once `seen(save)` holds; its exit status and its child
    processes at that moment."""
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    if meanwhile is not None:
        meanwhile()
    deadline = time.time() + 180
    while not seen(save) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, f"the run ended before it could be stopped: {proc.stderr.read()[-2000:]}"
    workers = children(proc.pid)
    (os.killpg if whole_group else os.kill)(proc.pid, sig)
    return proc.wait(60), workers


def logged_at(save, iteration: int) -> bool:
    log = save / "train.log"
    return log.exists() and f"\nit {iteration} " in log.read_text()


def final(save) -> dict:
    return torch.load(save / "latest.pt", map_location="cpu", weights_only=True)


@pytest.mark.parametrize("backend,segments", [("cpu", 1), ("dali", 1), ("cpu", 3)])
def test_a_run_stopped_by_sigkill_and_sigterm_ends_as_the_unstopped_run(data, tmp_path, backend, segments):
    """11 batches an epoch (7 with segments): the kills land before the first epoch's end and in a later one, each
    resume crosses one."""
    unstopped = tmp_path / "unstopped"
    done = subprocess.run(command(data, unstopped, backend, 2, segments), cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]

    stopped = tmp_path / "stopped"
    # kill -9 of the main process alone, once a checkpoint is written: its workers must die with it, and
    # free the save-dir's lock, for a resume started at once
    status, workers = run_until(command(data, stopped, backend, 2, segments), stopped,
                                lambda save: (save / "ckpt-00000004.pt").exists(), signal.SIGKILL)
    assert status == -signal.SIGKILL
    killed = time.time()

    def workers_gone():  # within a moment of the kill (the kernel kills them: PR_SET_PDEATHSIG)
        while any(map(running, workers)) and time.time() < killed + 2:
            time.sleep(0.01)
        assert not any(map(running, workers)), "a loader worker outlived its run"

    # resumed at once with another --workers; SIGTERM after the step under way once iteration 15 is logged (its
    # checkpoint then holds the losses of the log window under way)
    status, _ = run_until(command(data, stopped, backend, 1, segments) + ["--resume"], stopped,
                          lambda save: logged_at(save, 15), signal.SIGTERM, whole_group=True, meanwhile=workers_gone)
    assert status == 128 + signal.SIGTERM
    at = final(stopped)["iteration"]
    assert 15 <= at < 30, f"SIGTERM should stop the run after iteration 15, stopped at {at}"  # 16 or 17: mid-window
    done = subprocess.run(command(data, stopped, backend, 3, segments) + ["--resume"], cwd=ROOT, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-3000:]

    a, b = final(unstopped), final(stopped)
    assert a["iteration"] == b["iteration"] == 30
    differ = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert not differ, f"{len(differ)} weights differ, e.g. {differ[:3]}"
    assert a["history"]["train"] == b["history"]["train"], "the logged losses differ"
    assert a["history"]["val"] == b["history"]["val"]
    log = (stopped / "train.log").read_text()
    assert log.count("the batches an unstopped run draws") == 2 and "in use by" not in log


def test_ddp_ranks_share_the_videos_evenly():
    """With segments a plan's entry is a video: every rank the same number of them, no video on two ranks."""
    from loaders.common import Stream
    from loaders.plan import Planner

    stream = Stream(tars=[], indexes=[], modality="rgb", flow_len=1, samples=40, classes=["a"],
                    shard_samples=[13, 14, 13], video_samples=[6, 1, 6, 2, 5, 3, 6, 4, 1, 6])
    for train in (True, False):
        plans = [Planner(stream, train, 0, rank, 3, 2, 4, segments=3).plan(1) for rank in range(3)]
        shared = set(plans[0]) | set(plans[1]) | set(plans[2])
        assert sum(map(len, plans)) == len(shared) and shared <= set(range(10))
        assert [len(p) for p in plans] == ([3, 3, 3] if train else [4, 3, 3])  # training: 10 // 3 each


def test_two_unstopped_runs_with_other_workers_give_the_same_weights(data, tmp_path):
    weights = []
    for workers in (0, 3):
        save = tmp_path / f"w{workers}"
        train.main(train.get_args_parser().parse_args(
            ["--data", str(data), *TRAIN, "--max-iterations", "13", "--workers", str(workers), "--save-dir", str(save)]))
        weights.append(final(save)["model"])
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_resuming_with_another_world_size_batch_size_or_a_damaged_state_is_refused(data, tmp_path):
    save = tmp_path / "run"
    args = ["--data", str(data), *TRAIN, "--max-iterations", "4", "--workers", "1", "--save-dir", str(save)]
    train.main(train.get_args_parser().parse_args(args))
    ckpt = final(save)
    ckpt["ranks"] = ckpt["ranks"] * 2  # as if written by two processes
    torch.save(ckpt, save / "latest.pt")
    more = ["--max-iterations", "8", "--resume"]
    with pytest.raises(SystemExit, match=r"trained by 2 process\(es\), this is 1.*torchrun --nproc-per-node 2"):
        train.main(train.get_args_parser().parse_args(args + more))
    ckpt["ranks"] = ckpt["ranks"][:1]
    torch.save(ckpt, save / "latest.pt")
    with pytest.raises(SystemExit, match="batch_size 16 then, 8 now.*--batch-size"):
        train.main(train.get_args_parser().parse_args(args + more + ["--batch-size", "8"]))
    ckpt["ranks"][0]["loader"] = {"epoch": "x"}  # damaged, or edited
    torch.save(ckpt, save / "latest.pt")
    with pytest.raises(SystemExit, match="holds a state of process 0 that train.py does not write"):
        train.main(train.get_args_parser().parse_args(args + more))


@pytest.mark.parametrize("segments", [1, 3])
def test_ddp_each_rank_goes_on_from_its_own_position(data, tmp_path, segments):
    """Two processes (gloo): a run stopped at iteration 6 and resumed (other --workers) ends as the unstopped one.

    (Stopped by --max-iterations at a log line: with DDP, SIGTERM stops a run at a log line too.) With segments,
    batches of 4 videos: 15 videos a rank, 3 batches an epoch."""
    def ddp(save, iterations: int, workers: int, *more):
        videos = ["--segments", "3", "--batch-size", "4"] if segments > 1 else []
        done = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29541",
             "train.py", "--data", str(data), *TRAIN, "--max-iterations", str(iterations), "--workers", str(workers),
             "--device", "cpu", "--save-dir", str(save), *videos, *more], cwd=ROOT, capture_output=True, text=True,
            timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]

    ddp(tmp_path / "unstopped", 14, 1)
    ddp(tmp_path / "stopped", 6, 2)
    ranks = final(tmp_path / "stopped")["ranks"]
    assert len(ranks) == 2 and ranks[0]["loader"]["world_size"] == 2 and ranks[0]["rng"]["torch"].shape
    ddp(tmp_path / "stopped", 14, 0, "--resume")
    a, b = final(tmp_path / "unstopped"), final(tmp_path / "stopped")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["history"]["train"] == b["history"]["train"]


def test_the_save_dir_lock_belongs_to_the_process_that_took_it(tmp_path):
    """A child forked while the lock is held (a loader worker) does not hold it: once the parent is gone, it is free."""
    from pack.files import Lock

    path = tmp_path / ".train.lock"
    script = (f"import os, time, sys; sys.path.insert(0, {str(ROOT)!r})\n"
              f"from pack.files import Lock\n"
              f"lock = Lock({str(path)!r}).acquire('the save-dir')\n"
              f"if os.fork() == 0:\n    time.sleep(30)\n    os._exit(0)\n"
              f"print('holding', flush=True)\ntime.sleep(30)\n")
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(SystemExit, match=f"the save-dir is in use by pid {holder.pid} "):
            Lock(path).acquire("the save-dir")
        holder.kill()  # kill -9 of the holder: its child lives on
        holder.wait()
        with Lock(path).acquire("the save-dir"):  # free at once, though the child still runs
            pass
    finally:
        os.killpg(holder.pid, signal.SIGKILL)


def test_a_resume_with_another_log_every_keeps_the_losses_since_the_line_it_would_have_written():
    """Resumed at iteration 4 with 4 losses unlogged (--log-every 5 then): --log-every 3 logged at 3, so 1 is left."""
    from training.logs import Window

    window = Window(3, torch.device("cpu"), 4, [1.0, 2.0, 3.0, 4.0])
    assert window.unlogged() == [4.0]
    window.add(torch.tensor(5.0), 1, 0.0)
    window.add(torch.tensor(6.0), 1, 0.0)  # iteration 6: the window is full, as the line is due
    assert window.mean_loss() == 5.0 and Window(2, torch.device("cpu"), 4, [1.0, 2.0]).unlogged() == []
