"""Finding videos on disk and decoding them in-process with PyAV (FFmpeg)."""
from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np
from av.video.reformatter import VideoReformatter

VIDEO_EXTENSIONS = {".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".flv", ".mpg", ".mpeg", ".3gp", ".ogv", ".ts"}


class VideoError(Exception):
    """A video that cannot be packed; the message is the reason recorded in the manifest."""


def walk_files(root: Path):
    """Every file under root, in sorted order, following links to folders (each real folder once: no loops).

    Hidden files and folders are not data: macOS's `._clip.mp4` (AppleDouble metadata, not a
    video), `.DS_Store`, `.thumbs/`.
    """
    seen = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith("."):
                yield Path(folder) / name


class VideoIndex:
    """The videos under a folder, in any sub-folder layout (links followed), found by relative path or by file stem."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"--videos {self.root}: no such folder")
        self.by_path: dict[str, Path] = {}
        self.by_stem: dict[str, list[Path]] = {}
        self.by_lower: dict[str, list[str]] = {}  # a lowercased relative path or stem -> the relative paths it names
        for path in walk_files(self.root):
            if path.suffix.lower() in VIDEO_EXTENSIONS and path.is_file():
                relative = path.relative_to(self.root).as_posix()
                self.by_path[relative] = path
                self.by_stem.setdefault(path.stem, []).append(path)
                for name in {relative.lower(), path.stem.lower()}:
                    self.by_lower.setdefault(name, []).append(relative)

    def find(self, *stems: str, path: str | None = None) -> Path | None:
        """A video by its relative path, else by the first of stems that names exactly one file.

        VideoError if a stem names several files (which one is meant cannot be told).
        """
        if path is not None and path in self.by_path:
            return self.by_path[path]
        for stem in stems:
            found = self.by_stem.get(stem, [])
            if len(found) > 1:
                raise VideoError(f"ambiguous: {len(found)} files named {stem}.* under --videos "
                                 f"({', '.join(str(f.relative_to(self.root)) for f in found[:3])})")
            if found:
                return found[0]
        return None

    def other_case(self, *names: str) -> list[str]:
        """The videos whose relative path or stem is one of names but for letter case (for a missing file's message)."""
        return sorted({p for name in names if name for p in self.by_lower.get(name.lower(), [])})


def resized_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) with the short side scaled to short_side, both even-rounded to ints."""
    scale = short_side / min(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def decode_frames(path: str | Path, short_side: int, info: dict | None = None) -> Iterator[tuple[int, av.VideoFrame]]:
    """Yield (index, frame) for every decodable frame; frames are converted only when needed.

    A stream that breaks off part-way (a truncated download) ends the iteration early
    instead of failing: the frames before the damage are still good. `info`, if given, gets
    what the pack records of the video: which stream was read where there are several
    (`video_stream`), and how a player turns its picture (`rotation`, `mirrored`: display_orientation).
    """
    try:
        container = av.open(str(path))
    except (av.FFmpegError, UnicodeDecodeError) as e:
        raise VideoError(f"undecodable: {e}") from None
    with container:
        stream = pick_stream(container)
        stream.thread_count = 1  # one process per core already; threads would oversubscribe
        if info is not None and len(container.streams.video) > 1:
            info["video_stream"] = stream_note(container, stream)
        index = 0
        try:
            for frame in container.decode(stream):
                if index == 0 and info is not None:
                    info["rotation"], info["mirrored"] = display_orientation(frame)
                yield index, frame
                index += 1
        except av.FFmpegError:
            if index == 0:
                raise VideoError("undecodable: no frame could be decoded") from None


def pick_stream(container) -> av.video.stream.VideoStream:
    """The video stream to read: the first that is not a still picture (an mp4's cover art is a video stream too)."""
    moving = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
    if not moving:
        raise VideoError("undecodable: no video stream" + (" (only a still picture, cover art)"
                                                           if container.streams.video else ""))
    return moving[0]


def stream_note(container, read) -> str:
    """Which of several video streams was read, and what the others are: a note in the manifest and predict's output."""
    def said(s) -> str:
        still = " cover art" if s.disposition & av.stream.Disposition.attached_pic else ""
        return f"#{s.index} {s.codec_context.name} {s.width}x{s.height}{still}"
    others = [said(s) for s in container.streams.video if s is not read]
    return (f"read video stream {said(read)} of {len(container.streams.video)} video streams "
            f"(not read: {', '.join(others)})")


def display_orientation(frame: av.VideoFrame) -> tuple[int, bool]:
    """(rotation, mirrored): how a player turns the stored picture, from the stream's display matrix.

    rotation is counter-clockwise degrees (0, 90, 180, 270), applied first; mirrored means a
    left-right mirror after it (together, every phone and EXIF orientation). A matrix that
    turns by another angle than a multiple of 90 degrees is not packed (VideoError).
    """
    matrix = next((bytes(d) for d in frame.side_data if d.type.name == "DISPLAYMATRIX"), None)
    if matrix is None:
        return 0, False
    m = np.frombuffer(matrix, dtype="<i4")[[0, 1, 3, 4]] / 65536.0  # a b c d: (x, y) -> (a x + c y, b x + d y)
    a, b, c, d = np.round(m / max(np.abs(m).max(), 1e-9))
    if sorted(np.abs([a, b, c, d]).tolist()) != [0, 0, 1, 1] or (a == 0) != (d == 0):
        raise VideoError(f"unsupported: its display matrix {m.tolist()} turns the picture by another angle than "
                         f"a multiple of 90 degrees")
    mirrored = a * d - b * c < 0
    if mirrored:  # undo the mirror (x -> -x after the rotation) to read the rotation alone
        a, c = -a, -c
    return round(math.degrees(math.atan2(-b, a))) % 360, bool(mirrored)


def upright(image: np.ndarray, rotation: int, mirrored: bool) -> np.ndarray:
    """The picture as a player shows it (display_orientation's rotation, then the mirror)."""
    if rotation:
        image = np.rot90(image, rotation // 90)
    if mirrored:
        image = image[:, ::-1]
    return np.ascontiguousarray(image) if rotation or mirrored else image


def frame_rate(path: str | Path) -> float | None:
    """Frames per second of the video stream pack reads (pick_stream), if its container says."""
    try:
        with av.open(str(path)) as container:
            rate = pick_stream(container).average_rate
            return float(rate) if rate else None
    except (av.FFmpegError, VideoError, UnicodeDecodeError):
        return None


def to_bgr(frame: av.VideoFrame, size: tuple[int, int], reformatter: VideoReformatter) -> np.ndarray:
    """Resize and colour-convert in one swscale pass (BGR, as OpenCV expects).

    Pass the same reformatter for all frames of a video: it keeps its swscale context, which
    measured 6x faster than frame.to_ndarray(width=..., ...) setting one up per frame.
    """
    return reformatter.reformat(frame, size[0], size[1], "bgr24", interpolation="AREA").to_ndarray()
