"""TSN's segments: K frames a video, the loss on their mean logits, partial BN, dropout, score.py --frames N.

(The planned K-frame draws across loaders, kills and resumes are in test_resume.py, beside the frames'.)
"""
from __future__ import annotations

import argparse
import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

import nets
import score
import train
from loaders.plan import Segments, draws, rows
from test_train import FakeCuda
from training.run import build_model
from training.step import TrainStep, set_bn_eval


def test_a_videos_frames_come_one_from_each_of_k_equal_segments_and_short_videos_repeat():
    segments = Segments(3, [6, 9, 2, 1])  # videos of 6, 9, 2 and 1 samples, from sample 0, 6, 15 and 17
    assert segments.frames([0, 1, 2, 3]).tolist() == [1, 3, 5, 7, 10, 13, 15, 16, 16, 17, 17, 17]  # the centres
    places = np.random.default_rng(0).random((4, 3))
    drawn = segments.frames([0, 1, 2, 3], places).reshape(4, 3)
    assert drawn[0].tolist() == [int(2 * u) + 2 * j for j, u in enumerate(places[0])]  # 2 samples a segment
    assert all(6 + 3 * j <= f < 9 + 3 * j for j, f in enumerate(drawn[1]))
    assert set(drawn[2]) <= {15, 16} and drawn[3].tolist() == [17, 17, 17]  # fewer samples than K: repeated
    assert segments.frames([1, 0]).tolist() == [7, 10, 13, 1, 3, 5]  # video after video, in the order asked


def test_a_videos_frames_share_one_crop_scale_and_flip_and_frames_draw_as_before():
    segments = Segments(3, [6, 9, 2, 1])
    ids, augmentation = rows(7, 2, np.array([2, 0, 3, 1]), True, (0.8, 1.2), True, segments)
    per_video = augmentation.reshape(4, 3, 4)
    assert (per_video == per_video[:, :1]).all() and len({tuple(v[0]) for v in per_video}) == 4
    frames = np.array([5, 1, 9])  # no segments: each sample its own draws, as before segments
    assert np.array_equal(rows(7, 2, frames, True, (0.8, 1.2), True)[1], draws(7, 2, frames, (0.8, 1.2), True))


def consensus_loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """The loss written out: cross-entropy of the mean of each video's k per-frame logits (aux head likewise)."""
    out = model(images)
    logits, aux = (out.logits, out.aux_logits) if isinstance(out, tuple) else (out, None)
    loss = nn.functional.cross_entropy(logits.view(len(labels), k, -1).mean(1), labels)
    if aux is not None:
        loss = loss + nets.AUX_WEIGHT * nn.functional.cross_entropy(aux.view(len(labels), k, -1).mean(1), labels)
    return loss


@pytest.mark.parametrize("arch,size,k", [("resnet18", 32, 3), ("inception_v3", 299, 2)])  # its aux head needs 299
def test_the_step_takes_the_loss_on_the_mean_of_each_videos_logits(arch, size, k):
    torch.manual_seed(0)
    model = nets.build(arch, 5, "rgb").train()
    reference = copy.deepcopy(model)
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.amp.GradScaler("cpu", enabled=False),
                     None, False, segments=k)
    images, labels = torch.randn(2 * k, 3, size, size), torch.tensor([1, 4])
    torch.manual_seed(1)  # InceptionV3's dropout: the same masks in both
    loss = step(images, labels)
    torch.manual_seed(1)
    assert torch.allclose(loss, consensus_loss(reference, images, labels, k), rtol=1e-6, atol=1e-6)
    torch.manual_seed(1)
    per_frame = consensus_loss(reference, images, labels.repeat_interleave(k), 1)  # what frame sampling would take
    assert not torch.allclose(loss, per_frame, rtol=1e-3)


def test_the_graphed_step_takes_the_same_consensus(monkeypatch):
    """The function a CUDA graph captures, run through the graphed path (CUDA faked on the CPU, as test_train does)."""
    fake = FakeCuda(monkeypatch)
    eager, eager_weights, _ = fake.run(graphed=False, segments=3)
    graphed, weights, lines = fake.run(graphed=True, segments=3)
    assert fake.step.graph is not None and not lines and graphed == pytest.approx(eager, rel=1e-5)
    torch.manual_seed(0)
    model = nets.build("resnet18", 4, "rgb").train()
    batches = torch.Generator().manual_seed(1)
    images, labels = torch.randn(12, 3, 32, 32, generator=batches), torch.randint(0, 4, (4,), generator=batches)
    assert eager[0] == pytest.approx(consensus_loss(model, images, labels, 3).item(), rel=1e-6)


def test_partial_bn_leaves_only_the_first_batch_norm_in_training_mode():
    model = nets.build("resnet18", 4, "rgb").train()
    set_bn_eval(model, but_first=True)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms[0] is model.bn1 and norms[0].training and not any(m.training for m in norms[1:])


@pytest.fixture(scope="module")
def tsn_run(data, tmp_path_factory):
    """A run with --segments 3 --partial-bn --dropout 0.6, validated mid-way (training mode is set again after it)."""
    save = tmp_path_factory.mktemp("tsn") / "run"
    train.main(train.get_args_parser().parse_args(
        ["--data", str(data), "--modality", "rgb", "--arch", "resnet18", "--input-size", "32", "--batch-size", "4",
         "--segments", "3", "--partial-bn", "--dropout", "0.6", "--max-iterations", "4", "--val-every", "2",
         "--val-batches", "1", "--log-every", "2", "--workers", "1", "--save-dir", str(save)]))
    return save


def checkpoint(save) -> dict:
    return torch.load(save / "latest.pt", map_location="cpu", weights_only=True)


def test_a_run_with_partial_bn_updates_the_first_batch_norms_statistics_only(tsn_run):
    ckpt = checkpoint(tsn_run)
    stats = {k: v for k, v in ckpt["model"].items() if k.endswith("num_batches_tracked")}
    assert stats.pop("bn1.num_batches_tracked") == 4 and all(v == 0 for v in stats.values())
    assert not torch.equal(ckpt["model"]["bn1.running_mean"], torch.zeros(64))
    assert torch.equal(ckpt["model"]["layer4.1.bn2.running_var"], torch.ones(512))
    log = (tsn_run / "train.log").read_text()
    assert "batch 4 videos x 3 segments = 12 images" in log and "validation at 2: video top-1" in log
    assert ckpt["args"]["segments"] == 3 and ckpt["args"]["partial_bn"] is True


def test_dropout_is_recorded_and_drops_in_training_only(tsn_run):
    assert checkpoint(tsn_run)["args"]["dropout"] == 0.6
    torch.manual_seed(0)
    args = argparse.Namespace(arch="resnet18", modality="rgb", pretrained=None, dropout=0.6)
    model = build_model(args, ["a", "b", "c", "d"], 1, None, None, print)[0]  # as train.py builds it
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    set_bn_eval(model)  # batch statistics aside: only dropout can make two passes differ
    assert not torch.equal(model(x), model(x))
    inception = nets.build("inception_v3", 4, "rgb")
    nets.set_dropout(inception, "inception_v3", 0.8)
    assert inception.dropout.p == 0.8 and nets.DROPOUT["inception_v3"] == 0.5  # its own, replaced


def test_resume_keeps_k_and_init_may_change_it(data, tsn_run, tmp_path):
    common = ["--data", str(data), "--modality", "rgb", "--batch-size", "4", "--workers", "1", "--val-split", ""]
    with pytest.raises(SystemExit, match="--segments 1, but the run in .* was trained with 3"):
        train.main(train.get_args_parser().parse_args(
            common + ["--save-dir", str(tsn_run), "--resume", "--segments", "1", "--max-iterations", "6"]))
    with pytest.raises(SystemExit, match="--dropout 0.5, but the run in .* was trained with 0.6"):
        train.main(train.get_args_parser().parse_args(
            common + ["--save-dir", str(tsn_run), "--resume", "--dropout", "0.5", "--max-iterations", "6"]))
    frames = tmp_path / "frames"
    train.main(train.get_args_parser().parse_args(  # --init across K: the weights carry, the sampling is this run's
        common + ["--save-dir", str(frames), "--init", str(tsn_run / "latest.pt"), "--max-iterations", "2",
                  "--input-size", "32"]))
    ckpt = checkpoint(frames)
    assert ckpt["args"]["segments"] == 1 and ckpt["ranks"][0]["loader"]["segments"] == 1
    assert ckpt["args"]["dropout"] == 0.0 and not ckpt["args"]["partial_bn"]  # not carried: this run's own


def test_more_segments_than_a_video_has_samples_repeat_its_frames(data, tmp_path):
    """6 samples a video, K = 8: works, and the log says the frames repeat."""
    save = tmp_path / "k8"
    train.main(train.get_args_parser().parse_args(
        ["--data", str(data), "--modality", "rgb", "--arch", "resnet18", "--input-size", "32", "--batch-size", "2",
         "--segments", "8", "--max-iterations", "1", "--val-split", "", "--workers", "1", "--save-dir", str(save)]))
    assert "30 of 30 training videos have fewer than 8 samples: some of their frames repeat" in \
        (save / "train.log").read_text()
    for bad in ("0", "-2"):
        with pytest.raises(SystemExit):
            train.get_args_parser().parse_args(["--data", ".", "--modality", "rgb", "--segments", bad])


def test_score_frames_scores_n_evenly_spaced_frames_of_each_video_and_says_so(data, tsn_run, tmp_path, capsys):
    """6 samples a video (frames 0, 4, ..., 20): --frames 4 takes the centres of 4 segments of 1.5 samples, samples
    0, 2, 3, 5; --frames 10 (more than it has) each sample once."""
    for n, expected in ((4, [0, 8, 12, 20]), (10, [0, 4, 8, 12, 16, 20])):
        out = tmp_path / f"f{n}.npz"
        score.main(score.get_args_parser().parse_args(
            ["--checkpoint", str(tsn_run / "latest.pt"), "--data", str(data), "--split", "val", "--out", str(out),
             "--workers", "1", "--frames", str(n)]))
        z = np.load(out)
        for video in set(z["videos"].tolist()):
            assert sorted(z["frames"][z["videos"] == video].tolist()) == expected
        meta = json.loads(str(z["meta"]))
        assert meta["frames"] == n and meta["protocol"] == f"{n} evenly spaced frames a video (--frames {n})"
        assert not meta["coverage"]["partial"] and meta["coverage"]["of_samples"] == 12 * len(expected)
        assert json.loads(out.with_suffix(".json").read_text())["frames"] == n
        assert f"({n} evenly spaced frames a video (--frames {n}))" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        score.get_args_parser().parse_args(["--checkpoint", "x", "--data", ".", "--out", "y", "--frames", "0"])
