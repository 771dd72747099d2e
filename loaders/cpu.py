"""A fast CPU loader with the DALI pipelines' semantics, for machines without a GPU.

DataLoader workers read their share of the shards through the shards' DALI index files
(one mapped file per shard, no tar parsing: it measured faster than webdataset's tar
iterator), decode with libjpeg-turbo, cut and flip, and write uint8 batches straight into
shared memory. Training batches bound for a GPU carry each crop's window at the JPEG's own
resolution: the GPU resizes it to the crop (as DALI's pipelines resize on the GPU), then
converts, normalises and goes channels-last (loaders.common.normalise). On a CPU-only
machine, and in eval, the workers do all of it (resizing with OpenCV).

Where the time goes, per training image, and what keeps it down:
- decoding: only the part of the JPEG under the crop (the _jpeg_region C extension, as
  DALI's random-crop decoder does); eval decodes whole images (simplejpeg);
- resizing: on the GPU (on the CPU it cost half a decode at crop 299); on a CPU-only
  machine, only the window, straight into the batch (no copies);
- batches: in training, each worker reuses a few shared-memory batches (SharedBatches), as
  DALI's PyTorch iterator reuses its output tensors: fresh shared memory costs a page fault
  per 4 KiB on first write, a tenth of a decode per uint8 image, 4 times that per float one;
- flow: each image is written whole (N x L x H x W x 3; the device interleaves), a flip's
  x negation is one XOR.
"""
from __future__ import annotations

import faulthandler
import functools
import math
import mmap
import multiprocessing as mp
import os
import random
import re
import signal
import sys
import threading
import time
import weakref

import cv2
import numpy as np
import simplejpeg
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pack.shards import index_entries, key_of, read_index, whole_samples
from pack.workers import opencv_threads_stopped

from .common import Loss, Stream, add_loss, normalise, normalised_shape, parse_label, pool, warn_losses

try:
    from ._jpeg_region import decode_region
except ImportError:  # built without libjpeg-turbo's headers: whole images are decoded, then cut
    decode_region = None


def scaled_size(jpeg: bytes, min_short: int) -> tuple[int, int, int]:
    """(n, height, width): libjpeg's smallest DCT scale n/8 (n <= 8) keeping the short side >= min_short, and the size at it."""
    height, width = simplejpeg.decode_jpeg_header(jpeg)[:2]
    n = next((n for n in range(1, 8) if -(-min(height, width) * n // 8) >= min_short), 8)
    return n, -(-height * n // 8), -(-width * n // 8)


def decode(jpeg: bytes, min_short: int) -> np.ndarray:
    """The whole image, RGB uint8, at the smallest DCT scale that keeps the short side >= min_short."""
    _, height, width = scaled_size(jpeg, min_short)
    return simplejpeg.decode_jpeg(jpeg, colorspace="RGB", min_height=height, min_width=width)


def decode_box(jpeg: bytes, scaled: tuple[int, int, int], box) -> np.ndarray:
    """Only the box (top, left, height, width) of a JPEG decoded at scaled = scaled_size(...).

    With the _jpeg_region extension (built where libjpeg-turbo's headers are), only the box's
    rows and columns are decoded, into a buffer this process reuses: the result is valid
    until the next call. Without the extension, the whole image is decoded, then cut.
    Decoding is libjpeg-turbo's fast mode (as simplejpeg's fastdct and fastupsample): with
    its smooth upsampling, a cut-out decode differs from the whole one at the box's edges.
    """
    global _region_buffer
    (n, height, width), (top, left, size_y, size_x) = scaled, box
    if decode_region is None:
        whole = simplejpeg.decode_jpeg(jpeg, colorspace="RGB", fastdct=True, fastupsample=True,
                                       min_height=height, min_width=width)
        return whole[top:top + size_y, left:left + size_x]
    if _region_buffer.size < size_y * (size_x + 32) * 3:  # libjpeg widens the box to whole MCUs
        _region_buffer = np.empty(size_y * (size_x + 32) * 3, np.uint8)
    x, row = decode_region(jpeg, n, top, left, size_y, size_x, True, _region_buffer)
    return _region_buffer[:size_y * row * 3].reshape(size_y, row, 3)[:, left - x:left - x + size_x]


_region_buffer = np.empty(0, np.uint8)


class ShardError(Exception):
    """The rest of a shard cannot be read, from its sample `first` on (key: that sample's, if the index names it)."""

    def __init__(self, first: int, key: str | None, reason: str):
        super().__init__(reason)
        self.first, self.key = first, key


def read_shard(tar: str, index: str, every: int = 1, offset: int = 0):
    """Yield the samples of one shard as {ext: bytes, "__key__", "__url__"}, located by its index.

    Keeps sample i only where i % every == offset (skipped samples are never read). Samples
    whose bytes lie past the end of the file (a truncated shard) are not read: after the
    whole ones, ShardError says from which sample on the shard is lost, as it does for an
    index or a file that cannot be read at all.
    """
    try:
        lines = read_index(index)
        with open(tar, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
    except (OSError, ValueError) as e:
        raise ShardError(0, None, f"unreadable: {e}") from None
    whole, lost_key, problem = whole_samples(lines, size)
    try:
        for i in range(offset, whole, every):
            entries = index_entries(lines[i])
            sample = {"__url__": tar, "__key__": key_of(entries[0][3])}
            for ext, start, length, _ in entries:
                sample[ext] = data[start:start + length]
            yield sample
    finally:
        if isinstance(data, mmap.mmap):
            data.close()
    if problem:
        raise ShardError(whole, lost_key, problem)


def crop_window(height: int, width: int, short: float, crop: int, pos: tuple[float, float]):
    """(out_h, out_w, y0, x0): the size after resizing to short side `short`, and where the crop sits.

    DALI's sizes and rounding, so that both loaders cut the same eval crops.
    """
    scale = short / min(height, width)
    out_h, out_w = max(crop, round(height * scale)), max(crop, round(width * scale))
    return out_h, out_w, int(pos[1] * (out_h - crop) + 0.5), int(pos[0] * (out_w - crop) + 0.5)  # half up


def footprint(height: int, width: int, short: float, crop: int, pos: tuple[float, float]):
    """(top, left, height, width): the part of the image that resizing and cropping turn into the crop.

    Training decodes and resizes only that: a fraction of a pixel off the exact crop, much less work.
    Square (unless the image is narrower), the same for all images of one size: the device
    can resize a batch of them at once.
    """
    out_h, out_w, y0, x0 = crop_window(height, width, short, crop, pos)
    side = round(crop * min(height, width) / short)
    size_y, size_x = min(height, side), min(width, side)
    return min(round(y0 * height / out_h), height - size_y), min(round(x0 * width / out_w), width - size_x), size_y, size_x


def resize_crop(image: np.ndarray, short: float, crop: int, pos: tuple[float, float]) -> np.ndarray:
    """The crop x crop window at relative pos of the image resized to short side `short` (eval: exact)."""
    height, width = image.shape[:2]
    out_h, out_w, y0, x0 = crop_window(height, width, short, crop, pos)
    if (out_h, out_w) != (height, width):
        image = cv2.resize(image, (out_w, out_h), interpolation=_interpolation(short / min(height, width)))
    return image[y0:y0 + crop, x0:x0 + crop]


def eval_view(jpeg: bytes, crop: int, short: float, pos: tuple[float, float]) -> np.ndarray:
    """The eval (and test-time) view of one JPEG: decoded whole, resized to short side `short`, the crop at pos."""
    return resize_crop(decode(jpeg, math.ceil(short)), short, crop, pos)


def fit(window: np.ndarray, side: int, flip: bool, out: np.ndarray | None = None) -> np.ndarray:
    """window resized to side x side (if it is not) and mirrored if asked, in `out` if given (saves a copy)."""
    if window.shape[:2] != (side, side):
        out = cv2.resize(window, (side, side), dst=out, interpolation=_interpolation(side / window.shape[0]))
    elif out is None:
        out = np.ascontiguousarray(window)
    else:
        out[:] = window
    return cv2.flip(out, 1, dst=out) if flip else out


def _interpolation(scale: float) -> int:
    return cv2.INTER_AREA if scale < 0.5 else cv2.INTER_LINEAR


SLOTS = 4  # reused batches per worker: 2 queued (the DataLoader's prefetch), 1 with the consumer, 1 filling


class SharedBatches:
    """A worker's ring of shared-memory batches, and which ones the consumer still holds.

    tags (shared with the main process, SLOTS per worker): 0 or a past epoch's tag means free;
    a batch handed out in epoch e is tagged e + 1 until the consumer is done with it and sets
    0 (CpuLoader.__iter__). A worker that finds its next batch still held waits for it.
    """

    def __init__(self, tags, worker: int, shape: tuple[int, ...], dtype: torch.dtype = torch.uint8):
        self.tags, self.first = tags, worker * SLOTS
        self.batches = [torch.empty(shape, dtype=dtype).share_memory_() for _ in range(SLOTS)]
        self.next = 0
        self.parent = os.getppid()

    def take(self, epoch: int) -> tuple[torch.Tensor, int]:
        """The next free batch and its tag's index, tagged as held in this epoch."""
        slot = self.first + self.next
        while self.tags[slot] > epoch:  # still held by the consumer
            if os.getppid() != self.parent:  # the consumer is gone: do not wait for ever
                raise RuntimeError("the loader's main process exited")
            time.sleep(0.0005)
        self.tags[slot] = epoch + 1
        batch = self.batches[self.next]
        self.next = (self.next + 1) % SLOTS
        return batch, slot


class ShardSamples(IterableDataset):
    """Batches of decoded, augmented samples of this rank's and worker's part of a stream.

    Each worker writes its samples straight into a batch in shared memory (no stacking, no
    copy on the way to the main process); normalise_as: normalise there too (CPU training).
    tags: where workers and consumer share which reused batches are held (training: the
    batches that leave a worker, uint8 or normalised, are reused).
    Yields (images, labels, keys, tag index or -1 for a batch that is not reused); a worker's
    last batch of an epoch is partial (in training, CpuLoader pools these remainders). What it
    could not read or decode comes in between, as Loss records (one a shard, in samples).
    where: shared bytes, WHERE_BYTES a worker, naming the shard and sample each worker is on
    (CpuLoader's report when a worker dies).

    The images are crop x crop, except in training batches for the device (uint8, no scale
    jitter): there they are the crops' windows, S x S source pixels, the device resizes. S
    is a worker's first window side; windows of another size (frames of another size)
    are resized to S here. With scale jitter every window differs: resized here to the crop.
    """

    def __init__(self, stream: Stream, train: bool, crop: int, resize_ratio: float, scale_jitter, flip: bool,
                 rank: int, world_size: int, shuffle_buffer: int, seed: int, crop_pos: tuple[float, float],
                 batch_size: int, normalise_as: tuple | None, tags, where):
        self.stream, self.train, self.crop, self.resize_ratio = stream, train, crop, resize_ratio
        self.scale_jitter, self.flip, self.rank, self.world_size = scale_jitter, flip, rank, world_size
        self.shuffle_buffer, self.seed, self.crop_pos = shuffle_buffer, seed, crop_pos
        self.batch_size, self.normalise_as, self.tags, self.where = batch_size, normalise_as, tags, where
        self.epoch = 0
        self._losses: dict[str, Loss] = {}  # what this worker lost since it last said so, by shard
        self.side = None  # the side of the images this worker writes (see above)
        self._ring = None  # this worker's SharedBatches (training: the batches that leave the worker)
        self._staging = None  # this worker's uint8 batch to normalise from (normalised batches leave)

    def _lost(self):
        """The Loss records gathered since the last call (they travel to the main process between batches)."""
        losses, self._losses = list(self._losses.values()), {}
        return losses

    def _parts(self):
        """Which shards to read and which of their samples to keep, for this rank and worker.

        With enough shards, each reader gets whole shards; with fewer shards than readers,
        every reader reads all shards and keeps every n-th sample (still disjoint).
        """
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        readers, me = self.world_size * workers, self.rank * workers + worker
        shards = list(zip(self.stream.tars, self.stream.indexes, self.stream.shard_samples))
        if self.train:
            random.Random(self.seed + self.epoch).shuffle(shards)  # same order on every rank
        if len(shards) >= readers:
            return shards[me::readers], 1, 0
        return shards, readers, me

    def _side(self, sample: dict) -> int:
        """The side of the images this worker writes: the crop, or the sample's window (see above)."""
        if not self.train or self.scale_jitter or self.normalise_as is not None:
            return self.crop
        short = self.crop * self.resize_ratio
        try:
            scaled = scaled_size(sample[self.stream.exts[0]], math.ceil(short))
        except (KeyError, ValueError):  # a bad sample (_augment reports it): no window to go by
            return self.crop
        return footprint(*scaled[1:], short, self.crop, (0.0, 0.0))[2]

    def _augment(self, sample: dict, rng: random.Random, out: np.ndarray) -> int:
        """Decode and augment one sample into out (images x side x side x 3); its label."""
        stream, crop = self.stream, self.crop
        short = crop * self.resize_ratio * (rng.uniform(*self.scale_jitter) if self.train and self.scale_jitter else 1.0)
        pos = (rng.random(), rng.random()) if self.train else self.crop_pos
        flip = self.train and rng.random() < 0.5 and self.flip
        for jpeg, image in zip((sample[ext] for ext in stream.exts), out):
            if self.train:
                scaled = scaled_size(jpeg, math.ceil(short))
                window = decode_box(jpeg, scaled, footprint(*scaled[1:], short, crop, pos))
            else:
                window = eval_view(jpeg, crop, short, pos)
            fit(window, self.side, flip, image)
            if flip and stream.modality == "flow":  # flow x is negated by a flip: x -> 255 - x = x ^ 255
                flat = image.reshape(-1)
                np.bitwise_xor(flat, _flow_x_mask(flat.size), out=flat)
        return parse_label(sample["cls"], stream)

    def _samples(self, shards, every: int, offset: int):
        for tar, index, count in shards:
            if not count:  # a shard of no samples: valid, nothing to read
                continue
            try:
                yield from read_shard(tar, index, every, offset)
            except ShardError as e:  # the rest of it is lost: this reader's share of its samples from e.first on
                lost = len(range(e.first + (offset - e.first) % every, count, every))
                add_loss(self._losses, tar, e.key or f"#{e.first} of the shard", lost, str(e))

    def _new_batch(self, info, epoch: int) -> tuple[torch.Tensor, int]:
        """Where the next batch's uint8 images go, and its tag index (-1: not a reused batch)."""
        shape = (self.batch_size, len(self.stream.exts), self.side, self.side, 3)
        if info is None:  # in the main process: nothing to share
            return torch.empty(shape, dtype=torch.uint8), -1
        if self.normalise_as is not None:  # the normalised batch goes out; the uint8 one stays here
            if self._staging is None:
                self._staging = torch.empty(shape, dtype=torch.uint8)
            return self._staging, -1
        return self._shared(shape, torch.uint8, info, epoch)

    def _shared(self, shape: tuple[int, ...], dtype: torch.dtype, info, epoch: int) -> tuple[torch.Tensor, int]:
        """A batch in shared memory, and its tag index: a reused one in training, a fresh one (-1) in eval."""
        if not self.train:
            return torch.empty(shape, dtype=dtype).share_memory_(), -1
        if self._ring is None:
            self._ring = SharedBatches(self.tags, info.id, shape, dtype)
        return self._ring.take(epoch)

    def _batch(self, images: torch.Tensor, labels: list[int], keys: list[str], slot: int, info, epoch: int):
        if self.normalise_as is not None:
            stream, dtype, channels_last = self.normalise_as
            out = None
            if info is not None:  # in a worker: into shared memory (saves a copy on send)
                out, slot = self._shared(normalised_shape((self.batch_size, *images.shape[1:]), channels_last),
                                         dtype, info, epoch)
                out = out[:len(labels)]  # a remainder fills the start of a reused batch
            images = normalise(images, stream, dtype, channels_last, out=out)
        return images, torch.tensor(labels, dtype=torch.long), keys, slot

    def __iter__(self):
        shards, every, offset = self._parts()
        info = get_worker_info()
        epoch = self.epoch
        rng = random.Random(f"{self.seed}/{epoch}/{self.rank}/{info.id if info else 0}")
        self.epoch += 1
        samples = self._samples(shards, every, offset)
        if self.train and self.shuffle_buffer > 1:
            samples = _shuffled(samples, self.shuffle_buffer, rng)
        images, slot, labels, keys = None, -1, [], []
        for sample in samples:
            if info is not None:
                _say_where(self.where, info.id, f"{sample['__url__']} sample {sample['__key__']}")
            if images is None:
                self.side = self.side or self._side(sample)
                images, slot = self._new_batch(info, epoch)
                rows = images.numpy()
            try:  # a bad sample leaves its row half-written: the next one overwrites it
                label = self._augment(sample, rng, rows[len(labels)])
            except Exception as e:  # a corrupt JPEG, a missing component, a bad label
                reason = f"missing its {e.args[0]}" if isinstance(e, KeyError) else str(e)
                add_loss(self._losses, sample["__url__"], sample["__key__"], 1, reason)
                continue
            labels.append(label)
            keys.append(sample["__key__"])
            if len(labels) == self.batch_size:
                yield from self._lost()
                yield self._batch(images, labels, keys, slot, info, epoch)
                images, labels, keys = None, [], []
        yield from self._lost()
        if labels:  # the remainder: kept in eval, pooled with other workers' in training
            yield self._batch(images[:len(labels)], labels, keys, slot, info, epoch)
        if info is not None:
            _say_where(self.where, info.id, "done with its share of the epoch")


class CpuLoader:
    """Iterates (images NCHW normalised, labels int64, keys or None) on `device`.

    In training every epoch yields all the full batches of this rank's samples, whatever the
    worker count: the workers' remainders are pooled into full batches here.
    Workers start from a fork of this process, or, once it holds a CUDA context (a model on
    the GPU), from a clean forkserver process: a fork of a CUDA process is not safe.
    A worker that dies is reported with its signal or exit code and the shard and sample it
    was on (its Python traceback, if it crashed in native code, is on stderr above), from the
    next batch asked for.
    """

    def __init__(self, stream: Stream, train: bool, batch_size: int, crop: int, resize_ratio: float = 1.1,
                 scale_jitter: tuple | None = None, flip: bool = True, device: str | torch.device = "cpu", rank: int = 0,
                 world_size: int = 1, num_workers: int = 2, shuffle_buffer: int = 4096, seed: int = 0,
                 fp16: bool = False, channels_last: bool = False, crop_pos: tuple[float, float] = (0.5, 0.5),
                 raw: bool = False):
        self.stream, self.train, self.device, self.crop = stream, train, torch.device(device), crop
        self.dtype = torch.float16 if fp16 else torch.float32
        self.channels_last = channels_last
        context = mp.get_context("forkserver" if torch.cuda.is_initialized() else "fork")
        self.losses: list[Loss] = []  # every sample lost so far, by shard and epoch (workers send them in-band)
        self._tags = context.RawArray("q", max(num_workers, 1) * SLOTS)  # see SharedBatches
        self._where = context.RawArray("c", max(num_workers, 1) * WHERE_BYTES)  # see ShardSamples
        self._epoch = 0
        # On a GPU, uint8 batches cross the bus and the GPU resizes and normalises them; without
        # one, the workers do it in parallel rather than the main process alone.
        # raw: uint8 batches as the workers make them (N x L x S x S x 3), with no device step at all.
        self.on_cpu, self.raw = self.device.type == "cpu", raw
        in_workers = self.on_cpu and not raw
        self.dataset = ShardSamples(stream, train, crop, resize_ratio, scale_jitter, flip, rank, world_size,
                                    shuffle_buffer, seed, crop_pos, batch_size,
                                    normalise_as=(stream, self.dtype, channels_last) if in_workers else None,
                                    tags=self._tags, where=self._where)
        self.samples = stream.samples // world_size
        self.batch_size = batch_size
        self.loader = DataLoader(  # batch_size=None: the workers make the batches
            self.dataset, batch_size=None, num_workers=num_workers, worker_init_fn=_init_worker,
            pin_memory=self.device.type == "cuda", persistent_workers=train and num_workers > 0,
            multiprocessing_context=context if num_workers > 0 else None, prefetch_factor=2 if num_workers else None)
        self._watching = False  # SIGCHLD reports a dead worker's whereabouts (_watch_workers)
        self._dead = None  # that report, for the next batch asked for
        self._batches = None  # the DataLoader's iterator of this epoch

    @property
    def skipped(self) -> int:
        """Samples lost so far (unreadable, cut short, undecodable, mislabelled), over all epochs: see `losses`."""
        return sum(loss.samples for loss in self.losses)

    def __len__(self) -> int:
        n = self.samples / self.batch_size
        return int(n) if self.train else math.ceil(n)

    def __iter__(self):
        """Batches of this epoch. A training batch on the CPU (and a raw one) is valid until the next is asked for."""
        losses_before = len(self.losses)
        self.dataset.epoch = self._epoch  # workers started now begin here; persistent ones count along
        tag = self._epoch + 1  # what SharedBatches.take tags this epoch's batches with
        self._epoch += 1
        held = -1  # the reused batch the consumer has
        remainders = []  # training: the workers' partial last batches, pooled into full ones
        with opencv_threads_stopped():  # the workers start (fork) here
            batches = self._batches = iter(self.loader)  # its workers: see _death_report
        self._watch_workers()
        try:
            while (item := self._next(batches)) is not None:
                if isinstance(item, Loss):
                    self.losses.append(item)
                    continue
                images, labels, keys, slot = item
                self._free(held, tag)  # the consumer asks for the next batch: it is done with the last
                held = -1
                if self.train and len(labels) < self.batch_size:
                    remainders.append((images.clone(), labels))  # copied: its reused batch is free again
                    self._free(slot, tag)
                    if sum(len(y) for _, y in remainders) < self.batch_size:
                        continue
                    images, labels, remainders = pool(remainders, self.batch_size)
                elif not self.loader.pin_memory:  # with pin memory, the pinning thread copied it: free already
                    held = slot
                else:
                    self._free(slot, tag)
                images = images.to(self.device, non_blocking=True)
                if not (self.on_cpu or self.raw):  # uint8 crossed the bus; the device normalises
                    images = normalise(images, self.stream, self.dtype, self.channels_last, size=self.crop)
                yield images, labels.to(self.device, non_blocking=True), None if self.train else keys
        finally:
            self._free(held, tag)
            self._batches = None  # no epoch under way: a worker's end is not this loader's to report
        warn_losses(self.losses[losses_before:], self.stream, self.skipped)

    def _free(self, slot: int, tag: int) -> None:
        if slot >= 0 and self._tags[slot] == tag:  # not if a later epoch reuses it already
            self._tags[slot] = 0

    def _next(self, batches):
        """The DataLoader's next batch, or None at the epoch's end; a worker's death says where it was."""
        if self._dead is not None:  # a worker died since the last batch (_watch_workers)
            dead, self._dead = self._dead, None
            raise dead
        try:
            return next(batches)
        except StopIteration:
            return None
        except Exception as e:
            if "DataLoader worker" not in str(e):
                raise
            raise RuntimeError(self._death_report(e)) from e

    def _watch_workers(self) -> None:
        """Add the whereabouts to the error the DataLoader raises from SIGCHLD when a worker is killed, and raise it
        from this loader's next batch.

        The DataLoader raises it wherever the main thread is when the signal arrives (in the
        middle of a training step, say): hence a handler around the DataLoader's own, which
        keeps it for the next batch asked for. A run stopping on SIGTERM (which a scheduler
        sends its workers too) finishes its step and saves without asking for another.
        """
        if self._watching or threading.current_thread() is not threading.main_thread():
            return
        previous = signal.getsignal(signal.SIGCHLD)
        if not callable(previous):  # no workers (or no DataLoader handler): nothing to add to
            return
        loader = weakref.ref(self)  # the handler outlives the loader: it must not keep it alive

        def handler(signum, frame):
            try:
                previous(signum, frame)
            except RuntimeError as e:
                if loader() is None:
                    raise
                loader()._dead = RuntimeError(loader()._death_report(e))

        signal.signal(signal.SIGCHLD, handler)
        self._watching = True

    def _death_report(self, error: Exception) -> str:
        """The DataLoader's error, with each dead or failing worker's signal or exit code and shard and sample."""
        if str(error).startswith("loader worker "):  # reported already (by the SIGCHLD handler)
            return str(error)
        processes = getattr(self._batches, "_workers", [])  # the DataLoader iterator's worker processes
        failing = {int(i) for i in re.findall(r"worker process (\d+)", str(error))}
        lines = []
        for i, process in enumerate(processes):
            if process.is_alive() and i not in failing:
                continue
            code = process.exitcode
            how = ("raised the exception below" if code is None else f"exited with code {code}" if code >= 0
                   else f"was killed by signal {signal.Signals(-code).name}")
            where = bytes(self._where[i * WHERE_BYTES:(i + 1) * WHERE_BYTES]).split(b"\0")[0].decode(errors="replace")
            lines.append(f"loader worker {i} (pid {process.pid}) {how}; it was on {where or 'no sample yet'}")
        return "\n".join(lines + [f"({error})"]) if lines else str(error)


WHERE_BYTES = 512  # per worker: "shard sample key", for the report when a worker dies


def _say_where(where, worker: int, what: str) -> None:
    """Write `what`, NUL-ended, into the worker's part of the shared bytes (0.3 us: a memoryview's copy)."""
    data, start = what.encode()[:WHERE_BYTES - 1], worker * WHERE_BYTES
    view = memoryview(where).cast("B")
    view[start:start + len(data)] = data
    view[start + len(data)] = 0


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


@functools.cache
def _flow_x_mask(size: int) -> np.ndarray:
    """255 on every x value of an H x W x 3 flow image (flattened), 0 elsewhere."""
    return np.tile(np.array([255, 0, 0], np.uint8), size // 3)


def _init_worker(_: int) -> None:
    cv2.setNumThreads(1)  # the workers are the parallelism
    if sys.__stderr__ is not None:  # a crash in native code (decoders) prints the Python stack before the worker dies
        faulthandler.enable(sys.__stderr__)
