"""NVIDIA DALI pipelines over the shards: nvJPEG decoding and augmentation on the GPU.

One pipeline function per mode, DALI-style; `device="gpu"` decodes with nvJPEG ("mixed"),
`device="cpu"` runs the same graph on the CPU (DALI's CPU mode, `device_id=None`).

DALI reads what the plan says (loaders.plan): an external source in this process takes the
epoch's samples in the plan's order from the shards (through their indexes), with each
sample's augmentation draws, and feeds DALI's decoders. So DALI gives the same samples, in
the same order, with the same crops and flips as the CPU loader, for any thread count or
prefetch depth, and a resumed run goes on from its position without reading what it skips.

Bad data, as the CPU loader treats it (the same code finds it): a sample past the end of a
shard cut short, behind a garbled index line, missing a component, whose bytes are not
those packed (its CRC-32Cs), or with a label that is not an integer in range or not its
video's is left out (training pools the rest into full batches) and counted in samples
(`losses`). What DALI cannot do: tell a JPEG whose data is damaged behind an intact header
in data packed before the checksums (it decodes it, with warnings on the CPU);
`python -m pack.verify` finds those. On a JPEG it cannot decode at all it stops with an
error, and in its CPU mode it has crashed the process (a segmentation fault) while doing
so: the crash prints where it was and what to run.
"""
from __future__ import annotations

import collections
import contextlib
import faulthandler
import functools

import numpy as np
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali import math as dmath
from nvidia.dali.plugin.base_iterator import LastBatchPolicy
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from .common import Loss, Stream, add_loss, merge_losses, parse_label, warn_losses
from .plan import Lost, Planner, ShardReader

try:
    from . import _crash_hint
except ImportError:  # built without a C compiler: faulthandler alone says where a crash was
    _crash_hint = None


def _decode(jpegs, device: str, window: dict | None = None):
    """Decode all images of a sample (only `window` of each, if given) and stack them along channels (HWC)."""
    decoder = fn.decoders.image_crop if window else fn.decoders.image
    images = [decoder(j, device="mixed" if device == "gpu" else "cpu", output_type=types.RGB, **(window or {}))
              for j in jpegs]
    return images[0] if len(images) == 1 else fn.cat(*images, axis=2)


def _crop_window(jpegs, crop: int, short, x, y) -> dict:
    """A crop window per sample at (x, y) in 0..1, as fn.decoders.image_crop's arguments (nvJPEG decodes it alone).

    The window is what a resize to short side `short` then a crop x crop crop would keep: a
    square of crop / short times the image's short side, the same for all images of a
    sample (flow). Decoding and resizing it alone is what the CPU loader does.
    """
    height_width = fn.cast(fn.peek_image_shape(jpegs[0])[0:2], dtype=types.FLOAT)
    height, width = height_width[0], height_width[1]
    side = crop * dmath.min(height, width) / short
    return dict(crop_h=dmath.min(side, height), crop_w=dmath.min(side, width), crop_pos_x=x, crop_pos_y=y)


@pipeline_def
def train_pipeline(stream: Stream, source, device: str, crop: int, resize_shorter: float, fp16: bool,
                   channels_last: bool):
    """The planned crop window (of a short side resized to resize_shorter x the planned scale), flip, normalise."""
    *jpegs, labels, scale, x, y, mirror = fn.external_source(source=source, num_outputs=len(stream.exts) + 5)
    short = resize_shorter * scale
    images = fn.resize(_decode(jpegs, device, _crop_window(jpegs, crop, short, x, y)), size=[crop, crop], antialias=True)
    # A flip negates flow x, stored as x -> 255 - x: ((255 - x) - m) / s == (x - (255 - m)) / -s,
    # so it is folded into the per-sample mean and std of the flipped channels.
    negate = np.array(stream.flip_negates, np.float32)
    mean = types.Constant(np.array(stream.mean, np.float32)) + mirror * (negate * (255.0 - 2 * np.array(stream.mean, np.float32)))
    std = types.Constant(np.array(stream.std, np.float32)) * (1.0 - 2.0 * mirror * negate)
    images = fn.crop_mirror_normalize(
        images, mirror=mirror, mean=mean, std=std,
        dtype=types.FLOAT16 if fp16 else types.FLOAT, output_layout="HWC" if channels_last else "CHW")
    return images, labels


@pipeline_def
def eval_pipeline(stream: Stream, source, device: str, crop: int, resize_shorter: float,
                  crop_pos: tuple[float, float], fp16: bool, channels_last: bool):
    """Short-side resize and a fixed crop (centre by default), in the plan's (shard) order."""
    *jpegs, labels = fn.external_source(source=source, num_outputs=len(stream.exts) + 1)
    images = fn.resize(_decode(jpegs, device), resize_shorter=resize_shorter, antialias=True)
    images = fn.crop_mirror_normalize(
        images, crop=(crop, crop), crop_pos_x=crop_pos[0], crop_pos_y=crop_pos[1], mean=stream.mean, std=stream.std,
        dtype=types.FLOAT16 if fp16 else types.FLOAT, output_layout="HWC" if channels_last else "CHW")
    return images, labels


class PlannedSource:
    """DALI's external source: each call, the next batch of the plan's samples that can be read, with their draws.

    It reads ahead of the consumer (DALI prefetches): `fed` says, batch by batch, where the
    plan stands after each and which keys it holds, for DaliLoader to take as it yields them.
    Training runs on across epochs (an epoch's end is a mark in `fed`; what is left there
    does not fill a batch and is dropped, as the CPU loader drops it), so DALI never sees an
    epoch that gives no batch; eval ends its pass with StopIteration, the last batch partial.
    With segments a plan's entry is a video: its K frames are K rows, one after the other; a
    video with a frame that cannot be read is left out whole.
    """

    def __init__(self, planner: Planner, train: bool, scale_jitter: tuple | None, flip: bool):
        self.planner, self.train, self.scale_jitter, self.flip = planner, train, scale_jitter, flip
        self.stream = planner.stream
        self.reader = ShardReader(self.stream)
        self.epoch, self.next = planner.epoch, planner.served  # where reading stands (ahead of the consumer)
        self.fed = collections.deque()  # (epoch, plan samples served after the batch or None at its end, keys, losses)

    def __call__(self):
        k = self.planner.frames_per_entry
        size, ends = self.planner.batch_size * k, 0
        rows, keys, losses = [], [], {}
        while len(rows) < size:
            plan = self.planner.plan(self.epoch)
            if self.next < len(plan):
                chunk = plan[self.next:self.next + (size - len(rows)) // k]  # as many as the batch lacks
                self.next += len(chunk)
                ids, planned = self.planner.rows(self.epoch, chunk, self.scale_jitter, self.flip)
                planned = planned if planned is not None else [None] * len(ids)
                for unit in range(0, len(ids), k):
                    video = []
                    for sample_id, augmentation in zip(ids[unit:unit + k].tolist(), planned[unit:unit + k]):
                        video.append(self._row(sample_id, augmentation, losses))
                        if video[-1] is None:
                            break
                    if video[-1] is not None:
                        keys += [row[3] for row in video]
                        rows += video
                continue
            if not self.train:
                break
            self.fed.append((self.epoch, None, [], list(losses.values())))  # the epoch's end
            ends += 1
            if ends > 1:
                raise RuntimeError(f"{self.stream.data}/{self.stream.split}: training epoch {self.epoch} gives no "
                                   f"full batch of {size}: every sample lost? see the warnings")
            rows, keys, losses = [], [], {}
            self.epoch, self.next = self.epoch + 1, 0
        if not rows:  # eval: the pass is over; the next one starts at the beginning
            self.fed.append((self.epoch, None, [], list(losses.values())))
            self.next = 0
            raise StopIteration
        self.fed.append((self.epoch, self.next, keys, list(losses.values())))
        return self._batch(rows)

    def _batch(self, rows: list[tuple]) -> list:
        """The outputs: each image of the samples (a list of encoded JPEGs), then labels[, scale, x, y, mirrored]
        (one array a batch: DALI takes its rows as the samples' scalars)."""
        out = [[row[0][i] for row in rows] for i in range(len(self.stream.exts))]
        out.append(np.array([row[1] for row in rows], np.int64))
        if self.train:
            planned = np.array([row[2] for row in rows])
            out += [planned[:, 0].astype(np.float32), planned[:, 1].astype(np.float32),
                    planned[:, 2].astype(np.float32), planned[:, 3].astype(np.int32)]
        return out

    def _row(self, sample_id: int, augmentation, losses: dict) -> tuple | None:
        """One sample's (JPEGs, label, augmentation, key), or None if it is lost (counted)."""
        try:
            sample = self.reader.read(sample_id)
        except Lost as e:
            add_loss(losses, e.shard, e.key, 1, str(e))
            return None
        try:
            label = parse_label(sample["cls"], self.stream)
        except ValueError as e:
            add_loss(losses, sample["__url__"], sample["__key__"], 1, str(e))
            return None
        return [np.frombuffer(sample[ext], np.uint8) for ext in self.stream.exts], label, augmentation, sample["__key__"]


class DaliLoader:
    """Iterates (images NCHW, labels int64, keys) on the pipeline's device, one epoch per pass, executing the plan.

    With segments a batch is of batch_size videos: their K frames each, video after video (B x K
    images, their keys), and one label a video.

    `position()` says where training is; a loader made with a position goes on from there.
    """

    def __init__(self, stream: Stream, train: bool, batch_size: int, crop: int, resize_ratio: float = 1.1,
                 scale_jitter: tuple | None = None, flip: bool = True, device: str = "gpu",
                 device_id: int | None = 0, rank: int = 0, world_size: int = 1, num_threads: int = 4,
                 shuffle_buffer: int = 4096, seed: int = 0, fp16: bool = False, channels_last: bool = False,
                 prefetch: int = 2, crop_pos: tuple[float, float] = (0.5, 0.5), position: dict | None = None,
                 segments: int = 1):
        self.stream, self.train, self.channels_last, self.batch_size = stream, train, channels_last, batch_size
        self.planner = Planner(stream, train, seed, rank, world_size, batch_size, shuffle_buffer, segments)
        if position is not None:
            self.planner.load_state(position)
        self._arm_crash_report(stream)
        self._augmentation = (scale_jitter, flip)
        pipeline = train_pipeline if train else functools.partial(eval_pipeline, crop_pos=crop_pos)
        self._pipeline = functools.partial(
            pipeline, batch_size=batch_size * self.planner.frames_per_entry, num_threads=num_threads, prefetch_queue_depth=prefetch,
            device_id=device_id if device == "gpu" else None, stream=stream, device=device, crop=crop,
            resize_shorter=crop * resize_ratio, fp16=fp16, channels_last=channels_last)
        self.losses: list[Loss] = []
        self._start()

    def _start(self) -> None:
        """The pipeline and its iterator, reading from the planner's position."""
        self._source = PlannedSource(self.planner, self.train, *self._augmentation)
        try:
            with self._naming_shards():  # building the iterator already runs the pipeline (prefetch)
                self._iter = DALIGenericIterator(self._pipeline(source=self._source), ["images", "labels"],
                                                 auto_reset=True, last_batch_policy=LastBatchPolicy.PARTIAL)
        except RuntimeError:  # DALI refuses a pass without a batch: in eval, one where nothing can be read
            if self.train or not self._source.fed or any(entry[1] is not None for entry in self._source.fed):
                raise
            self._iter = None
        self._left_early = False
        self._pending = None  # training: the next epoch's first batch, read already (see _train_pass)

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
        return self.planner.batches()

    def position(self) -> dict:
        """Where training is: the epoch and how many of its plan's samples the batches so far hold (loaders.plan)."""
        return self.planner.state()

    def __iter__(self):
        if self._left_early and not self.train:  # eval passes start at the beginning (a fixed validation subset)
            self._start()
        epoch_losses: dict[str, Loss] = {}  # this pass's, one record a shard
        self._left_early = True
        try:
            with self._naming_shards():
                yield from (self._train_pass if self.train else self._eval_pass)(epoch_losses)
            self._left_early = False
        finally:
            self.losses += epoch_losses.values()
        warn_losses(list(epoch_losses.values()), self.stream, self.skipped)

    def _eval_pass(self, epoch_losses: dict):
        if self._iter is None:  # nothing could be read: no batch, the losses say why (each of DALI's tries saw them all)
            merge_losses(epoch_losses, self._source.fed[0][3])
            return
        for (batch,) in self._iter:
            epoch, served, keys, losses = self._source.fed.popleft()
            merge_losses(epoch_losses, losses)
            yield self._output(batch, keys)
        merge_losses(epoch_losses, self._source.fed.popleft()[3])  # the pass's end, and what was lost after its last batch

    def _train_pass(self, epoch_losses: dict):
        """This epoch's batches; the source runs on into the next epoch, whose first batch waits for the next pass."""
        epoch = self.planner.epoch
        while True:
            if self._pending is None:
                batch = next(self._iter)[0]
                entry = self._source.fed.popleft()
                while entry[1] is None:  # an epoch's end, with the losses after its last batch
                    merge_losses(epoch_losses, entry[3])
                    entry = self._source.fed.popleft()
                self._pending = batch, entry
            batch, (fed_epoch, served, keys, losses) = self._pending
            if fed_epoch != epoch:  # the next epoch's first batch: this pass is over
                self.planner.epoch, self.planner.served = fed_epoch, 0
                return
            self._pending = None
            merge_losses(epoch_losses, losses)
            self.planner.served = served
            yield self._output(batch, keys)

    def _output(self, batch: dict, keys: list[str]):
        images = batch["images"]
        if self.channels_last:  # NHWC buffer == NCHW tensor in channels-last memory format
            images = images.permute(0, 3, 1, 2)
        labels = batch["labels"].view(-1)[::self.planner.frames_per_entry]  # segments: one a video
        return images, labels.to(images.device, non_blocking=True), keys
