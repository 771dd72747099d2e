"""Both loaders over real shards: same eval output, train augmentation, DDP split, bad input."""
from __future__ import annotations

import io
import json
import random
import re
import shutil
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
import torch

import loaders
from loaders.common import FLOW_MEAN, FLOW_STD, IMAGENET_MEAN, IMAGENET_STD
from conftest import ROOT
from pack.manifest import load_manifest, stamped, write_manifest
from pack.packer import PackParams
from pack.files import atomic_write_json
from pack.shards import CHECKSUMS, ShardWriter, checksum_table, key_of

BACKENDS = ["cpu", "dali"]


def all_batches(loader):
    images, labels, keys = [], [], []
    for x, y, k in loader:
        images.append(x.float().clone())  # a training batch's memory is reused for the next
        labels.append(y)
        keys += k or []
    return torch.cat(images), torch.cat(labels), keys


def build(data, backend, modality="rgb", train=False, **kw):
    kw.setdefault("workers", 1)
    return loaders.build(data, "val" if not train else "train", modality, train, kw.pop("batch_size", 8), crop=48,
                         backend=backend, device="cpu", **kw)


@pytest.mark.parametrize("modality", ["rgb", "flow"])
def test_eval_dali_cpu_mode_equals_cpu_loader(data, modality):
    a_images, a_labels, a_keys = all_batches(build(data, "dali", modality))
    b_images, b_labels, b_keys = all_batches(build(data, "cpu", modality))
    split = load_manifest(data)["splits"]["val"]
    assert a_keys == b_keys and len(a_keys) == split["samples"]
    assert torch.equal(a_labels, b_labels)
    assert a_images.shape == b_images.shape == (split["samples"], 3 if modality == "rgb" else 6, 48, 48)
    std = IMAGENET_STD[0] if modality == "rgb" else FLOW_STD
    assert (a_images - b_images).abs().mean() * std < 1.5  # grey levels: JPEG decoders and resamplers differ a little
    for key, label in zip(a_keys, a_labels.tolist()):  # labels match keys
        assert label == split["video_info"][key.split("/")[0]]["cls"]


def make_split(root, split: str, samples: list[tuple[str, dict[str, bytes]]], flow_len: int = 1) -> None:
    """A DATA split written by hand with the packer's own shard writer and records."""
    params = PackParams(flow_len=flow_len)
    split_dir = root / split
    for d in ("rgb", "flow", "records"):
        (split_dir / d).mkdir(parents=True, exist_ok=True)
    writers = {m: ShardWriter(split_dir / m / "shard-00000", 1 << 30) for m in ("rgb", "flow")}
    for key, parts in samples:
        for m, w in writers.items():
            w.write(key, {ext: b for ext, b in parts.items() if ext.startswith(m) or ext == "cls"})
    for w in writers.values():
        w.close()
    videos = {k.split("/")[0]: {"label": "ab"[int(parts["cls"])], "cls": int(parts["cls"]), "frames": 1, "samples": 1}
              for k, parts in samples}
    atomic_write_json(split_dir / "plan.json", {"params": params.__dict__, "classes": ["a", "b"], "groups": [[]]})
    atomic_write_json(split_dir / "records" / "00000.json", {"group": 0, "shards": {m: w.finished for m, w in writers.items()},
                                                            "videos": videos, "failed": {}, "seconds": {}})
    write_manifest(root)


def asymmetric(x_value: int) -> bytes:
    """Flow-style image: x constant, y a left-to-right ramp (tells whether it was mirrored), magnitude 128."""
    image = np.empty((64, 80, 3), np.uint8)
    image[..., 0] = x_value
    image[..., 1] = np.linspace(20, 235, 80).astype(np.uint8)[None, :]
    image[..., 2] = 128
    return simplejpeg.encode_jpeg(image, 95, colorspace="RGB", colorsubsampling="444")


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_crops_flips_and_flow_x_negation(tmp_path, backend):
    samples = [(f"v{i:03d}/000000", {"rgb.jpg": asymmetric(90), "flow0.jpg": asymmetric(200), "flow1.jpg": asymmetric(60),
                                     "cls": str(i % 2).encode()}) for i in range(96)]
    make_split(tmp_path, "train", samples, flow_len=2)
    for modality in ("rgb", "flow"):
        loader = loaders.build(tmp_path, "train", modality, True, 16, crop=40, backend=backend, device="cpu", workers=2)
        images, labels, _ = all_batches(loader)
        assert images.shape == (96, 3 if modality == "rgb" else 6, 40, 40) and images.dtype == torch.float32
        assert sorted(labels.tolist()) == [0] * 48 + [1] * 48
        mean = torch.tensor(IMAGENET_MEAN if modality == "rgb" else [FLOW_MEAN] * 6).view(1, -1, 1, 1)
        std = torch.tensor(IMAGENET_STD if modality == "rgb" else [FLOW_STD] * 6).view(1, -1, 1, 1)
        raw = images * std + mean
        ramp = raw[:, 1, :, :20].mean((1, 2)) < raw[:, 1, :, 20:].mean((1, 2))
        flipped = ~ramp
        assert 0.25 < flipped.float().mean() < 0.75, "flips should happen about half the time"
        x = raw[:, 0].mean((1, 2))
        if modality == "rgb":
            assert torch.allclose(x, torch.full_like(x, 90), atol=3)  # colour is not negated
        else:
            for channel, value in ((0, 200), (3, 60)):
                x = raw[:, channel].mean((1, 2))
                expected = torch.where(flipped, 255.0 - value, float(value))
                assert torch.allclose(x, expected, atol=3), "flow x must be negated exactly when flipped"


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_flip_mirrors_nothing(tmp_path, backend):
    """--no-flip (classes where left and right differ): training never mirrors a sample."""
    samples = [(f"v{i:03d}/000000", {"rgb.jpg": asymmetric(90), "flow0.jpg": asymmetric(200), "cls": b"0"}) for i in range(64)]
    make_split(tmp_path, "train", samples)
    for modality in ("rgb", "flow"):
        images, _, _ = all_batches(loaders.build(tmp_path, "train", modality, True, 16, crop=40, backend=backend,
                                                 device="cpu", workers=2, flip=False))
        mean = torch.tensor(IMAGENET_MEAN if modality == "rgb" else [FLOW_MEAN] * 3).view(1, -1, 1, 1)
        std = torch.tensor(IMAGENET_STD if modality == "rgb" else [FLOW_STD] * 3).view(1, -1, 1, 1)
        raw = images * std + mean
        assert len(images) == 64 and (raw[:, 1, :, :20].mean((1, 2)) < raw[:, 1, :, 20:].mean((1, 2))).all()
        if modality == "flow":
            assert torch.allclose(raw[:, 0].mean((1, 2)), torch.full((64,), 200.0), atol=3)  # x never negated


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_images_of_a_flow_sample_share_one_window_and_flip(tmp_path, backend):
    """Flow x5 stacks five images of one place and time: each sample's crop, scale and flip are the same for all."""
    from tests.test_cpu_loader import textured_jpeg

    image = textured_jpeg("444", 64, 80)
    samples = [(f"v{i:03d}/000000", {**{f"flow{k}.jpg": image for k in range(5)}, "cls": b"0"}) for i in range(32)]
    make_split(tmp_path, "train", samples, flow_len=5)
    images, _, _ = all_batches(loaders.build(tmp_path, "train", "flow", True, 8, crop=40, backend=backend,
                                             device="cpu", workers=2, scale_jitter=(0.9, 1.2)))
    assert images.shape == (32, 15, 40, 40)
    assert (images[:, :3] - images[:, :3].mean(0)).abs().mean() > 0.1, "the windows should differ between samples"
    for k in range(1, 5):
        assert torch.equal(images[:, 3 * k:3 * k + 3], images[:, :3])


@pytest.mark.parametrize("backend", BACKENDS)
def test_scale_jitter_varies_the_scale(tmp_path, backend):
    """The ramp's slope across a crop measures the resize: one scale without jitter, many with it."""
    samples = [(f"v{i:03d}/000000", {"rgb.jpg": asymmetric(90), "flow0.jpg": asymmetric(90), "cls": b"0"})
               for i in range(64)]
    make_split(tmp_path, "train", samples)
    spread = {}
    for jitter in (None, (0.95, 1.3)):
        loader = loaders.build(tmp_path, "train", "rgb", True, 16, crop=40, backend=backend, device="cpu", workers=2,
                               scale_jitter=jitter)
        images, _, _ = all_batches(loader)
        assert images.shape == (64, 3, 40, 40)
        ramp = images[:, 1] * IMAGENET_STD[1] + IMAGENET_MEAN[1]  # 20..235 across the 80 pixels of the frame
        slopes = (ramp[:, :, -4:].mean((1, 2)) - ramp[:, :, :4].mean((1, 2))).abs() / 36
        spread[jitter] = (slopes.std() / slopes.mean()).item()
        if jitter is None:  # the short side (64) resized to 1.1 x the crop: 215 levels over 80 x 44 / 64 pixels
            assert slopes.mean().item() == pytest.approx(215 / 79 * 64 / 44, rel=0.05)
    assert spread[None] < 0.02 and spread[(0.95, 1.3)] > 0.05, spread


def test_fp16_and_channels_last(data):
    images, _, _ = next(iter(build(data, "cpu", fp16=True, channels_last=True)))
    assert images.dtype == torch.float16 and images.is_contiguous(memory_format=torch.channels_last)
    images, _, _ = next(iter(build(data, "dali", fp16=True, channels_last=True)))
    assert images.dtype == torch.float16 and images.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ddp_ranks_see_disjoint_samples_that_cover_the_split(data, backend):
    keys = [all_batches(build(data, backend, rank=r, world_size=2, workers=2))[2] for r in (0, 1)]
    assert keys[0] and keys[1] and not set(keys[0]) & set(keys[1])
    assert len(keys[0]) + len(keys[1]) == load_manifest(data)["splits"]["val"]["samples"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_ddp_train_split_is_disjoint(tmp_path, backend):
    samples = [(f"v{i:03d}/000000", {"rgb.jpg": asymmetric(i), "flow0.jpg": asymmetric(i), "cls": b"0"}) for i in range(64)]
    make_split(tmp_path, "train", samples)
    seen = []
    for rank in (0, 1):
        loader = loaders.build(tmp_path, "train", "rgb", True, 8, crop=40, backend=backend, device="cpu", workers=1,
                               rank=rank, world_size=2)
        images, _, _ = all_batches(loader)
        mean = torch.tensor(IMAGENET_MEAN).view(1, -1, 1, 1)
        seen.append(set((images * torch.tensor(IMAGENET_STD).view(1, -1, 1, 1) + mean)[:, 0].mean((1, 2)).round().int().tolist()))
        assert len(images) == 32
    assert not seen[0] & seen[1]


def damaged_copy(data, tmp_path):
    copy = tmp_path / "data"
    if not copy.exists():
        shutil.copytree(data, copy)
    return copy, load_manifest(copy)["splits"]["val"]


def read_all(data, backend: str, train: bool = False, **kw):
    """Every batch of one epoch of the val split, its keys (eval) and labels, and the loader (for what it lost)."""
    loader = loaders.build(data, "val", "rgb", train, 8, crop=48, backend=backend, device="cpu", workers=2, **kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images, labels, keys = all_batches(loader)
    return images, labels, keys, loader, [str(w.message) for w in caught]


def rewrite_member(tar_path, name_end: str, data: bytes | None) -> str:
    """Replace (or, with None, drop) the first member whose name ends with name_end; its name.

    The sample's checksums are made anew to match (as if it had been packed so): what is tested
    is what a reader makes of such a member, not that its bytes changed.
    """
    with tarfile.open(tar_path) as t:
        members = [(m, t.extractfile(m).read()) for m in t.getmembers()]
    target = next(m.name for m, _ in members if m.name.endswith(name_end))
    key = key_of(target)
    sample = {m.name[len(key) + 1:]: (data if m.name == target else b) for m, b in members
              if key_of(m.name) == key and not m.name.endswith(CHECKSUMS) and not (m.name == target and data is None)}
    with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as t:
        for m, b in members:
            if m.name == target:
                if data is None:
                    continue
                b = data
            elif m.name == f"{key}.{CHECKSUMS}":
                b = checksum_table(key, sample)
            m.size = len(b)
            t.addfile(m, io.BytesIO(b))
    from wds2idx import IndexCreator  # keep the DALI index true to the new tar

    with IndexCreator(str(tar_path), str(tar_path.with_suffix(".idx")), verbose=False) as ic:
        ic.create_index()
    return target


def agree_on_damage(copy, lost: int, first_key: str, shard: str, reason: str) -> None:
    """Both loaders give the same samples and labels of damaged shards, and count what is gone in samples."""
    split = load_manifest(copy)["splits"]["val"]
    results = {backend: read_all(copy, backend) for backend in BACKENDS}
    for backend, (images, labels, keys, loader, caught) in results.items():
        assert len(keys) == split["samples"] - lost, backend
        assert loader.skipped == lost, backend
        assert [(Path(x.shard).name, x.first_key, x.samples) for x in loader.losses] == [(shard, first_key, lost)], backend
        assert reason in loader.losses[0].reason, backend
        assert any(f"{lost} of {split['samples']} samples lost" in w and "pack.verify" in w for w in caught), caught
    (_, cpu_labels, cpu_keys, *_), (_, dali_labels, dali_keys, *_) = results["cpu"], results["dali"]
    assert sorted(zip(cpu_keys, cpu_labels.tolist())) == sorted(zip(dali_keys, dali_labels.tolist()))
    for backend in BACKENDS:  # training: the same count, in full batches
        images, labels, _, loader, _ = read_all(copy, backend, train=True)
        assert len(labels) == (split["samples"] - lost) // 8 * 8 and loader.skipped == lost, backend


def test_a_truncated_shard_is_read_up_to_its_last_whole_sample(data, tmp_path):
    copy, split = damaged_copy(data, tmp_path)
    piece = split["shards"]["rgb"][0]
    tar = copy / piece["tar"]
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2 + 100])
    lines = (copy / piece["idx"]).read_text().splitlines()[1:]
    whole = sum(1 for line in lines if int(line.split()[5]) + int(line.split()[6]) <= tar.stat().st_size)
    assert 0 < whole < piece["samples"]
    first = lines[whole].split()[3].rsplit(".", 2)[0]
    agree_on_damage(copy, piece["samples"] - whole, first, tar.name, "truncated")


def test_a_zero_byte_shard_loses_its_samples_and_an_empty_one_is_valid(data, tmp_path):
    copy, split = damaged_copy(data, tmp_path)
    piece = split["shards"]["rgb"][0]
    first = (copy / piece["idx"]).read_text().splitlines()[1].split()[3].rsplit(".", 2)[0]
    (copy / piece["tar"]).write_bytes(b"")
    agree_on_damage(copy, piece["samples"], first, Path(piece["tar"]).name, "truncated")
    # a shard of no samples (an empty tar and an index that says 0) is valid and yields nothing
    (copy / piece["idx"]).write_text("v1.2 0\n")
    manifest = load_manifest(copy)
    manifest["splits"]["val"]["shards"]["rgb"][0]["samples"] = 0
    manifest["splits"]["val"]["samples"] -= piece["samples"]
    (copy / "manifest.json").write_text(json.dumps(stamped(manifest)))
    for backend in BACKENDS:
        _, _, keys, loader, caught = read_all(copy, backend)
        assert len(keys) == split["samples"] - piece["samples"] and loader.skipped == 0 and not caught, backend


def test_a_garbled_index_line_is_read_up_to_by_both_loaders(data, tmp_path):
    """An index line with one field too many (a member name with a space, as packs before safe keys wrote)."""
    copy, split = damaged_copy(data, tmp_path)
    piece = split["shards"]["rgb"][0]
    index = copy / piece["idx"]
    lines = index.read_text().splitlines()
    lines[1 + 5] = lines[1 + 5].replace(".rgb.jpg", " clip.rgb.jpg", 1)  # the sixth sample's line
    index.write_text("\n".join(lines) + "\n")
    agree_on_damage(copy, piece["samples"] - 5, "#5 of the shard", Path(piece["tar"]).name, "unreadable index")


def test_a_missing_index_is_refused_before_any_work(data, tmp_path):
    copy, split = damaged_copy(data, tmp_path)
    (copy / split["shards"]["rgb"][1]["idx"]).unlink()
    for backend in BACKENDS:
        with pytest.raises(FileNotFoundError, match="index.*missing.*wds2idx"):
            build(copy, backend)


def test_a_bad_label_is_skipped_by_both_loaders(data, tmp_path):
    copy, split = damaged_copy(data, tmp_path)
    tar = copy / split["shards"]["rgb"][0]["tar"]
    for bad, why in ((b"x", "not an integer"), (b"99", "out of range")):
        key = rewrite_member(tar, ".cls", bad).rsplit(".", 1)[0]
        agree_on_damage(copy, 1, key, tar.name, why)


def test_a_sample_missing_a_component_is_skipped_by_both_loaders(data, tmp_path):
    copy, split = damaged_copy(data, tmp_path)
    tar = copy / split["shards"]["rgb"][0]["tar"]
    key = rewrite_member(tar, ".cls", None).rsplit(".", 1)[0]
    agree_on_damage(copy, 1, key, tar.name, "missing its cls")


def test_an_undecodable_jpeg(data, tmp_path):
    """The CPU loader skips it; DALI stops with an error naming pack.verify, or crashes (its CPU mode, at batch 64) saying so."""
    copy, split = damaged_copy(data, tmp_path)
    tar = copy / split["shards"]["rgb"][0]["tar"]
    key = rewrite_member(tar, ".rgb.jpg", bytes(random.Random(1).randrange(256) for _ in range(3000))).rsplit(".", 2)[0]
    _, _, keys, loader, _ = read_all(copy, "cpu")
    assert len(keys) == split["samples"] - 1 and loader.losses[0].first_key == key
    for batch in (8, 64):
        done = subprocess.run([sys.executable, "-c", f"import loaders\nfor _ in loaders.build({str(copy)!r}, 'val', "
                               f"'rgb', False, {batch}, crop=48, backend='dali', device='cpu', workers=2): pass"],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode != 0 and f"python -m pack.verify {copy} --split val" in done.stderr, done.stderr[-3000:]


def test_clear_errors_before_any_work(data, tmp_path):
    with pytest.raises(FileNotFoundError, match="pack the data first"):
        loaders.build(tmp_path / "nothing", "val", "rgb", False, 8)
    with pytest.raises(ValueError, match="no split 'test'"):
        loaders.build(data, "test", "rgb", False, 8)
    with pytest.raises(ValueError, match="modality"):
        loaders.build(data, "val", "depth", False, 8)
    with pytest.raises(ValueError, match="flow-len 2"):
        loaders.build(data, "val", "flow", False, 8, flow_len=5)
    from conftest import run_pack

    csv = tmp_path / "k.csv"
    csv.write_text("label,youtube_id,time_start,time_end,split\na,nothere,0,10,train\n")
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "nothere.mp4").write_bytes(b"")  # its one video broken: a split of no samples
    run_pack("--csv", csv, "--videos", tmp_path / "videos", "--out", tmp_path / "empty", "--workers", "1")
    with pytest.raises(ValueError, match="no rgb shards"):
        loaders.build(tmp_path / "empty", "train", "rgb", True, 8)


def test_bench_prints_rates_and_ratios(data, tmp_path, capsys):
    from loaders import bench

    args = bench.get_args_parser().parse_args(
        ["--data", str(data), "--split", "train", "--modality", "flow", "--backend", "cpu", "--raw", "--batch-size", "4",
         "--crop", "48", "--workers", "1", "--seconds", "1", "--rounds", "2", "--files-dir", str(tmp_path / "files")])
    bench.main(args)
    out = capsys.readouterr().out
    assert "round 2/2" in out and "decode ceiling:" in out and "files:" in out
    assert re.search(r"cpu \(uint8\): +\d+ images/s = [\d.]+x files, \d+% of the decode ceiling", out)
    assert len(list((tmp_path / "files").rglob("*.jpg"))) == 2 * load_manifest(data)["splits"]["train"]["samples"]


def test_bench_skips_bad_data_in_its_baselines_as_the_loaders_do(data, tmp_path, capsys):
    from loaders import bench

    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    split = load_manifest(copy)["splits"]["train"]
    rewrite_member(copy / split["shards"]["rgb"][0]["tar"], ".rgb.jpg", b"\xff\xd8\xff\xe0 not a JPEG")
    (copy / split["shards"]["rgb"][1]["tar"]).write_bytes(b"")
    lost = 1 + split["shards"]["rgb"][1]["samples"]
    bench.main(bench.get_args_parser().parse_args(
        ["--data", str(copy), "--split", "train", "--modality", "rgb", "--backend", "cpu", "--batch-size", "4",
         "--crop", "40", "--workers", "1", "--seconds", "0.5", "--rounds", "1", "--files-dir", str(tmp_path / "files")]))
    out = capsys.readouterr().out
    assert f"the baselines leave out {lost} bad sample(s), as the loaders do" in out
    assert re.search(r"cpu \(CPU\): +\d+ images/s", out) and "files:" in out
    assert len(list((tmp_path / "files").rglob("*.jpg"))) == split["samples"] - lost
