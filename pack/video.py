"""Finding videos on disk and decoding them in-process with PyAV (FFmpeg)."""
from __future__ import annotations

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


def decode_frames(path: str | Path, short_side: int) -> Iterator[tuple[int, av.VideoFrame]]:
    """Yield (index, frame) for every decodable frame; frames are converted only when needed.

    A stream that breaks off part-way (a truncated download) ends the iteration early
    instead of failing: the frames before the damage are still good.
    """
    try:
        container = av.open(str(path))
    except (av.FFmpegError, UnicodeDecodeError) as e:
        raise VideoError(f"undecodable: {e}") from None
    with container:
        if not container.streams.video:
            raise VideoError("undecodable: no video stream")
        stream = container.streams.video[0]
        stream.thread_count = 1  # one process per core already; threads would oversubscribe
        index = 0
        try:
            for frame in container.decode(stream):
                yield index, frame
                index += 1
        except av.FFmpegError:
            if index == 0:
                raise VideoError("undecodable: no frame could be decoded") from None


def frame_rate(path: str | Path) -> float | None:
    """Frames per second of a video's first video stream, if its container says."""
    try:
        with av.open(str(path)) as container:
            rate = container.streams.video[0].average_rate
            return float(rate) if rate else None
    except (av.FFmpegError, IndexError, UnicodeDecodeError):
        return None


def to_bgr(frame: av.VideoFrame, size: tuple[int, int], reformatter: VideoReformatter) -> np.ndarray:
    """Resize and colour-convert in one swscale pass (BGR, as OpenCV expects).

    Pass the same reformatter for all frames of a video: it keeps its swscale context, which
    measured 6x faster than frame.to_ndarray(width=..., ...) setting one up per frame.
    """
    return reformatter.reformat(frame, size[0], size[1], "bgr24", interpolation="AREA").to_ndarray()
