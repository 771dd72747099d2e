"""NVIDIA DALI pipelines over the shards: nvJPEG decoding and augmentation on the GPU.

One pipeline function per mode, DALI-style; `device="gpu"` decodes with nvJPEG ("mixed"),
`device="cpu"` runs the same graph on the CPU (DALI's CPU mode, `device_id=None`).

Bad data, as the CPU loader treats it (the same samples from the same shards): a shard cut
short is read up to its last whole sample (DALI is given an index of those), an empty one is
left out, a sample missing a component is skipped (by the reader), a label that is not an
integer in range drops its row (checked here, on the host, before the batch is used; in
training the rows left are pooled into full batches). All are counted in samples (`losses`).
What DALI cannot do: tell a JPEG whose data is damaged behind an intact header (it decodes
it, with warnings on the CPU); `python -m pack.verify` finds those. On a JPEG it cannot
decode at all it stops with an error, and in its CPU mode it has crashed the process
(a segmentation fault) while doing so: the crash prints where it was and what to run.
"""
from __future__ import annotations

import contextlib
import dataclasses
import faulthandler
import functools
import os
import shutil
import sys
import tempfile
import weakref
from pathlib import Path

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali import math as dmath
from nvidia.dali.plugin.base_iterator import LastBatchPolicy
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from pack.shards import index_entries, key_of, read_index, whole_samples

from .common import Loss, Stream, add_loss, parse_label, pool, warn_losses

try:
    from . import _crash_hint
except ImportError:  # built without a C compiler: faulthandler alone says where a crash was
    _crash_hint = None

LABEL_BYTES = 9  # `cls` is an ASCII integer of at most 8 characters; padded to this width to batch it (a 9th: too long)
WHERE_BYTES = 512  # "tar:offset:member" of a sample's first image, padded


def _read(stream: Stream, paths: list[str], index_paths: list[str], shard_id: int, num_shards: int,
          shuffle_buffer: int):
    *jpegs, cls = fn.readers.webdataset(
        paths=paths, index_paths=index_paths, ext=stream.exts + ["cls"],
        missing_component_behavior="skip", random_shuffle=shuffle_buffer > 0,
        initial_fill=max(shuffle_buffer, 1), shard_id=shard_id, num_shards=num_shards,
        name="Reader")
    where = fn.pad(fn.get_property(jpegs[0], key="source_info")[:WHERE_BYTES], fill_value=0, shape=[WHERE_BYTES])
    return jpegs, fn.pad(cls[:LABEL_BYTES], fill_value=0, shape=[LABEL_BYTES]), where


def _decode(jpegs, device: str, window: dict | None = None):
    """Decode all images of a sample (only `window` of each, if given) and stack them along channels (HWC)."""
    decoder = fn.decoders.image_crop if window else fn.decoders.image
    images = [decoder(j, device="mixed" if device == "gpu" else "cpu", output_type=types.RGB, **(window or {}))
              for j in jpegs]
    return images[0] if len(images) == 1 else fn.cat(*images, axis=2)


def _crop_window(jpegs, crop: int, short) -> dict:
    """A random crop window per sample, as fn.decoders.image_crop's arguments (nvJPEG decodes it alone on the GPU).

    The window is what a resize to short side `short` then a crop x crop crop would keep: a
    square of crop / short times the image's short side, at a random place, the same for all
    images of a sample (flow). Decoding and resizing it alone is what the CPU loader does.
    """
    height_width = fn.cast(fn.peek_image_shape(jpegs[0])[0:2], dtype=types.FLOAT)
    height, width = height_width[0], height_width[1]
    side = crop * dmath.min(height, width) / short
    return dict(crop_h=dmath.min(side, height), crop_w=dmath.min(side, width),
                crop_pos_x=fn.random.uniform(range=(0.0, 1.0)), crop_pos_y=fn.random.uniform(range=(0.0, 1.0)))


@pipeline_def
def train_pipeline(stream: Stream, paths: list[str], index_paths: list[str], device: str, crop: int,
                   resize_shorter: float, scale_jitter: tuple | None, flip: bool, shard_id: int, num_shards: int,
                   shuffle_buffer: int, fp16: bool, channels_last: bool):
    """Random crop window (of a short side resized to resize_shorter, optionally jittered), random flip, normalise."""
    jpegs, labels, where = _read(stream, paths, index_paths, shard_id, num_shards, shuffle_buffer)
    short = resize_shorter * fn.random.uniform(range=scale_jitter) if scale_jitter else resize_shorter
    images = fn.resize(_decode(jpegs, device, _crop_window(jpegs, crop, short)), size=[crop, crop], antialias=True)
    mirror = fn.random.coin_flip(probability=0.5 if flip else 0.0)
    # A flip negates flow x, stored as x -> 255 - x: ((255 - x) - m) / s == (x - (255 - m)) / -s,
    # so it is folded into the per-sample mean and std of the flipped channels.
    negate = np.array(stream.flip_negates, np.float32)
    mean = types.Constant(np.array(stream.mean, np.float32)) + mirror * (negate * (255.0 - 2 * np.array(stream.mean, np.float32)))
    std = types.Constant(np.array(stream.std, np.float32)) * (1.0 - 2.0 * mirror * negate)
    images = fn.crop_mirror_normalize(
        images, mirror=mirror, mean=mean, std=std,
        dtype=types.FLOAT16 if fp16 else types.FLOAT, output_layout="HWC" if channels_last else "CHW")
    return images, labels, where


@pipeline_def
def eval_pipeline(stream: Stream, paths: list[str], index_paths: list[str], device: str, crop: int,
                  resize_shorter: float, crop_pos: tuple[float, float], shard_id: int, num_shards: int, fp16: bool,
                  channels_last: bool):
    """Short-side resize and a fixed crop (centre by default), in shard order."""
    jpegs, labels, where = _read(stream, paths, index_paths, shard_id, num_shards, shuffle_buffer=0)
    images = fn.resize(_decode(jpegs, device), resize_shorter=resize_shorter, antialias=True)
    images = fn.crop_mirror_normalize(
        images, crop=(crop, crop), crop_pos_x=crop_pos[0], crop_pos_y=crop_pos[1], mean=stream.mean, std=stream.std,
        dtype=types.FLOAT16 if fp16 else types.FLOAT, output_layout="HWC" if channels_last else "CHW")
    return images, labels, where


def readable_shards(stream: Stream, folder: str, whole_indexes: bool) -> tuple[list[str], list[str], dict[str, Loss], int]:
    """The shards DALI can read, with an index of their whole, readable samples where some are not (written in folder).

    Returns (tars, indexes, losses by shard, samples left). A shard of no samples is left out
    (DALI needs one at least). Without whole_indexes only an index whose last sample lies past
    the end of its tar (a 4 KiB read) is read whole, the rest taken as they are.
    """
    tars, indexes, losses, left = [], [], {}, 0
    for tar, index, count in zip(stream.tars, stream.indexes, stream.shard_samples):
        size = os.path.getsize(tar)
        if count and not whole_indexes and _last_sample_end(index) <= size:
            tars.append(tar)
            indexes.append(index)
            left += count
            continue
        try:
            lines = read_index(index) if count else []
        except ValueError as e:
            add_loss(losses, tar, "#0 of the shard", count, f"unreadable: {e}")
            continue
        whole, lost_key, problem = whole_samples(lines, size)
        if problem:
            add_loss(losses, tar, lost_key or f"#{whole} of the shard", len(lines) - whole, problem)
        if not whole:  # nothing of it to read (an empty shard is valid)
            continue
        if whole < len(lines):
            index = Path(folder) / f"{len(indexes):05d}-{Path(index).name}"
            index.write_text(f"v1.2 {whole}\n" + "\n".join(lines[:whole]) + "\n")
        tars.append(tar)
        indexes.append(str(index))
        left += whole
    return tars, indexes, losses, left


def _last_sample_end(index: str) -> int:
    """Where a shard's last sample ends, as its index's last line says (infinite if the index says nothing)."""
    with open(index, "rb") as f:
        f.seek(max(0, f.seek(0, 2) - 4096))
        tail = f.read().decode(errors="replace").strip().splitlines()
    try:
        return max(start + size for _, start, size, _ in index_entries(tail[-1]))
    except (ValueError, IndexError):
        return sys.maxsize


class DaliLoader:
    """Iterates (images NCHW, labels int64, keys or None) on the pipeline's device, one epoch per pass."""

    def __init__(self, stream: Stream, train: bool, batch_size: int, crop: int, resize_ratio: float = 1.1,
                 scale_jitter: tuple | None = None, flip: bool = True, device: str = "gpu",
                 device_id: int | None = 0, rank: int = 0, world_size: int = 1, num_threads: int = 4,
                 shuffle_buffer: int = 4096, seed: int = 0, fp16: bool = False, channels_last: bool = False,
                 prefetch: int = 2, crop_pos: tuple[float, float] = (0.5, 0.5)):
        self.stream, self.train, self.channels_last, self.batch_size = stream, train, channels_last, batch_size
        self._arm_crash_report(stream)
        folder = tempfile.mkdtemp(prefix="dali-index-")  # trimmed indexes of damaged shards, gone with the loader
        weakref.finalize(self, shutil.rmtree, folder, True)
        pipeline = functools.partial(
            train_pipeline, scale_jitter=scale_jitter, flip=flip, shuffle_buffer=shuffle_buffer,
            seed=seed * 1000 + rank) if train else functools.partial(eval_pipeline, crop_pos=crop_pos)
        pipeline = functools.partial(  # the pipeline seed drives reader shuffle and augmentation
            pipeline, batch_size=batch_size, num_threads=num_threads, device_id=device_id if device == "gpu" else None,
            prefetch_queue_depth=prefetch, stream=stream, device=device, crop=crop, resize_shorter=crop * resize_ratio,
            shard_id=rank, num_shards=world_size, fp16=fp16, channels_last=channels_last)
        self.losses: list[Loss] = []
        try:
            self._start(pipeline, folder, whole_indexes=False)
        except RuntimeError as e:  # DALI's reader refuses an index garbled in the middle (a look at its end misses it)
            if "readers.webdataset" not in str(e):
                raise
            self._start(pipeline, folder, whole_indexes=True)

    def _start(self, pipeline, folder: str, whole_indexes: bool) -> None:
        """Build the pipeline and its iterator over the shards DALI can read (trimmed indexes for damaged ones)."""
        tars, indexes, self._shard_losses, left = readable_shards(self.stream, folder, whole_indexes)
        if not tars:
            raise RuntimeError(f"{self.stream.data}/{self.stream.split}: no {self.stream.modality} shard can be read: "
                               + "; ".join(map(str, self._shard_losses.values()))[:2000])
        pipe = pipeline(paths=tars, index_paths=indexes)
        with self._naming_shards():  # building the iterator already runs the pipeline (prefetch)
            self._iter = DALIGenericIterator(
                pipe, ["images", "labels", "where"], reader_name="Reader", auto_reset=True,
                last_batch_policy=LastBatchPolicy.DROP if self.train else LastBatchPolicy.PARTIAL)
            read = pipe.reader_meta("Reader")["epoch_size"]
        if read < left:  # the reader skipped samples missing a component: name them
            self._shard_losses.update(samples_missing_components(self.stream, tars, indexes))

    def _arm_crash_report(self, stream: Stream) -> None:
        """A crash in DALI's native code prints what to run, then (faulthandler) the Python stack where it was."""
        if not faulthandler.is_enabled():
            faulthandler.enable()
        if _crash_hint is not None:
            _crash_hint.arm(f"\nDALI crashed while reading {stream.data}/{stream.split} ({stream.modality}); it does "
                            f"so on data it cannot decode. Find the bad samples with: python -m pack.verify "
                            f"{stream.data} --split {stream.split} (or use --backend cpu, which skips and counts "
                            f"them). Where it was:\n".encode())

    @contextlib.contextmanager
    def _naming_shards(self):
        """DALI's errors name the operator, not the data: add which shards were being read, and what to run."""
        try:
            yield
        except RuntimeError as e:
            s = self.stream
            raise RuntimeError(f"DALI failed reading {len(s.tars)} shard(s) of {s.data}/{s.split} ({s.tars[0]}"
                               f"{' ...' if len(s.tars) > 1 else ''}). Find the bad samples with: python -m pack.verify "
                               f"{s.data} --split {s.split}; or use --backend cpu, which skips and counts them. "
                               f"DALI said: {e}") from None

    @property
    def skipped(self) -> int:
        """Samples lost so far, over all epochs: see `losses`."""
        return sum(loss.samples for loss in self.losses)

    def __len__(self) -> int:
        return len(self._iter)

    def __iter__(self):
        epoch_losses = {k: dataclasses.replace(v) for k, v in self._shard_losses.items()}  # lost every epoch
        carry = []  # training: rows left after dropping bad ones, pooled into full batches
        with self._naming_shards():
            for (batch,) in self._iter:
                images = batch["images"]
                if self.channels_last:  # NHWC buffer == NCHW tensor in channels-last memory format
                    images = images.permute(0, 3, 1, 2)
                where = batch["where"].numpy()
                labels, good = self._labels(batch["labels"].numpy(), where, epoch_losses)
                if len(good) < len(where):  # rare: only when a label is bad
                    images = images.index_select(0, torch.tensor(good, device=images.device))
                keys = None if self.train else [source(where[i])[2] for i in good]
                if self.train and (carry or len(good) < self.batch_size):
                    carry.append((images.clone(), labels))  # DALI reuses its output memory
                    if sum(len(y) for _, y in carry) < self.batch_size:
                        continue
                    images, labels, carry = pool(carry, self.batch_size)
                labels = labels.to(images.device, non_blocking=True)
                yield images, labels, keys
        self.losses += epoch_losses.values()
        warn_losses(list(epoch_losses.values()), self.stream, self.skipped)

    def _labels(self, raw: np.ndarray, where: np.ndarray, losses: dict) -> tuple[torch.Tensor, list]:
        """The batch's labels, parsed on the host (no device sync), and the rows whose label is good."""
        labels, good = [], []
        for row, label_bytes in enumerate(raw):
            try:
                labels.append(parse_label(bytes(label_bytes).rstrip(b"\0"), self.stream))
                good.append(row)
            except ValueError as e:
                tar, _, key = source(where[row])
                add_loss(losses, tar, key, 1, str(e))
        return torch.tensor(labels, dtype=torch.long), good


def source(where: np.ndarray) -> tuple[str, str, str]:
    """A sample's (tar, offset, key) from DALI's padded source_info, "tar:offset:member"."""
    tar, offset, member = bytes(where).rstrip(b"\0").decode().rsplit(":", 2)
    return tar, offset, key_of(member)


def samples_missing_components(stream: Stream, tars: list[str], indexes: list[str]) -> dict[str, Loss]:
    """Samples whose index line lacks one of the stream's components (DALI's reader skips them), by shard."""
    losses: dict[str, Loss] = {}
    for tar, index in zip(tars, indexes):
        for line in read_index(index):
            entries = index_entries(line)
            missing = set(stream.exts + ["cls"]) - {ext for ext, *_ in entries}
            if missing:
                add_loss(losses, tar, key_of(entries[0][3]), 1, f"missing its {', '.join(sorted(missing))}")
    return losses
