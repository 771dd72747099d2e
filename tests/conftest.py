"""Shared fixtures: a small synthetic colour x direction dataset, packed once per session."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PYTHONPATH", str(ROOT))  # for the subprocesses tests start

from pack.__main__ import get_args_parser, main  # noqa: E402
from pack.synth import make_dataset  # noqa: E402

DATA = ROOT / "tests" / "data"
PACK_ARGS = ["--stride", "4", "--flow-len", "2", "--short-side", "72", "--shard-videos", "4", "--flow", "dis"]


def run_pack(*argv) -> int:
    """python -m pack, in-process."""
    return main(get_args_parser().parse_args([str(a) for a in argv]))


def copy_with_test_split(data: Path, synth: Path, tmp_path: Path) -> Path:
    """A copy of DATA with a split packed later: `test`, the val videos without labels (as Kinetics' test CSV)."""
    import csv
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    with open(synth / "val.csv") as f:
        rows = list(csv.DictReader(f))
    test_csv = tmp_path / "test.csv"
    test_csv.write_text("youtube_id,time_start,time_end,split\n" +
                        "".join(f"{r['youtube_id']},{r['time_start']},{r['time_end']},test\n" for r in rows))
    assert run_pack("--csv", test_csv, "--videos", synth / "videos", "--out", copy, "--workers", "2", *PACK_ARGS) == 0
    return copy


@pytest.fixture(scope="session")
def synth(tmp_path_factory) -> Path:
    """3 colours x 2 directions, 5 training and 2 validation videos per class, 96x72, 24 frames."""
    out = tmp_path_factory.mktemp("synth")
    make_dataset(out, colours=3, directions=2, train_per_class=5, val_per_class=2, frames=24, width=96, height=72, seed=1)
    return out


@pytest.fixture(scope="session")
def data(synth, tmp_path_factory) -> Path:
    """The synthetic set packed: train and val, rgb and 2-image flow, several shards each."""
    out = tmp_path_factory.mktemp("data")
    for split in ("train", "val"):
        assert run_pack("--csv", synth / f"{split}.csv", "--videos", synth / "videos", "--out", out,
                        "--workers", "2", *PACK_ARGS) == 0
    return out


@pytest.fixture(scope="session")
def trained(data, tmp_path_factory) -> dict:
    """Both streams trained briefly on the synthetic set, and their val scores."""
    import numpy as np

    import score
    import train

    root = tmp_path_factory.mktemp("trained")
    out = {}
    for modality in ("rgb", "flow"):
        save = root / modality
        train.main(train.get_args_parser().parse_args([
            "--data", str(data), "--modality", modality, "--arch", "resnet18", "--input-size", "48",
            "--batch-size", "16", "--lr", "0.01", "--max-iterations", "150", "--step-values", "110",
            "--val-every", "75", "--val-batches", "4", "--ckpt-every", "75", "--workers", "2", "--log-every", "10",
            "--deterministic", "--save-dir", str(save)]))
        scores = root / f"{modality}_val.npz"
        score.main(score.get_args_parser().parse_args([
            "--checkpoint", str(save / "latest.pt"), "--data", str(data), "--split", "val", "--out", str(scores),
            "--workers", "1"]))
        out[modality], out[f"{modality}_npz"] = save, scores
        out[f"{modality}_scores"] = dict(np.load(scores))
    return out


@pytest.fixture(scope="session")
def real_folders(tmp_path_factory) -> dict:
    """Real footage as class folders, packed: 8-frame segments of the three test clips at short side 64.

    source: street (bikes.mp4) and car (carphone_pristine.mp4), the even segments; target: other classes, indoors
    (the car's odd segments) and outdoors (the street's odd ones and g1.avi's schoolyard).
    """
    import av
    import cv2

    from pack.synth import write_video

    root = tmp_path_factory.mktemp("real")

    def frames(path, short=64):
        with av.open(str(path)) as container:
            images = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        h, w = images[0].shape[:2]
        size = (round(w * short / min(h, w)) // 2 * 2, round(h * short / min(h, w)) // 2 * 2)
        return [cv2.resize(image, size, interpolation=cv2.INTER_AREA) for image in images]

    plan = {"source": [("bikes.mp4", "street", 0), ("carphone_pristine.mp4", "car", 0)],
            "target": [("bikes.mp4", "outdoors", 1), ("carphone_pristine.mp4", "indoors", 1), ("g1.avi", "outdoors", None)]}
    out = {}
    for task, clips in plan.items():
        for clip, label, parity in clips:
            images = frames(DATA / clip)
            for k in range(len(images) // 8):
                if parity is None or k % 2 == parity:
                    folder = root / task / label
                    folder.mkdir(parents=True, exist_ok=True)
                    write_video(folder / f"{Path(clip).stem}_{k:03d}.mp4", images[8 * k:8 * k + 8], 25, "libx264")
        out[task] = root / f"data-{task}"
        assert run_pack("--folders", root / task, "--split", "train", "--out", out[task], "--stride", "2",
                        "--short-side", "48", "--flow-len", "2", "--flow", "dis", "--workers", "2",
                        "--shard-videos", "4") == 0
    return out
