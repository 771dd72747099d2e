"""Loaders over the packed shards: `loaders.build(...)` picks DALI on a GPU, the CPU loader otherwise."""
from __future__ import annotations

from pathlib import Path

import torch

from .common import RESIZE_RATIO, Stream, check_fills_a_batch, open_stream


def build(data: str | Path, split: str, modality: str, train: bool, batch_size: int, crop: int = 224,
          backend: str = "auto", device: str | torch.device | None = None, flow_len: int | None = None,
          resize_ratio: float = RESIZE_RATIO, scale_jitter: tuple[float, float] | None = None, flip: bool = True,
          rank: int = 0,
          world_size: int = 1, workers: int = 4, shuffle_buffer: int = 4096, seed: int = 0, fp16: bool = False,
          channels_last: bool = False, crop_pos: tuple[float, float] = (0.5, 0.5), raw: bool = False,
          position: dict | None = None, segments: int = 1):
    """A loader yielding (images, labels, keys) on `device`, keys being the samples' ids.

    backend: "dali" (nvJPEG on the GPU, or DALI's CPU mode when device is the CPU), "cpu"
    (DataLoader workers), or "auto" (DALI on a GPU, the CPU loader otherwise).
    crop_pos: where eval crops sit, relative (0..1, 0..1); (0.5, 0.5) is the centre crop.
    flip: training mirrors half the samples (not with False: classes where left and right differ).
    Which samples come in which order, and each one's crop, scale and flip, are planned
    (loaders.plan) from seed, the epoch, rank and world_size alone, so both backends give
    the same samples for any worker count. In training, `loader.position()` says where it is
    (what a checkpoint keeps) and a loader made with `position` goes on from there, as if it
    had never stopped (ValueError if seed, world size, batch size, shuffle buffer or the
    data's size differ from the position's). shuffle_buffer: samples shuffled together.
    raw: (cpu backend) uint8 batches (N x images per sample x S x S x 3) as they leave the
    workers, for benchmarks and custom pipelines: not normalised, and in training (without
    scale jitter) not resized, S is then the crop's window side (loaders.cpu.ShardSamples);
    loaders.common.normalise(..., size=crop) finishes them.
    segments: K > 1 makes a sample a video, seen through K frames, one from each of K equal
    segments of its packed samples (TSN; loaders.plan.Segments): a random place in each in
    training, the centre in eval; the K frames share one crop, scale and flip. A batch is
    then batch_size videos: B x K images (a video's K one after the other), their B x K
    keys, B labels. 1: a sample is a frame (the default).
    In training, a batch on the CPU (cpu backend) is valid until the next is asked for: its
    memory is reused, as DALI's PyTorch iterator reuses its own. Use it in the loop; clone
    it to keep it.
    Both backends give the same samples of damaged data: what cannot be read is left out and
    counted in samples (`loader.skipped`, `loader.losses`: by shard, with its first key; a
    warning at each epoch's end), bytes that are not those packed (each sample's CRC-32Cs)
    and labels that are not their video's included; in data packed before the checksums,
    a JPEG damaged behind an intact header is decoded by DALI (loaders.dali; python -m
    pack.verify finds them).
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    stream = open_stream(data, split, modality, flow_len)
    if segments < 1:
        raise ValueError(f"segments must be at least 1, not {segments}")
    if train:
        check_fills_a_batch(stream, batch_size, world_size, segments)
    if backend == "auto":
        backend = "dali" if device.type == "cuda" else "cpu"
    common = dict(stream=stream, train=train, batch_size=batch_size, crop=crop, resize_ratio=resize_ratio,
                  scale_jitter=scale_jitter, flip=flip, rank=rank, world_size=world_size, shuffle_buffer=shuffle_buffer,
                  seed=seed, fp16=fp16, channels_last=channels_last, crop_pos=crop_pos, position=position,
                  segments=segments)
    if backend == "dali":
        if raw:
            raise ValueError("raw batches come from the cpu backend only")
        from .dali import DaliLoader  # imported here: DALI is only needed when used

        if device.type == "cuda":
            return DaliLoader(**common, device="gpu", device_id=device.index or 0, num_threads=workers)
        return DaliLoader(**common, device="cpu", device_id=None, num_threads=workers)
    if backend == "cpu":
        from .cpu import CpuLoader

        return CpuLoader(**common, device=device, num_workers=workers, raw=raw)
    raise ValueError(f"backend must be auto, dali or cpu, not {backend!r}")


__all__ = ["build", "open_stream", "Stream"]
