"""The CPU loader's fast paths: cut-out JPEG decoding (the _jpeg_region extension), reused batches, normalisation."""
from __future__ import annotations

import functools
import os
import random
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import simplejpeg
import torch

import loaders
from loaders import cpu
from loaders.common import Stream, normalise_numpy, normalise_torch
from loaders.cpu import SLOTS, SharedBatches, decode_box, scaled_size
from tests.test_loaders import asymmetric, make_split


def textured_jpeg(subsampling: str, height: int = 150, width: int = 230) -> bytes:
    """Gradients plus noise: every MCU differs, so a misplaced box cannot pass."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[:height, :width]
    image = np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], -1) + rng.integers(0, 40, (height, width, 3))
    return simplejpeg.encode_jpeg(np.clip(image, 0, 255).astype(np.uint8), 90, colorspace="RGB",
                                  colorsubsampling=subsampling)


def test_the_extension_is_built():
    assert cpu.decode_region is not None, (
        "loaders._jpeg_region was not built: install libjpeg-turbo's headers (Debian/Ubuntu: "
        "apt install libjpeg-turbo8-dev or libjpeg62-turbo-dev), then pip install -e . again")


@pytest.mark.parametrize("subsampling", ["420", "444"])  # rgb frames, flow images
@pytest.mark.parametrize("with_extension", [True, False])
def test_decode_box_is_the_whole_decode_cut(subsampling, with_extension, monkeypatch):
    if not with_extension:
        monkeypatch.setattr(cpu, "decode_region", None)
    jpeg = textured_jpeg(subsampling)
    rng = random.Random(0)
    for min_short in (40, 75, 150):  # DCT scales 3/8, 4/8 and 8/8
        scaled = scaled_size(jpeg, min_short)
        n, height, width = scaled
        assert min(height, width) >= min_short and (n == 1 or min(height, width) * (n - 1) / n < min_short)
        whole = simplejpeg.decode_jpeg(jpeg, colorspace="RGB", fastdct=True, fastupsample=True,
                                       min_height=height, min_width=width)
        assert whole.shape == (height, width, 3)
        boxes = [(0, 0, height, width), (height - 1, width - 1, 1, 1), (0, width - 17, height, 17), (5, 3, 1, width - 3)]
        for _ in range(20):
            h, w = rng.randint(1, height), rng.randint(1, width)
            boxes.append((rng.randint(0, height - h), rng.randint(0, width - w), h, w))
        for top, left, h, w in boxes:
            assert np.array_equal(decode_box(jpeg, scaled, (top, left, h, w)), whole[top:top + h, left:left + w])


def test_bad_jpegs_and_boxes_raise():
    jpeg = textured_jpeg("420")
    out = np.empty(1 << 20, np.uint8)
    for bad in (jpeg[: len(jpeg) // 2], b"\xff\xd8\xff\xe0 not a JPEG", b""):
        with pytest.raises(ValueError, match="corrupt JPEG"):
            cpu.decode_region(bad, 8, 0, 0, 150, 230, True, out)
    with pytest.raises(ValueError, match="scale_num"):
        cpu.decode_region(jpeg, 0, 0, 0, 150, 230, True, out)
    with pytest.raises(ValueError, match="outside"):
        cpu.decode_region(jpeg, 8, 10, 0, 150, 230, True, out)
    with pytest.raises(ValueError, match="out holds"):
        cpu.decode_region(jpeg, 8, 0, 0, 150, 230, True, np.empty(100, np.uint8))


def test_shared_batches_wait_for_the_consumer():
    tags = torch.multiprocessing.get_context("fork").RawArray("q", SLOTS)
    ring = SharedBatches(tags, 0, (2, 1, 4, 4, 3))
    held = [ring.take(epoch=0) for _ in range(SLOTS)]
    assert len({b.data_ptr() for b, _ in held}) == SLOTS and all(tags[slot] == 1 for _, slot in held)
    taken = []
    thread = threading.Thread(target=lambda: taken.append(ring.take(epoch=0)))
    thread.start()
    time.sleep(0.2)
    assert not taken, "a batch the consumer holds must not be handed out again"
    tags[held[0][1]] = 0  # the consumer is done with the first
    thread.join(5)
    assert taken and taken[0][0].data_ptr() == held[0][0].data_ptr()
    assert ring.take(epoch=1)[0].data_ptr() == held[1][0].data_ptr()  # a past epoch's batches are free


@pytest.mark.parametrize("raw, shape, dtype", [(True, (8, 2, 44, 44, 3), torch.uint8),  # for a GPU: the crops' windows
                                               (False, (8, 6, 40, 40), torch.float32)])  # for CPU training
def test_training_batches_stay_intact_while_held_and_epochs_restart(tmp_path, raw, shape, dtype):
    """Training batches are reused: each must stay as it is until the next one is asked for."""
    samples = [(f"v{i:03d}/000000", {"rgb.jpg": asymmetric(i), "flow0.jpg": asymmetric(3 * i), "flow1.jpg": asymmetric(60),
                                     "cls": str(i % 2).encode()}) for i in range(64)]
    make_split(tmp_path, "train", samples, flow_len=2)
    loader = loaders.build(tmp_path, "train", "flow", True, 8, crop=40, backend="cpu", device="cpu", workers=2,
                           raw=raw, shuffle_buffer=1)
    for i, (images, labels, _) in enumerate(loader):  # an epoch left early: its held batches must not block the next
        if i == 1:
            break
    for epoch in range(2):  # the epoch left early goes on from where it was left (its 6 other batches), then a whole one
        batches = 0
        for images, labels, _ in loader:  # raw: windows, 44 x 44 pixels of the 64 x 80 images at DCT scale 6/8
            assert images.shape == shape and images.dtype == dtype
            before = images.clone()
            time.sleep(0.05)  # the workers run ahead meanwhile
            assert torch.equal(images, before), "a batch must not change until the next one is asked for"
            batches += 1
        assert batches == (6 if epoch == 0 else 8) and len(loader) == 8


@pytest.mark.parametrize("modality", ["rgb", "flow"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_gpus_normalisation_equals_the_cpus(modality, channels_last, dtype):
    """normalise_torch runs on the GPU in training; here it must agree with the CPU workers' numpy path."""
    stream = Stream(tars=[], indexes=[], modality=modality, flow_len=3, samples=0, classes=[])
    images = torch.randint(0, 256, (4, len(stream.exts), 6, 5, 3), dtype=torch.uint8)
    a = normalise_torch(images, stream, dtype, channels_last)
    b = normalise_numpy(images, stream, dtype, channels_last)
    assert a.shape == b.shape == (4, stream.channels, 6, 5) and a.dtype == b.dtype == dtype
    assert a.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert torch.allclose(a.float(), b.float(), atol=1e-2)
    k, c = 1 if modality == "flow" else 0, 2  # channel 3k + c is channel c of image k
    expected = (images[:, k, :, :, c].float() - stream.mean[3 * k + c]) / stream.std[3 * k + c]
    assert torch.allclose(b[:, 3 * k + c].float(), expected, atol=1e-2)


@pytest.mark.parametrize("modality", ["rgb", "flow"])
@pytest.mark.parametrize("crop, side", [(40, 44), (64, 58)])  # the device shrinks the windows, enlarges them
def test_windows_resized_by_the_device_equal_the_crops_made_on_the_cpu(tmp_path, modality, crop, side):
    """For a GPU the workers send the crops' windows and the GPU resizes them; a CPU-only run resizes in the workers."""
    samples = [(f"v{i:03d}/000000", {"rgb.jpg": textured_jpeg("420", 64, 80), "flow0.jpg": textured_jpeg("444", 64, 80),
                                     "flow1.jpg": asymmetric(60), "cls": str(i % 2).encode()}) for i in range(32)]
    make_split(tmp_path, "train", samples, flow_len=2)
    build = functools.partial(loaders.build, tmp_path, "train", modality, True, 8, crop=crop, backend="cpu",
                              device="cpu", workers=1, seed=3)
    windows = [(images.clone(), labels) for images, labels, _ in build(raw=True)]
    crops = list(build())
    assert len(windows) == len(crops) == 4
    stream = build().stream
    for (window, labels), (crop_batch, crop_labels, _) in zip(windows, crops):
        assert window.shape == (8, len(stream.exts), side, side, 3) and torch.equal(labels, crop_labels)
        resized = normalise_torch(window, stream, torch.float32, False, size=crop)
        assert resized.shape == crop_batch.shape == (8, stream.channels, crop, crop)
        levels = (resized - crop_batch).abs() * torch.tensor(stream.std).view(1, -1, 1, 1)
        assert levels.max() < 2.0 and levels.mean() < 0.3, "torch's bilinear and OpenCV's differ by rounding only"


def distinct_samples(root, count: int, flow_len: int = 1) -> None:
    """A train split of `count` samples in one shard, sample i all of grey level i (tells which samples came)."""
    samples = [(f"v{i:03d}/000000", {"rgb.jpg": asymmetric(i), **{f"flow{k}.jpg": asymmetric(i) for k in range(flow_len)},
                                     "cls": b"0"}) for i in range(count)]
    make_split(root, "train", samples, flow_len=flow_len)


def grey_levels(images: torch.Tensor) -> list[int]:
    from loaders.common import IMAGENET_MEAN, IMAGENET_STD

    return (images[:, 0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]).mean((1, 2)).round().int().tolist()


@pytest.mark.parametrize("raw", [False, True])
def test_more_workers_than_the_shards_can_feed_still_fill_every_batch(tmp_path, raw):
    """8 workers share 60 samples: 7-8 each, none a batch of 8 alone; pooled, the epoch gives all 7 full batches."""
    distinct_samples(tmp_path, 60)
    loader = loaders.build(tmp_path, "train", "rgb", True, 8, crop=40, backend="cpu", device="cpu", workers=8,
                           raw=raw, shuffle_buffer=1)
    for _ in range(2):
        seen = []
        for images, labels, _ in loader:
            assert images.shape[0] == labels.shape[0] == 8
            seen += grey_levels(normalise_torch(images, loader.stream, torch.float32, False, size=40) if raw else images)
        assert len(seen) == len(loader) * 8 == 56
        assert len(set(seen)) == 56 and all(0 <= level < 60 for level in seen), "each sample at most once"


def test_a_split_that_cannot_fill_one_batch_is_refused_before_any_work(tmp_path):
    distinct_samples(tmp_path, 12)
    for backend in ("cpu", "dali"):
        with pytest.raises(ValueError, match="12 training samples.*not one full batch of 16"):
            loaders.build(tmp_path, "train", "rgb", True, 16, crop=40, backend=backend, device="cpu")
        with pytest.raises(ValueError, match=r"6 for each of 2 processes.*batch of 8"):
            loaders.build(tmp_path, "train", "rgb", True, 8, crop=40, backend=backend, device="cpu", world_size=2)
    assert len(list(loaders.build(tmp_path, "train", "rgb", True, 12, crop=40, backend="cpu",
                                  device="cpu", workers=2))) == 1


def test_a_worker_that_dies_says_how_and_where(tmp_path, monkeypatch):
    """A worker killed by a signal (a crash in a decoder, say): the error names the signal, the shard and the sample."""
    import os
    import signal

    distinct_samples(tmp_path, 40)
    real = cpu.ShardSamples._augment

    def crash_on_v017(self, sample, rng, out):
        if sample["__key__"] == "v017/000000":
            os.kill(os.getpid(), signal.SIGSEGV)
        return real(self, sample, rng, out)

    monkeypatch.setattr(cpu.ShardSamples, "_augment", crash_on_v017)
    for train in (True, False):  # persistent workers (training) and workers of one epoch (eval)
        loader = cpu.CpuLoader(loaders.open_stream(tmp_path, "train", "rgb"), train, 4, crop=40, num_workers=2)
        with pytest.raises(RuntimeError) as error:
            for _ in loader:
                time.sleep(0.05)
        message = str(error.value)
        assert "SIGSEGV" in message and "shard-00000-000.tar sample v017/000000" in message, message
        assert message.count("v017/000000") == 1, message


def test_workers_from_a_forkserver_give_the_same_batches(data, monkeypatch):
    """Once this process holds a CUDA context the workers start from a forkserver: the same batches."""
    def batches():
        loader = loaders.build(data, "val", "flow", False, 8, crop=48, backend="cpu", device="cpu", workers=2)
        return [(x.clone(), y, k) for x, y, k in loader]

    forked = batches()
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    served = batches()
    assert len(forked) == len(served) > 2
    for (a, y, k), (b, z, m) in zip(forked, served):
        assert torch.equal(a, b) and torch.equal(y, z) and k == m


def test_workers_start_in_a_process_whose_opencv_threads_run(data, tmp_path):
    """A fork while OpenCV's thread pool runs hung the workers in cv2.setNumThreads (seen after predict.py ran in-process)."""
    script = tmp_path / "opencv_first.py"
    script.write_text(f"""
import cv2, numpy as np, loaders, sys
from conftest import run_pack
big = np.zeros((2000, 2000, 3), np.uint8)
for _ in range(5):
    cv2.resize(big, (1000, 1000))  # OpenCV's threads now run in this process
loader = loaders.build({str(data)!r}, "val", "rgb", False, 8, crop=48, backend="cpu", device="cpu", workers=2)
print("samples", sum(len(k) for _, _, k in loader))
cv2.resize(big, (1000, 1000))
print("pack", run_pack("--csv", {str(data.parent / 'synth0' / 'val.csv')!r}, "--videos", {str(data.parent / 'synth0' / 'videos')!r},
      "--out", {str(tmp_path / 'packed')!r}, "--workers", "2", "--flow", "dis", "--short-side", "48"))
""")
    from conftest import ROOT

    done = subprocess.run([sys.executable, str(script)], cwd=ROOT / "tests", capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"})
    assert done.returncode == 0 and "samples 72" in done.stdout and "pack 0" in done.stdout, done.stderr[-2000:]
