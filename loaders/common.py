"""What both loaders share: which shards to read, how to normalise, how labels and keys arrive, what counts as lost."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pack.manifest import load_manifest
from pack.shards import CHECKSUMS, parse_label as parse_label_bytes

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
# Flow is centred at 128 by its encoding; its spread is scaled like ImageNet's so that
# cross-modality initialised filters see inputs of the size they were trained on.
FLOW_MEAN, FLOW_STD = 128.0, 58.0
# Frames are resized to a short side of RESIZE_RATIO x the crop before cropping (the original's 256 for 224).
RESIZE_RATIO = 1.1


@dataclass
class Stream:
    """One modality of one split: its shards and how to decode and normalise its samples."""

    tars: list[str]
    indexes: list[str]
    modality: str
    flow_len: int  # flow images per sample (1 for rgb: one image)
    samples: int
    classes: list[str]
    shard_samples: list[int] | None = None  # samples in each shard, as the manifest says
    video_samples: list[int] | None = None  # samples of each video, in the shards' order (video_info's)
    labelled: bool = True  # False for a split packed without labels (every cls -1)
    data: str = ""  # the DATA folder and split, for messages
    split: str = ""
    checksummed: list[bool] | None = None  # per shard: packed with per-sample checksums (None: not checked)
    video_labels: dict[str, int] | None = None  # sample key's video part -> its label in the manifest (None: not checked)

    @property
    def exts(self) -> list[str]:
        if self.modality == "rgb":
            return ["rgb.jpg"]
        return [f"flow{i}.jpg" for i in range(self.flow_len)]

    @property
    def channels(self) -> int:
        return 3 * len(self.exts)

    @property
    def mean(self) -> list[float]:
        return list(IMAGENET_MEAN) if self.modality == "rgb" else [FLOW_MEAN] * self.channels

    @property
    def std(self) -> list[float]:
        return list(IMAGENET_STD) if self.modality == "rgb" else [FLOW_STD] * self.channels

    @property
    def flip_negates(self) -> list[float]:
        """1 on the channels a horizontal flip must negate (flow x, stored as x -> 255 - x)."""
        return [0.0] * 3 if self.modality == "rgb" else [1.0, 0.0, 0.0] * self.flow_len


def open_stream(data: str | Path, split: str, modality: str, flow_len: int | None = None) -> Stream:
    """Find a split's shards of one modality in DATA/manifest.json, with errors that say what to fix."""
    if modality not in ("rgb", "flow"):
        raise ValueError(f"modality must be rgb or flow, not {modality!r}")
    manifest = load_manifest(data)
    if split not in manifest["splits"]:
        raise ValueError(f"{data} has no split {split!r}; it has {sorted(manifest['splits'])}")
    info = manifest["splits"][split]
    pieces = info["shards"].get(modality, [])
    if not pieces:
        raise ValueError(f"{data}/{split} has no {modality} shards (nothing was packed, or the modality is missing)")
    packed_len = info["params"]["flow_len"] if modality == "flow" else 1
    use_len = flow_len or packed_len
    if use_len > packed_len:
        raise ValueError(f"{data}/{split} was packed with --flow-len {packed_len}; cannot read {use_len} flow images")
    tars, indexes = [str(Path(data) / p["tar"]) for p in pieces], [str(Path(data) / p["idx"]) for p in pieces]
    missing = [t for t in tars if not Path(t).exists()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} shard(s) listed in the manifest are missing: {missing[:3]}; "
                                f"copy them again, or re-pack")
    missing = [i for i in indexes if not Path(i).exists()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} shard index(es) listed in the manifest are missing: {missing[:3]}; "
                                f"copy them again, or rebuild each from its tar: wds2idx SHARD.tar SHARD.idx "
                                f"(DALI's tool), then python -m pack.verify {data}")
    checksummed = [p.get("checksums") == CHECKSUMS for p in pieces]
    if not all(checksummed):
        warnings.warn(f"{data}/{split} {modality}: {checksummed.count(False)} of {len(pieces)} shards were packed "
                      f"before per-sample checksums: their samples are read unchecked (python -m pack.verify {data} "
                      f"checks their bytes; re-pack to have every read checked)", stacklevel=2)
    return Stream(tars=tars, indexes=indexes, modality=modality, flow_len=use_len if modality == "flow" else 1,
                  samples=sum(p["samples"] for p in pieces), classes=manifest["classes"],
                  shard_samples=[p["samples"] for p in pieces],
                  video_samples=[v["samples"] for v in info["video_info"].values() if v["samples"]],
                  labelled=any(v["cls"] >= 0 for v in info["video_info"].values()), data=str(data), split=split,
                  checksummed=checksummed,
                  video_labels={v.get("key", vid): v["cls"] for vid, v in info["video_info"].items()})


def check_videos(stream: Stream) -> None:
    """Segments read a video's samples by the manifest's video_info: it must hold the shards' samples (ValueError)."""
    if sum(stream.video_samples) != stream.samples:
        raise ValueError(f"the manifest's {stream.split} videos hold {sum(stream.video_samples)} "
                         f"samples, its shards {stream.samples}: it is not pack's (run python -m pack.merge "
                         f"{stream.data}, or re-pack)")


def check_fills_a_batch(stream: Stream, batch_size: int, world_size: int = 1, segments: int = 1) -> None:
    """Training drops what does not fill a batch: a split that cannot fill one would train for ever without a step.

    segments > 1: a batch is of videos (their K frames each).
    """
    if segments > 1:
        check_videos(stream)
    what, count = ("videos", len(stream.video_samples)) if segments > 1 else ("samples", stream.samples)
    if count // world_size < batch_size:
        per_rank = f" ({count // world_size} for each of {world_size} processes)" if world_size > 1 else ""
        raise ValueError(f"{stream.modality} has {count} training {what}{per_rank}: not one full batch of "
                         f"{batch_size}; lower the batch size or pack more videos")


@dataclass
class Loss:
    """Samples a loader could not give: in which shard, the first one's key, how many, why."""

    shard: str
    first_key: str
    samples: int
    reason: str

    def __str__(self) -> str:
        return f"{self.shard}: {self.samples} sample(s) lost, the first {self.first_key}: {self.reason}"


def add_loss(losses: dict[str, Loss], shard: str, key: str, samples: int, reason: str) -> None:
    """Count `samples` more lost in `shard` (one record a shard: its first key and reason, all its samples)."""
    if shard in losses:
        losses[shard].samples += samples
    else:
        losses[shard] = Loss(shard, key, samples, reason)


def merge_losses(into: dict[str, Loss], losses: list[Loss]) -> None:
    """Add Loss records (of one part of an epoch each) into one record a shard (the first one's key)."""
    for loss in losses:
        add_loss(into, loss.shard, loss.first_key, loss.samples, loss.reason)


def warn_losses(losses: list[Loss], stream: Stream, total: int) -> None:
    """One warning for an epoch's losses, naming the shards (the first few) and what to run."""
    if not losses:
        return
    lost = sum(loss.samples for loss in losses)
    listed = "; ".join(str(loss) for loss in losses[:5]) + (f"; and {len(losses) - 5} more shard(s)" if len(losses) > 5 else "")
    warnings.warn(f"{stream.data}/{stream.split} {stream.modality}: {lost} of {stream.samples} samples lost this epoch "
                  f"({total} in all so far): {listed}. Find every problem with: python -m pack.verify {stream.data} "
                  f"--split {stream.split}", stacklevel=3)


def parse_label(raw: bytes, stream: Stream) -> int:
    """A sample's `cls` bytes -> its label, checked against the stream's classes (pack.shards.parse_label)."""
    return parse_label_bytes(raw, len(stream.classes), stream.labelled)


def normalise(images: torch.Tensor, stream: Stream, dtype: torch.dtype, channels_last: bool,
              size: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """The CPU loader's uint8 batches -> normalised NCHW float (channels-last memory if asked).

    images: N x L x H x W x 3, the L images of each sample one after the other (rgb: L = 1;
    flow: the workers write each image whole, no interleaving); channel 3k + c of the result
    is channel c of image k. size: the crop; images of another size (the crops' windows) are
    resized to it first (bilinear, by torch: on the GPU). On the CPU numpy does the rest
    (twice as fast as torch's strided kernels there), into `out` if given (a DataLoader
    worker's shared memory, N x H x W x C if channels_last else N x C x H x W, of dtype).
    """
    if images.device.type != "cpu" or (size is not None and images.shape[2:4] != (size, size)):
        return normalise_torch(images, stream, dtype, channels_last, size)
    return normalise_numpy(images, stream, dtype, channels_last, out)


def normalise_torch(images: torch.Tensor, stream: Stream, dtype: torch.dtype, channels_last: bool,
                    size: int | None = None) -> torch.Tensor:
    """normalise() on any device (the GPU's way)."""
    n, count, h, w, _ = images.shape
    mean = torch.tensor(stream.mean, device=images.device, dtype=dtype)
    inv_std = 1.0 / torch.tensor(stream.std, device=images.device, dtype=dtype)
    nhwc = images.permute(0, 2, 3, 1, 4).reshape(n, h, w, 3 * count)  # a view for rgb
    if size is not None and (h, w) != (size, size):  # half-pixel centres and no antialiasing, as OpenCV's
        windows = nhwc.permute(0, 3, 1, 2).float()  # channels-last memory: it stays so
        nhwc = F.interpolate(windows, size=(size, size), mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
    if channels_last:  # an NHWC buffer seen as NCHW is exactly the channels-last format
        return nhwc.to(dtype).sub_(mean).mul_(inv_std).permute(0, 3, 1, 2)
    nchw = nhwc.permute(0, 3, 1, 2).to(dtype, memory_format=torch.contiguous_format)
    return nchw.sub_(mean.view(1, -1, 1, 1)).mul_(inv_std.view(1, -1, 1, 1))


def normalised_shape(images_shape: tuple[int, ...], channels_last: bool) -> tuple[int, int, int, int]:
    """The shape normalise_numpy() writes for uint8 images of images_shape (N x L x H x W x 3)."""
    n, count, h, w, _ = images_shape
    return (n, h, w, 3 * count) if channels_last else (n, 3 * count, h, w)


def normalise_numpy(images: torch.Tensor, stream: Stream, dtype: torch.dtype, channels_last: bool,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """normalise() on the CPU, plane by plane."""
    n, count, h, w, _ = images.shape
    c = 3 * count
    if out is None:
        out = torch.empty(normalised_shape(images.shape, channels_last), dtype=dtype)
    planes, pixels = out.numpy(), images.numpy()
    mean = np.array(stream.mean, planes.dtype)
    inv_std = 1.0 / np.array(stream.std, planes.dtype)
    if channels_last:  # a mean and std per pixel, tiled: numpy's broadcasting over 3 or 15 channels is 10x slower
        planes.reshape(n, h, w, count, 3)[:] = pixels.transpose(0, 2, 3, 1, 4)
        flat = planes.reshape(n, -1)
        flat -= np.tile(mean, h * w)
        flat *= np.tile(inv_std, h * w)
    else:
        for i in range(c):
            planes[:, i] = pixels[:, i // 3, :, :, i % 3]
        planes -= mean[:, None, None]
        planes *= inv_std[:, None, None]
    return out.permute(0, 3, 1, 2) if channels_last else out


def flip_batch(images: torch.Tensor, stream: Stream) -> torch.Tensor:
    """Mirror a normalised NCHW batch; flow x channels are negated as the flip demands."""
    flipped = images.flip(3)
    negate = [i for i, n in enumerate(stream.flip_negates) if n]
    if negate:
        mean = torch.tensor(stream.mean, device=images.device)[negate].view(1, -1, 1, 1)
        std = torch.tensor(stream.std, device=images.device)[negate].view(1, -1, 1, 1)
        # normalised x is (x - m) / s; after x -> 255 - x it is (255 - 2m) / s - (x - m) / s
        flipped[:, negate] = ((255 - 2 * mean) / std - flipped[:, negate].float()).to(images.dtype)
    return flipped
