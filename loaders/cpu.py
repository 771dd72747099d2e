"""A fast CPU loader with the DALI pipelines' semantics, for machines without a GPU.

webdataset streams the tar shards into DataLoader workers; each worker decodes with
libjpeg-turbo (simplejpeg), crops and flips in numpy, and batches uint8. Conversion to
float, normalisation and channels-last happen on the device (loaders.common.normalise).
"""
from __future__ import annotations

import math
import multiprocessing as mp
import random
import warnings

import cv2
import numpy as np
import simplejpeg
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .common import Stream, normalise


def decode(jpeg: bytes, min_short: int) -> np.ndarray:
    """RGB uint8; libjpeg-turbo decodes at the smallest DCT scale that keeps short side >= min_short."""
    height, width = simplejpeg.decode_jpeg_header(jpeg)[:2]
    scale = max(min_short / min(height, width), 1e-6)
    if scale < 1.0:
        return simplejpeg.decode_jpeg(jpeg, colorspace="RGB", min_height=math.ceil(height * scale),
                                      min_width=math.ceil(width * scale))
    return simplejpeg.decode_jpeg(jpeg, colorspace="RGB")


def crop_resized(image: np.ndarray, short: float, crop: int, pos: tuple[float, float], flip: bool) -> np.ndarray:
    """The crop x crop window at relative pos (0..1, 0..1) of the image resized to short side `short`.

    Only the window is resampled (one affine warp), never the whole resized image.
    """
    height, width = image.shape[:2]
    scale = short / min(height, width)
    out_h, out_w = max(crop, round(height * scale)), max(crop, round(width * scale))
    sx, sy = width / out_w, height / out_h
    x0, y0 = int(pos[0] * (out_w - crop) + 0.5), int(pos[1] * (out_h - crop) + 0.5)  # DALI rounds half up
    # output pixel (u, v) samples the resized image at (x0 + u, y0 + v), i.e. the source at
    # ((x0 + u + 0.5) * sx - 0.5, ...), pixel centres aligned as in cv2.resize and DALI
    if flip:
        m = np.array([[-sx, 0, (x0 + crop - 0.5) * sx - 0.5], [0, sy, (y0 + 0.5) * sy - 0.5]], np.float32)
    else:
        m = np.array([[sx, 0, (x0 + 0.5) * sx - 0.5], [0, sy, (y0 + 0.5) * sy - 0.5]], np.float32)
    flags = cv2.INTER_AREA if scale < 0.5 else cv2.INTER_LINEAR
    return cv2.warpAffine(image, m, (crop, crop), flags=flags | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REPLICATE)


class ShardSamples(IterableDataset):
    """Decoded, augmented uint8 samples of this rank's and worker's part of a stream."""

    def __init__(self, stream: Stream, train: bool, crop: int, resize_ratio: float, scale_jitter, rank: int,
                 world_size: int, shuffle_buffer: int, seed: int, skipped, crop_pos: tuple[float, float]):
        self.stream, self.train, self.crop, self.resize_ratio = stream, train, crop, resize_ratio
        self.scale_jitter, self.rank, self.world_size = scale_jitter, rank, world_size
        self.shuffle_buffer, self.seed, self.skipped, self.crop_pos = shuffle_buffer, seed, skipped, crop_pos
        self.epoch = 0

    def _handler(self, exn: Exception) -> bool:
        """Count and report a bad sample or shard, then go on (webdataset handler protocol)."""
        with self.skipped.get_lock():
            self.skipped.value += 1
        warnings.warn(f"skipped bad data: {exn}", stacklevel=2)
        return True

    def _parts(self):
        """Which shards to read and which of their samples to keep, for this rank and worker.

        With enough shards, each reader gets whole shards; with fewer shards than readers,
        every reader reads all shards and keeps every n-th sample (still disjoint).
        """
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        readers, me = self.world_size * workers, self.rank * workers + worker
        tars = list(self.stream.tars)
        if self.train:
            random.Random(self.seed + self.epoch).shuffle(tars)  # same order on every rank
        if len(tars) >= readers:
            return tars[me::readers], 1, 0
        return tars, readers, me

    def _augment(self, sample: dict, rng: random.Random):
        stream, crop = self.stream, self.crop
        short = crop * self.resize_ratio * (rng.uniform(*self.scale_jitter) if self.train and self.scale_jitter else 1.0)
        pos = (rng.random(), rng.random()) if self.train else self.crop_pos
        flip = self.train and rng.random() < 0.5
        images = [crop_resized(decode(sample[ext], math.ceil(short)), short, crop, pos, flip) for ext in stream.exts]
        image = images[0] if len(images) == 1 else np.concatenate(images, axis=2)
        if flip and stream.modality == "flow":
            image[..., 0::3] = 255 - image[..., 0::3]  # flow x is negated by a horizontal flip
        return image, int(sample["cls"])

    def __iter__(self):
        tars, every, offset = self._parts()
        worker = get_worker_info().id if get_worker_info() else 0
        rng = random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{worker}")
        self.epoch += 1
        samples = wds.tarfile_to_samples(handler=self._handler)(iter({"url": t} for t in tars))
        samples = (s for i, s in enumerate(samples) if i % every == offset)
        if self.train and self.shuffle_buffer > 1:
            samples = _shuffled(samples, self.shuffle_buffer, rng)
        for sample in samples:
            try:
                image, label = self._augment(sample, rng)
            except Exception as e:  # a corrupt JPEG, a missing component, a bad label
                self._handler(ValueError(f"{sample.get('__url__')}: sample {sample.get('__key__')}: {e!r}"))
                continue
            yield image, label, sample["__key__"]


class CpuLoader:
    """Iterates (images NCHW normalised, labels int64, keys or None) on `device`."""

    def __init__(self, stream: Stream, train: bool, batch_size: int, crop: int, resize_ratio: float = 1.1,
                 scale_jitter: tuple | None = None, device: str | torch.device = "cpu", rank: int = 0,
                 world_size: int = 1, num_workers: int = 2, shuffle_buffer: int = 4096, seed: int = 0,
                 fp16: bool = False, channels_last: bool = False, crop_pos: tuple[float, float] = (0.5, 0.5)):
        self.stream, self.train, self.device = stream, train, torch.device(device)
        self.dtype = torch.float16 if fp16 else torch.float32
        self.channels_last = channels_last
        self._skipped = mp.get_context("fork").Value("l", 0)
        self.dataset = ShardSamples(stream, train, crop, resize_ratio, scale_jitter, rank, world_size,
                                    shuffle_buffer, seed, self._skipped, crop_pos)
        self.samples = stream.samples // world_size
        self.batch_size = batch_size
        self.loader = DataLoader(
            self.dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate,
            pin_memory=self.device.type == "cuda", drop_last=train, persistent_workers=train and num_workers > 0,
            multiprocessing_context="fork" if num_workers > 0 else None, prefetch_factor=4 if num_workers else None)

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
            images = normalise(images.to(self.device, non_blocking=True), self.stream, self.dtype, self.channels_last)
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


def _collate(batch):
    images, labels, keys = zip(*batch)
    return torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.long), list(keys)
