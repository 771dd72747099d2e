"""A fast CPU loader with the DALI pipelines' semantics, for machines without a GPU.

DataLoader workers execute the epoch's plan (loaders.plan), a batch's samples a task: they
read each sample through its shard's DALI index file (one mapped file per shard, no tar
parsing: it measured faster than webdataset's tar iterator), decode with libjpeg-turbo, cut
and flip as planned, and write uint8 batches straight into shared memory. Training batches
bound for a GPU carry each crop's window at the JPEG's own resolution: the GPU resizes it
to the crop (as DALI's pipelines resize on the GPU), then converts, normalises and goes
channels-last (loaders.common.normalise). On a CPU-only machine, and in eval, the workers
do all of it (resizing with OpenCV).

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
import multiprocessing as mp
import os
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
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from pack.workers import die_with_parent, opencv_threads_stopped

from .common import Loss, Stream, add_loss, merge_losses, normalise, normalised_shape, parse_label, warn_losses
from .plan import Lost, Planner, Segments, ShardReader, rows

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


class ShardSamples(Dataset):
    """Batches of decoded, augmented samples, one a task: a slice of the epoch's plan (loaders.plan) to execute.

    Each worker writes its samples straight into a batch in shared memory (no stacking, no
    copy on the way to the main process); normalise_as: normalise there too (CPU training).
    tags: where workers and consumer share which reused batches are held (training: the
    batches that leave a worker, uint8 or normalised, are reused).
    A task (turn, epoch, first, plan entries) gives (images or None, labels, keys, tag index or
    -1 for a batch that is not reused, Loss records, each row's place in the plan): what could
    not be read or decoded is left out and counted (one Loss a shard, in samples), so the
    batch may be short; CpuLoader pools short ones in order and knows where it is. With
    segments an entry is a video, its K frames K rows (a row a frame, labels included); a
    video with a frame that cannot be given is left out whole.
    where: shared bytes, WHERE_BYTES a worker, naming the shard and sample each worker is on
    (CpuLoader's report when a worker dies).

    The images are crop x crop, except in training batches for the device (uint8, no scale
    jitter): there they are the crops' windows, side x side source pixels, the device resizes
    (CpuLoader takes the side from the stream's first sample); windows of another size
    (frames of another size) are resized to it here. With scale jitter every window differs:
    resized here to the crop.
    """

    def __init__(self, stream: Stream, train: bool, crop: int, resize_ratio: float, scale_jitter, flip: bool,
                 seed: int, crop_pos: tuple[float, float], batch_size: int, side: int, normalise_as: tuple | None,
                 tags, where, segments: Segments | None = None):
        self.stream, self.train, self.crop, self.resize_ratio = stream, train, crop, resize_ratio
        self.scale_jitter, self.flip, self.seed, self.crop_pos = scale_jitter, flip, seed, crop_pos
        self.batch_size, self.side, self.normalise_as, self.tags, self.where = batch_size, side, normalise_as, tags, where
        self.segments = segments
        self._reader = None  # this process's ShardReader (made where it is used: mapped files stay in their process)
        self._ring = None  # this worker's SharedBatches (training: the batches that leave the worker)
        self._staging = None  # this worker's uint8 batch to normalise from (normalised batches leave)

    def __getitem__(self, task):
        turn, epoch, first, entries = task
        info = get_worker_info()
        if self._reader is None:
            self._reader = ShardReader(self.stream)
        images, slot = self._new_batch(info, turn)
        out = images.numpy()
        labels, keys, places, losses = [], [], [], {}
        k = self.segments.k if self.segments else 1
        ids, planned = rows(self.seed, epoch, entries, self.train, self.scale_jitter, self.flip, self.segments)
        ids, planned = ids.tolist(), planned.tolist() if planned is not None else [None] * len(ids)
        for unit, place in enumerate(range(first, first + len(entries))):
            # a bad sample leaves its rows half-written: the next entry's overwrite them
            done = self._unit(ids[unit * k:unit * k + k], planned[unit * k:unit * k + k], out[len(labels):], losses,
                              info)
            if done is not None:
                labels += done[0]
                keys += done[1]
                places += [place] * k
        if info is not None:
            _say_where(self.where, info.id, "waiting for its next batch")
        if not labels:  # nothing of this task could be read
            if slot >= 0:
                self.tags[slot] = 0
            return None, None, keys, -1, list(losses.values()), places
        images, slot = self._finish(images[:len(labels)], slot, info, turn)
        return images, torch.tensor(labels, dtype=torch.long), keys, slot, list(losses.values()), places

    def _unit(self, ids: list[int], planned: list, out: np.ndarray, losses: dict, info) -> tuple | None:
        """One plan entry's samples (a frame, or a video's K) decoded into out's first rows: (labels, keys), or None
        if one cannot be given (counted; a video is then left out whole)."""
        labels, keys = [], []
        for sample_id, augmentation, row in zip(ids, planned, out):
            try:
                sample = self._reader.read(sample_id)
            except Lost as e:
                add_loss(losses, e.shard, e.key, 1, str(e))
                return None
            if info is not None:
                _say_where(self.where, info.id, f"{sample['__url__']} sample {sample['__key__']}")
            try:
                labels.append(self._augment(sample, augmentation, row))
            except Exception as e:  # a corrupt JPEG, a bad label
                add_loss(losses, sample["__url__"], sample["__key__"], 1, str(e))
                return None
            keys.append(sample["__key__"])
        return labels, keys

    def _augment(self, sample: dict, augmentation: tuple | None, out: np.ndarray) -> int:
        """Decode and augment one sample into out (images x side x side x 3); its label.

        augmentation: training's (scale, crop x, crop y, mirrored) (loaders.plan.draws); eval: None.
        """
        stream, crop = self.stream, self.crop
        scale, x, y, flip = augmentation or (1.0, *self.crop_pos, False)
        short, pos = crop * self.resize_ratio * scale, (x, y)
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

    def _new_batch(self, info, turn: int) -> tuple[torch.Tensor, int]:
        """Where the next batch's uint8 images go, and its tag index (-1: not a reused batch)."""
        shape = (self.batch_size, len(self.stream.exts), self.side, self.side, 3)
        if info is None:  # in the main process: nothing to share
            return torch.empty(shape, dtype=torch.uint8), -1
        if self.normalise_as is not None:  # the normalised batch goes out; the uint8 one stays here
            if self._staging is None:
                self._staging = torch.empty(shape, dtype=torch.uint8)
            return self._staging, -1
        return self._shared(shape, torch.uint8, info, turn)

    def _shared(self, shape: tuple[int, ...], dtype: torch.dtype, info, turn: int) -> tuple[torch.Tensor, int]:
        """A batch in shared memory, and its tag index: a reused one in training, a fresh one (-1) in eval."""
        if not self.train:
            return torch.empty(shape, dtype=dtype).share_memory_(), -1
        if self._ring is None:
            self._ring = SharedBatches(self.tags, info.id, shape, dtype)
        return self._ring.take(turn)

    def _finish(self, images: torch.Tensor, slot: int, info, turn: int) -> tuple[torch.Tensor, int]:
        """The batch as it leaves: normalised here if asked (in a worker, into shared memory: saves a copy on send)."""
        if self.normalise_as is None:
            return images, slot
        stream, dtype, channels_last = self.normalise_as
        out = None
        if info is not None:
            out, slot = self._shared(normalised_shape((self.batch_size, *images.shape[1:]), channels_last),
                                     dtype, info, turn)
            out = out[:len(images)]  # a short batch fills the start of a reused one
        return normalise(images, stream, dtype, channels_last, out=out), slot


def window_side(stream: Stream, crop: int, short: float) -> int:
    """The side of training windows for the device: the first readable sample's (frames of one size share it)."""
    reader = ShardReader(stream)
    for sample_id in range(stream.samples):
        try:
            scaled = scaled_size(reader.read(sample_id)[stream.exts[0]], math.ceil(short))
        except (Lost, ValueError):  # a bad sample: no window to go by
            continue
        return footprint(*scaled[1:], short, crop, (0.0, 0.0))[2]
    return crop


class CpuLoader:
    """Iterates (images NCHW normalised, labels int64, keys) on `device`, executing the plan of each epoch.

    The plan (loaders.plan) fixes which samples come in which batch, and each sample's
    augmentation, whatever the worker count: workers only execute slices of it, and the
    DataLoader hands their batches back in order. In training every epoch yields all the
    full batches of this rank's samples: short batches (samples that could not be read) are
    pooled in order. `position()` says where it is; a loader made with a position goes on
    from there (resume), reading nothing of what it skips.
    Workers start from a fork of this process, or, once it holds a CUDA context (a model on
    the GPU), from a clean forkserver process: a fork of a CUDA process is not safe. They die
    with it (even by kill -9). A worker that dies is reported with its signal or exit code
    and the shard and sample it was on (its Python traceback, if it crashed in native code,
    is on stderr above), from the next batch asked for.
    """

    def __init__(self, stream: Stream, train: bool, batch_size: int, crop: int, resize_ratio: float = 1.1,
                 scale_jitter: tuple | None = None, flip: bool = True, device: str | torch.device = "cpu", rank: int = 0,
                 world_size: int = 1, num_workers: int = 2, shuffle_buffer: int = 4096, seed: int = 0,
                 fp16: bool = False, channels_last: bool = False, crop_pos: tuple[float, float] = (0.5, 0.5),
                 raw: bool = False, position: dict | None = None, segments: int = 1):
        self.stream, self.train, self.device, self.crop = stream, train, torch.device(device), crop
        self.dtype = torch.float16 if fp16 else torch.float32
        self.channels_last = channels_last
        self.planner = Planner(stream, train, seed, rank, world_size, batch_size, shuffle_buffer, segments)
        if position is not None:
            self.planner.load_state(position)
        context = mp.get_context("forkserver" if torch.cuda.is_initialized() else "fork")
        self.losses: list[Loss] = []  # every sample lost so far, by shard and epoch (workers send them with batches)
        self._tags = context.RawArray("q", max(num_workers, 1) * SLOTS)  # see SharedBatches
        self._where = context.RawArray("c", max(num_workers, 1) * WHERE_BYTES)  # see ShardSamples
        self._turn = 0  # passes over the loader so far (SharedBatches tells them apart)
        # On a GPU, uint8 batches cross the bus and the GPU resizes and normalises them; without
        # one, the workers do it in parallel rather than the main process alone.
        # raw: uint8 batches as the workers make them (N x L x S x S x 3), with no device step at all.
        self.on_cpu, self.raw = self.device.type == "cpu", raw
        in_workers = self.on_cpu and not raw
        windows = train and not scale_jitter and not in_workers
        self.dataset = ShardSamples(stream, train, crop, resize_ratio, scale_jitter, flip, seed, crop_pos,
                                    batch_size * self.planner.frames_per_entry,
                                    window_side(stream, crop, crop * resize_ratio) if windows else crop,
                                    normalise_as=(stream, self.dtype, channels_last) if in_workers else None,
                                    tags=self._tags, where=self._where, segments=self.planner.segments)
        self.batch_size = batch_size
        self._tasks = Tasks()  # this pass's slices of the plan, for the DataLoader to hand out
        self.loader = DataLoader(  # batch_size=None: a task is a batch, made by the worker
            self.dataset, batch_size=None, sampler=self._tasks, num_workers=num_workers, collate_fn=_as_is,
            worker_init_fn=_init_worker, pin_memory=self.device.type == "cuda",
            persistent_workers=train and num_workers > 0, generator=torch.Generator(),  # not the run's random state
            multiprocessing_context=context if num_workers > 0 else None, prefetch_factor=2 if num_workers else None)
        self._watching = False  # SIGCHLD reports a dead worker's whereabouts (_watch_workers)
        self._dead = None  # that report, for the next batch asked for
        self._batches = None  # the DataLoader's iterator of this epoch

    @property
    def skipped(self) -> int:
        """Samples lost so far (unreadable, cut short, undecodable, mislabelled), over all epochs: see `losses`."""
        return sum(loss.samples for loss in self.losses)

    def __len__(self) -> int:
        return self.planner.batches()

    def position(self) -> dict:
        """Where training is: the epoch and how many of its plan's samples the batches so far hold (loaders.plan)."""
        return self.planner.state()

    def __iter__(self):
        """Batches of this epoch. A training batch on the CPU (and a raw one) is valid until the next is asked for.

        With segments a batch is of batch_size videos: their K frames each, video after video
        (B x K images, their keys), and one label a video.
        """
        epoch_losses: dict[str, Loss] = {}  # this pass's, one record a shard
        turn, epoch, size, k = self._turn, self.planner.epoch, self.batch_size, self.planner.frames_per_entry
        tag = turn + 1  # what SharedBatches.take tags this pass's batches with
        self._turn += 1
        plan = self.planner.plan(epoch)
        self._tasks.tasks = [(turn, epoch, first, plan[first:first + size])
                             for first in range(self.planner.served, len(plan), size)]
        held = -1  # the reused batch the consumer has
        carry = []  # training: rows of short batches, and every batch after them, pooled in order into full ones
        with opencv_threads_stopped():  # the workers start (fork) here
            batches = self._batches = iter(self.loader)  # its workers: see _death_report
        self._watch_workers()
        try:
            while (item := self._next(batches)) is not None:
                images, labels, keys, slot, losses, places = item
                merge_losses(epoch_losses, losses)
                self._free(held, tag)  # the consumer asks for the next batch: it is done with the last
                held = -1
                if images is None:
                    continue
                if self.train and (carry or len(labels) < size * k):
                    carry.append((images.clone(), labels, keys, places))  # copied: its reused batch is free again
                    self._free(slot, tag)
                    if sum(len(part[1]) for part in carry) < size * k:
                        continue
                    images, labels, keys, places, carry = _pool(carry, size * k)
                elif not self.loader.pin_memory:  # with pin memory, the pinning thread copied it: free already
                    held = slot
                else:
                    self._free(slot, tag)
                if self.train:
                    self.planner.served = places[-1] + 1
                images = images.to(self.device, non_blocking=True)
                if not (self.on_cpu or self.raw):  # uint8 crossed the bus; the device normalises
                    images = normalise(images, self.stream, self.dtype, self.channels_last, size=self.crop)
                yield images, labels[::k].to(self.device, non_blocking=True), keys
            if self.train:  # what is left does not fill a batch: the next epoch begins
                self.planner.epoch, self.planner.served = epoch + 1, 0
        finally:
            self._free(held, tag)
            self._batches = None  # no epoch under way: a worker's end is not this loader's to report
            self.losses += epoch_losses.values()
        warn_losses(list(epoch_losses.values()), self.stream, self.skipped)

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
        except Exception as e:  # a worker that died while its batch was handed over: the connection is reset
            if "DataLoader worker" not in str(e) and not isinstance(e, ConnectionError):
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


class Tasks(Sampler):
    """The DataLoader's "indices": the tasks of the pass under way (CpuLoader sets them before each pass)."""

    def __init__(self):
        self.tasks = []

    def __iter__(self):
        return iter(self.tasks)

    def __len__(self) -> int:
        return len(self.tasks)


def _as_is(batch):
    return batch  # a worker's batch is made whole: nothing to collate


def _pool(parts: list[tuple], size: int) -> tuple:
    """One full batch out of parts (images, labels, keys, places), in order: its four, and the parts left over."""
    images, labels = torch.cat([part[0] for part in parts]), torch.cat([part[1] for part in parts])
    keys, places = [k for part in parts for k in part[2]], [p for part in parts for p in part[3]]
    rest = [(images[size:], labels[size:], keys[size:], places[size:])] if len(labels) > size else []
    return images[:size], labels[:size], keys[:size], places[:size], rest


WHERE_BYTES = 512  # per worker: "shard sample key", for the report when a worker dies


def _say_where(where, worker: int, what: str) -> None:
    """Write `what`, NUL-ended, into the worker's part of the shared bytes (0.3 us: a memoryview's copy)."""
    data, start = what.encode()[:WHERE_BYTES - 1], worker * WHERE_BYTES
    view = memoryview(where).cast("B")
    view[start:start + len(data)] = data
    view[start + len(data)] = 0


@functools.cache
def _flow_x_mask(size: int) -> np.ndarray:
    """255 on every x value of an H x W x 3 flow image (flattened), 0 elsewhere."""
    return np.tile(np.array([255, 0, 0], np.uint8), size // 3)


def _init_worker(_: int) -> None:
    die_with_parent()  # a worker never outlives the run (kill -9 of it included)
    cv2.setNumThreads(1)  # the workers are the parallelism
    if sys.__stderr__ is not None:  # a crash in native code (decoders) prints the Python stack before the worker dies
        faulthandler.enable(sys.__stderr__)
