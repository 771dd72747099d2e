"""Packing one group of videos into its RGB and flow shards (the unit of parallel work)."""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from av.video.reformatter import VideoReformatter

from .flow import FlowFn, encode_flow, make_flow_fn
from .files import atomic_write_json
from .shards import ShardWriter
from .video import VideoError, decode_frames, resized_size, to_bgr, upright


@dataclass(frozen=True)
class PackParams:
    """Everything that decides the bytes in the shards (recorded in the manifest)."""

    stride: int = 6
    flow: str = "dis-medium"
    flow_len: int = 1
    flow_bound: float = 8.0
    flow_encoding: str = "xym"
    short_side: int = 256
    quality: int = 90
    flow_quality: int = 90
    shard_videos: int = 500
    shard_mb: int = 1000
    seed: int = 0


class Timer:
    """Seconds spent per stage; the pack's closing breakdown sums these over workers."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] += now - self._last
        self._last = now


def encode_jpeg(image_bgr: np.ndarray, quality: int, full_chroma: bool = False) -> bytes:
    """JPEG bytes; flow images keep full-resolution chroma since x and y live in colour."""
    params = [cv2.IMWRITE_JPEG_QUALITY, quality]
    if full_chroma:
        params += [cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444]
    ok, buf = cv2.imencode(".jpg", image_bgr, params)
    assert ok, "cv2.imencode failed"
    return buf.tobytes()


def pack_video(path: Path, p: PackParams, flow_fn: FlowFn, timer: Timer, info: dict | None = None) -> tuple[int, list]:
    """Decode a video; return (frames decoded, samples): video_samples(), all of them."""
    samples = video_samples(path, p, flow_fn, timer, info)
    kept = []
    while True:
        try:
            kept.append(next(samples))
        except StopIteration as end:
            return end.value, kept


def video_samples(path: Path, p: PackParams, flow_fn: FlowFn, timer: Timer, info: dict | None = None):
    """Decode a video, yielding its samples as they are ready; returns the number of frames decoded.

    Frames are turned upright as a player shows them (the stream's display rotation and
    mirror, which `info` receives with decode_frames' other notes): so are the flow's axes.

    Samples are (frame t, rgb_jpeg, [flow_jpeg] * flow_len) for t = 0, stride, 2*stride, ...

    Flow i of the sample at frame t goes from frame t+i to t+i+1. Near the end, where
    t+i+1 does not exist, the last flow of the video (frames n-2 -> n-1) is repeated.
    Frames are converted, and flow computed, only where a sample needs them: what is held
    at any time is a few frames, however long the video.
    """
    size, reformatter, info = None, VideoReformatter(), {} if info is None else info
    gray: dict[int, np.ndarray] = {}  # converted frames still needed, by index
    rgb: dict[int, bytes] = {}  # encoded RGB of sampled frames not yet emitted
    flows: dict[int, bytes] = {}  # encoded flow of pair (i -> i+1), by i
    last_two: list = []  # (index, frame) of the two latest frames, for padding at the end
    next_sample = 0  # the oldest sample frame not yet emitted

    def needed(i: int) -> bool:
        return i % p.stride <= p.flow_len

    def gray_of(i: int, frame) -> np.ndarray:
        if i not in gray:
            bgr = upright(to_bgr(frame, size, reformatter), info["rotation"], info["mirrored"])
            timer.lap("decode")
            if i % p.stride == 0:
                rgb[i] = encode_jpeg(bgr, p.quality)
                timer.lap("encode")
            gray[i] = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
            timer.lap("decode")  # frame preparation counts as decoding
        return gray[i]

    def flow_pair(i: int) -> bytes:
        if i not in flows:
            f = flow_fn(gray[i], gray[i + 1])
            timer.lap("flow")
            flows[i] = encode_jpeg(encode_flow(f, p.flow_bound, p.flow_encoding), p.flow_quality, full_chroma=True)
            timer.lap("encode")
        return flows[i]

    def emit(t: int, last_pair: int):
        sample = (t, rgb.pop(t), [flow_pair(min(t + k, last_pair)) for k in range(p.flow_len)])
        for i in [i for i in gray if i < min(t + p.stride, last_pair)]:
            del gray[i]
        for i in [i for i in flows if i < min(t + p.stride, last_pair)]:
            del flows[i]
        return sample

    n = 0
    for i, frame in decode_frames(path, p.short_side, info):
        timer.lap("decode")
        n = i + 1
        if size is None:
            size = resized_size(frame.width, frame.height, p.short_side)
        last_two = (last_two + [(i, frame)])[-2:]
        if needed(i):
            gray_of(i, frame)
        if next_sample + p.flow_len == i:  # all frames of the oldest pending sample are here
            yield emit(next_sample, last_pair=i)
            next_sample += p.stride
    if n == 0:
        raise VideoError("empty: the file holds no video frames")
    if n < 2:
        raise VideoError("too short: 1 frame, flow needs 2")
    for i, frame in last_two:  # the padding pair n-2 -> n-1
        gray_of(i, frame)
    while next_sample < n:
        yield emit(next_sample, last_pair=n - 2)
        next_sample += p.stride
    return n


def pack_group(split_dir: Path, group: int, videos: list[dict], p: PackParams, progress=None,
               stamp: dict | None = None) -> dict:
    """Pack a group of videos into rgb/ and flow/ shards, then write its record (the commit mark).

    videos: [{"id", "label", "cls", "path" (None: "reason" says why), "key" if not the id}].
    Returns the record also written to `records/{group:05d}.json`, with `stamp` (the plan's id
    and the part that packed it); a group with a record is finished and never redone.
    """
    timer = Timer()
    flow_fn = make_flow_fn(p.flow)
    max_bytes = p.shard_mb * 1024 * 1024
    writers = {m: ShardWriter(split_dir / m / f"shard-{group:05d}", max_bytes) for m in ("rgb", "flow")}
    packed, failed = {}, {}
    try:
        for v in videos:
            frames = count = 0
            if v["path"] is None:
                failed[v["id"]] = v.get("reason") or "missing: no video file with this name under --videos"
            else:
                try:
                    # A whole video is encoded before any of it is written: a video that
                    # fails half-way leaves no samples behind.
                    frames, samples = pack_video(Path(v["path"]), p, flow_fn, timer, shown := {})
                except VideoError as e:
                    failed[v["id"]] = str(e)
                else:
                    cls, name = str(v["cls"]).encode(), v.get("key", v["id"])
                    for t, rgb, flows in samples:
                        key = f"{name}/{t:06d}"
                        writers["rgb"].write(key, {"rgb.jpg": rgb, "cls": cls})
                        writers["flow"].write(key, {**{f"flow{k}.jpg": f for k, f in enumerate(flows)}, "cls": cls})
                    timer.lap("write")
                    count = len(samples)
                    packed[v["id"]] = {"youtube_id": v["youtube_id"], "label": v["label"], "cls": v["cls"],
                                       "frames": frames, "samples": count, **shown,
                                       **({"key": name} if name != v["id"] else {})}
            if progress is not None:
                progress.put((frames, count))
        for w in writers.values():
            w.close()
        timer.lap("write")
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    record = {
        **(stamp or {}),
        "group": group,
        "shards": {m: w.finished for m, w in writers.items()},
        "videos": packed,
        "failed": failed,
        "seconds": dict(timer.seconds),
    }
    atomic_write_json(split_dir / "records" / f"{group:05d}.json", record)
    return record
