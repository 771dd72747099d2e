"""A fast CPU loader with the DALI pipelines' semantics, for machines without a GPU.

DataLoader workers read their share of the shards through the shards' DALI index files
(one mapped file per shard, no tar parsing: it measured faster than webdataset's tar
iterator), decode with libjpeg-turbo (simplejpeg), resize, crop and flip with OpenCV, and
write uint8 batches straight into shared memory. Conversion to float, normalisation and
channels-last happen on the device (loaders.common.normalise); on a CPU-only machine, in
the workers.
"""
from __future__ import annotations

import math
import mmap
import multiprocessing as mp
import random
import warnings

import cv2
import numpy as np
import simplejpeg
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .common import Stream, key_of, normalise


def decode(jpeg: bytes, min_short: int, fast: bool = False) -> np.ndarray:
    """RGB uint8; libjpeg-turbo decodes at the smallest DCT scale that keeps short side >= min_short.

    fast: libjpeg-turbo's faster, slightly less exact IDCT and upsampling (for training).
    """
    height, width = simplejpeg.decode_jpeg_header(jpeg)[:2]
    scale = max(min_short / min(height, width), 1e-6)
    if scale < 1.0:
        return simplejpeg.decode_jpeg(jpeg, colorspace="RGB", fastdct=fast, fastupsample=fast,
                                      min_height=math.ceil(height * scale), min_width=math.ceil(width * scale))
    return simplejpeg.decode_jpeg(jpeg, colorspace="RGB", fastdct=fast, fastupsample=fast)


def read_shard(tar: str, index: str, every: int = 1, offset: int = 0):
    """Yield the samples of one shard as {ext: bytes, "__key__", "__url__"}, located by its index.

    Keeps sample i only where i % every == offset (skipped samples are never read). A sample
    whose bytes lie past the end of the file (a truncated shard) raises ValueError.
    """
    with open(index, encoding="utf-8") as f:
        lines = f.read().splitlines()[1:]  # after the "v1.2 <samples>" header
    with open(tar, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        for i, line in enumerate(lines):
            if i % every != offset:
                continue
            fields = line.split()
            sample = {"__url__": tar, "__key__": key_of(fields[3])}
            for ext, start, size in zip(fields[0::4], map(int, fields[1::4]), map(int, fields[2::4])):
                if start + size > len(data):
                    raise ValueError(f"{tar}: sample {sample['__key__']} lies past the end of the file (truncated shard)")
                sample[ext] = data[start:start + size]
            yield sample


def resize_crop(image: np.ndarray, short: float, crop: int, pos: tuple[float, float], flip: bool,
                exact: bool = True) -> np.ndarray:
    """The crop x crop window at relative pos of the image resized to short side `short`, mirrored if asked.

    exact: resize the whole image, then cut, with DALI's sizes and rounding, so that both
    loaders give the same eval crops. Otherwise (training) cut the window's footprint from
    the source and resize only that: a fraction of a pixel off, a third less work.
    """
    height, width = image.shape[:2]
    scale = short / min(height, width)
    out_h, out_w = max(crop, round(height * scale)), max(crop, round(width * scale))
    x0, y0 = int(pos[0] * (out_w - crop) + 0.5), int(pos[1] * (out_h - crop) + 0.5)  # DALI rounds half up
    interpolation = cv2.INTER_AREA if scale < 0.5 else cv2.INTER_LINEAR
    if exact:
        if (out_h, out_w) != (height, width):
            image = cv2.resize(image, (out_w, out_h), interpolation=interpolation)
        window = image[y0:y0 + crop, x0:x0 + crop]
    else:
        size_y, size_x = min(height, round(crop * height / out_h)), min(width, round(crop * width / out_w))
        top, left = min(round(y0 * height / out_h), height - size_y), min(round(x0 * width / out_w), width - size_x)
        window = image[top:top + size_y, left:left + size_x]
        if window.shape[:2] != (crop, crop):
            window = cv2.resize(window, (crop, crop), interpolation=interpolation)
    return cv2.flip(window, 1) if flip else np.ascontiguousarray(window)


class ShardSamples(IterableDataset):
    """Batches of decoded, augmented samples of this rank's and worker's part of a stream.

    Each worker writes its samples straight into a batch in shared memory (no stacking, no
    copy on the way to the main process); normalise_as: normalise there too (CPU training).
    """

    def __init__(self, stream: Stream, train: bool, crop: int, resize_ratio: float, scale_jitter, rank: int,
                 world_size: int, shuffle_buffer: int, seed: int, skipped, crop_pos: tuple[float, float],
                 batch_size: int, normalise_as: tuple | None):
        self.stream, self.train, self.crop, self.resize_ratio = stream, train, crop, resize_ratio
        self.scale_jitter, self.rank, self.world_size = scale_jitter, rank, world_size
        self.shuffle_buffer, self.seed, self.skipped, self.crop_pos = shuffle_buffer, seed, skipped, crop_pos
        self.batch_size, self.normalise_as = batch_size, normalise_as
        self.epoch = 0

    def _handler(self, exn: Exception) -> None:
        """Count and report a bad sample or shard, then go on."""
        with self.skipped.get_lock():
            self.skipped.value += 1
        warnings.warn(f"skipped bad data: {exn}", stacklevel=2)

    def _parts(self):
        """Which shards to read and which of their samples to keep, for this rank and worker.

        With enough shards, each reader gets whole shards; with fewer shards than readers,
        every reader reads all shards and keeps every n-th sample (still disjoint).
        """
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        readers, me = self.world_size * workers, self.rank * workers + worker
        shards = list(zip(self.stream.tars, self.stream.indexes))
        if self.train:
            random.Random(self.seed + self.epoch).shuffle(shards)  # same order on every rank
        if len(shards) >= readers:
            return shards[me::readers], 1, 0
        return shards, readers, me

    def _augment(self, sample: dict, rng: random.Random):
        stream, crop = self.stream, self.crop
        short = crop * self.resize_ratio * (rng.uniform(*self.scale_jitter) if self.train and self.scale_jitter else 1.0)
        pos = (rng.random(), rng.random()) if self.train else self.crop_pos
        flip = self.train and rng.random() < 0.5
        images = [resize_crop(decode(sample[ext], math.ceil(short), fast=self.train), short, crop, pos, flip,
                              exact=not self.train) for ext in stream.exts]
        image = images[0] if len(images) == 1 else cv2.merge(images)  # 7x faster than np.concatenate here
        if flip and stream.modality == "flow":
            image[..., 0::3] = 255 - image[..., 0::3]  # flow x is negated by a horizontal flip
        return image, int(sample["cls"])

    def _samples(self, shards, every: int, offset: int):
        for tar, index in shards:
            try:
                yield from read_shard(tar, index, every, offset)
            except (OSError, ValueError) as e:  # unreadable or truncated: the rest of it is lost
                self._handler(e)

    def _batch(self, images: torch.Tensor, labels: list[int], keys: list[str], in_worker: bool):
        if self.normalise_as is not None:
            images = normalise(images, *self.normalise_as, shared=in_worker)
        return images, torch.tensor(labels, dtype=torch.long), keys

    def __iter__(self):
        shards, every, offset = self._parts()
        info = get_worker_info()
        in_worker = info is not None
        rng = random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{info.id if in_worker else 0}")
        self.epoch += 1
        samples = self._samples(shards, every, offset)
        if self.train and self.shuffle_buffer > 1:
            samples = _shuffled(samples, self.shuffle_buffer, rng)
        shape = (self.batch_size, self.crop, self.crop, self.stream.channels)
        images, labels, keys = None, [], []
        for sample in samples:
            try:
                image, label = self._augment(sample, rng)
            except Exception as e:  # a corrupt JPEG, a missing component, a bad label
                self._handler(ValueError(f"{sample.get('__url__')}: sample {sample.get('__key__')}: {e!r}"))
                continue
            if images is None:
                images = torch.empty(shape, dtype=torch.uint8)
                if in_worker and self.normalise_as is None:
                    images.share_memory_()
            images.numpy()[len(labels)] = image
            labels.append(label)
            keys.append(sample["__key__"])
            if len(labels) == self.batch_size:
                yield self._batch(images, labels, keys, in_worker)
                images, labels, keys = None, [], []
        if labels and not self.train:  # training drops the last partial batch
            yield self._batch(images[:len(labels)], labels, keys, in_worker)


class CpuLoader:
    """Iterates (images NCHW normalised, labels int64, keys or None) on `device`."""

    def __init__(self, stream: Stream, train: bool, batch_size: int, crop: int, resize_ratio: float = 1.1,
                 scale_jitter: tuple | None = None, device: str | torch.device = "cpu", rank: int = 0,
                 world_size: int = 1, num_workers: int = 2, shuffle_buffer: int = 4096, seed: int = 0,
                 fp16: bool = False, channels_last: bool = False, crop_pos: tuple[float, float] = (0.5, 0.5),
                 raw: bool = False):
        self.stream, self.train, self.device = stream, train, torch.device(device)
        self.dtype = torch.float16 if fp16 else torch.float32
        self.channels_last = channels_last
        self._skipped = mp.get_context("fork").Value("l", 0)
        # On a GPU, uint8 batches cross the bus and the GPU normalises them; without one, the
        # workers normalise in parallel rather than the main process alone.
        # raw: uint8 NHWC batches as the workers make them, with no device step at all.
        self.on_cpu, self.raw = self.device.type == "cpu", raw
        in_workers = self.on_cpu and not raw
        self.dataset = ShardSamples(stream, train, crop, resize_ratio, scale_jitter, rank, world_size,
                                    shuffle_buffer, seed, self._skipped, crop_pos, batch_size,
                                    normalise_as=(stream, self.dtype, channels_last) if in_workers else None)
        self.samples = stream.samples // world_size
        self.batch_size = batch_size
        self.loader = DataLoader(  # batch_size=None: the workers make the batches
            self.dataset, batch_size=None, num_workers=num_workers, worker_init_fn=_init_worker,
            pin_memory=self.device.type == "cuda", persistent_workers=train and num_workers > 0,
            multiprocessing_context="fork" if num_workers > 0 else None, prefetch_factor=2 if num_workers else None)

    @property
    def skipped(self) -> int:
        """Bad samples (or broken shards) skipped so far; each was also reported as a warning."""
        return self._skipped.value

    def __len__(self) -> int:
        n = self.samples / self.batch_size
        return int(n) if self.train else math.ceil(n)

    def __iter__(self):
        skipped_before = self.skipped
        for images, labels, keys in self.loader:
            images = images.to(self.device, non_blocking=True)
            if not (self.on_cpu or self.raw):  # uint8 crossed the bus; the device normalises
                images = normalise(images, self.stream, self.dtype, self.channels_last)
            yield images, labels.to(self.device, non_blocking=True), None if self.train else keys
        if self.skipped > skipped_before:  # the workers' own warnings went to their stderr
            warnings.warn(f"skipped bad data: {self.skipped - skipped_before} bad sample(s) or shard(s) this epoch "
                          f"({self.skipped} in all); the reasons were printed above", stacklevel=2)


def _shuffled(items, size: int, rng: random.Random):
    """Shuffle a stream through a buffer of `size` items (shards alone are read in order)."""
    buffer = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


def _init_worker(_: int) -> None:
    cv2.setNumThreads(1)  # the workers are the parallelism
