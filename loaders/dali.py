"""NVIDIA DALI pipelines over the shards: nvJPEG decoding and augmentation on the GPU.

One pipeline function per mode, DALI-style; `device="gpu"` decodes with nvJPEG ("mixed"),
`device="cpu"` runs the same graph on the CPU (DALI's CPU mode, `device_id=None`).
"""
from __future__ import annotations

import contextlib

import numpy as np
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali import math as dmath
from nvidia.dali.plugin.base_iterator import LastBatchPolicy
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from .common import Stream, key_of, parse_cls, truncated_shards

LABEL_BYTES = 8  # `cls` is an ASCII integer; padded to this width to batch it


def _read(stream: Stream, shard_id: int, num_shards: int, shuffle_buffer: int):
    *jpegs, cls = fn.readers.webdataset(
        paths=stream.tars, index_paths=stream.indexes, ext=stream.exts + ["cls"],
        missing_component_behavior="skip", random_shuffle=shuffle_buffer > 0,
        initial_fill=max(shuffle_buffer, 1), shard_id=shard_id, num_shards=num_shards,
        name="Reader")
    return jpegs, fn.pad(cls, fill_value=0, shape=[LABEL_BYTES])


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
def train_pipeline(stream: Stream, device: str, crop: int, resize_shorter: float, scale_jitter: tuple | None,
                   shard_id: int, num_shards: int, shuffle_buffer: int, fp16: bool, channels_last: bool):
    """Random crop window (of a short side resized to resize_shorter, optionally jittered), random flip, normalise."""
    jpegs, labels = _read(stream, shard_id, num_shards, shuffle_buffer)
    short = resize_shorter * fn.random.uniform(range=scale_jitter) if scale_jitter else resize_shorter
    images = fn.resize(_decode(jpegs, device, _crop_window(jpegs, crop, short)), size=[crop, crop], antialias=True)
    flip = fn.random.coin_flip()
    # A flip negates flow x, stored as x -> 255 - x: ((255 - x) - m) / s == (x - (255 - m)) / -s,
    # so it is folded into the per-sample mean and std of the flipped channels.
    negate = np.array(stream.flip_negates, np.float32)
    mean = types.Constant(np.array(stream.mean, np.float32)) + flip * (negate * (255.0 - 2 * np.array(stream.mean, np.float32)))
    std = types.Constant(np.array(stream.std, np.float32)) * (1.0 - 2.0 * flip * negate)
    images = fn.crop_mirror_normalize(
        images, mirror=flip, mean=mean, std=std,
        dtype=types.FLOAT16 if fp16 else types.FLOAT, output_layout="HWC" if channels_last else "CHW")
    return images, labels.gpu() if device == "gpu" else labels


@pipeline_def
def eval_pipeline(stream: Stream, device: str, crop: int, resize_shorter: float, crop_pos: tuple[float, float],
                  shard_id: int, num_shards: int, fp16: bool, channels_last: bool):
    """Short-side resize and a fixed crop (centre by default), in shard order; also which sample each row is."""
    jpegs, labels = _read(stream, shard_id, num_shards, shuffle_buffer=0)
    where = fn.pad(fn.get_property(jpegs[0], key="source_info"), fill_value=0)  # "tar:offset:member"
    images = fn.resize(_decode(jpegs, device), resize_shorter=resize_shorter, antialias=True)
    images = fn.crop_mirror_normalize(
        images, crop=(crop, crop), crop_pos_x=crop_pos[0], crop_pos_y=crop_pos[1], mean=stream.mean, std=stream.std,
        dtype=types.FLOAT16 if fp16 else types.FLOAT, output_layout="HWC" if channels_last else "CHW")
    return images, labels.gpu() if device == "gpu" else labels, where


class DaliLoader:
    """Iterates (images NCHW, labels int64[, keys]) on the pipeline's device, one epoch per pass."""

    def __init__(self, stream: Stream, train: bool, batch_size: int, crop: int, resize_ratio: float = 1.1,
                 scale_jitter: tuple | None = None, device: str = "gpu", device_id: int | None = 0,
                 rank: int = 0, world_size: int = 1, num_threads: int = 4, shuffle_buffer: int = 4096,
                 seed: int = 0, fp16: bool = False, channels_last: bool = False, prefetch: int = 2,
                 crop_pos: tuple[float, float] = (0.5, 0.5)):
        self.train, self.channels_last = train, channels_last
        common = dict(batch_size=batch_size, num_threads=num_threads, device_id=device_id if device == "gpu" else None,
                      prefetch_queue_depth=prefetch, stream=stream, device=device, crop=crop,
                      resize_shorter=crop * resize_ratio, shard_id=rank, num_shards=world_size,
                      fp16=fp16, channels_last=channels_last)
        if train:
            pipe = train_pipeline(**common, scale_jitter=scale_jitter, shuffle_buffer=shuffle_buffer,
                                  seed=seed * 1000 + rank)  # the pipeline seed drives reader shuffle and augmentation
            outputs = ["images", "labels"]
        else:
            pipe = eval_pipeline(**common, crop_pos=crop_pos)
            outputs = ["images", "labels", "where"]
        self.stream = stream
        self.skipped = 0  # DALI fails loudly on bad data instead of skipping it
        truncated = truncated_shards(stream)
        if truncated:  # DALI would fail later, without saying which shard
            raise RuntimeError(f"{len(truncated)} shard(s) shorter than their index says: {truncated[:3]}; "
                               f"re-pack or re-copy them, or use --backend cpu, which skips what it cannot read")
        with self._naming_shards():  # building the iterator already runs the pipeline (prefetch)
            self._iter = DALIGenericIterator(
                pipe, outputs, reader_name="Reader", auto_reset=True,
                last_batch_policy=LastBatchPolicy.DROP if train else LastBatchPolicy.PARTIAL)

    @contextlib.contextmanager
    def _naming_shards(self):
        """DALI's errors name the operator, not the data: add which shards were being read."""
        try:
            yield
        except RuntimeError as e:
            tars = self.stream.tars
            raise RuntimeError(f"DALI failed reading {len(tars)} shard(s) ({tars[0]}{' ...' if len(tars) > 1 else ''}); "
                               f"check them with `tar tf`, or use --backend cpu, which skips bad samples: {e}") from None

    def __len__(self) -> int:
        return len(self._iter)

    def __iter__(self):
        with self._naming_shards():
            for (batch,) in self._iter:
                images = batch["images"]
                if self.channels_last:  # NHWC buffer == NCHW tensor in channels-last memory format
                    images = images.permute(0, 3, 1, 2)
                labels = parse_cls(batch["labels"])
                if self.train:
                    yield images, labels, None
                else:
                    where = batch["where"].cpu().numpy()
                    keys = [key_of(bytes(row).rstrip(b"\0").decode().rsplit(":", 2)[2]) for row in where]
                    yield images, labels, keys
