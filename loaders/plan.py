"""The order of samples: one plan an epoch, made from the shards' counts, which both loaders only execute.

A plan depends on the seed, the epoch and the world size alone: not on the number of
workers or threads, not on prefetching, not on how fast any of them runs. So a run stopped
and resumed draws the very batches, and the very augmentation draws, an unstopped run
draws; and the CPU loader and DALI draw the same samples in the same order.

A sample is named by its place in the stream, `id` (shard after shard, as the manifest
lists them); a loader's position is (epoch, how many of its plan's samples it has served).
Going to a position reads nothing: the shards' indexes say where each sample lies.

With segments (TSN, `train.py --segments K`) a plan's entry is a video instead of a sample:
its K frames (Segments) and its one crop, scale and flip come from the same hash, of (seed,
epoch, video); everything else holds as with samples.
"""
from __future__ import annotations

import mmap
import os
from collections import OrderedDict

import numpy as np

from pack.shards import CHECKSUMS, checksum_problem, index_entries, key_of, read_index, whole_samples

from .common import Stream, check_videos, parse_label


def epoch_order(shard_samples: list[int], seed: int, epoch: int, train: bool, group: int) -> np.ndarray:
    """Every sample id of the stream once, in this epoch's order.

    Training: the shards in a shuffled order, taken in groups of at least `group` samples,
    the samples of a group shuffled together (what a shuffle buffer of `group` does, but
    planned; reads stay within a few shards at a time). group <= 1: each shard in order.
    Eval: shard order.
    """
    starts = np.cumsum([0] + list(shard_samples))
    if not train:
        return np.arange(starts[-1], dtype=np.int64)
    rng = np.random.default_rng([seed, epoch])
    pieces, pending, size = [], [], 0
    for shard in rng.permutation(len(shard_samples)):
        pending.append(np.arange(starts[shard], starts[shard + 1], dtype=np.int64))
        size += shard_samples[shard]
        if size >= group:
            pieces.append(np.concatenate(pending))
            pending, size = [], 0
    pieces += [np.concatenate(pending)] if pending else []
    if group > 1:
        pieces = [rng.permutation(piece) for piece in pieces]
    return np.concatenate(pieces) if pieces else np.empty(0, np.int64)


def rank_plan(order: np.ndarray, rank: int, world_size: int, train: bool) -> np.ndarray:
    """This rank's part of an epoch's order: every world_size-th sample; in training, the same count on every rank."""
    part = order[rank::world_size]
    return part[:len(order) // world_size] if train else part


def draws(seed: int, epoch: int, samples: np.ndarray, scale_jitter: tuple[float, float] | None,
          flip: bool) -> np.ndarray:
    """Training samples' augmentation, one row a sample: (scale, crop x, crop y in 0..1, mirrored 0 or 1).

    Fixed by the seed, the epoch and each sample's id alone: a counter-based hash
    (splitmix64) of them, so any samples' draws come at once, in any order, anywhere.
    """
    return _augmentation(uniform(seed, epoch, samples, 4), scale_jitter, flip)


def uniform(seed: int, epoch: int, ids: np.ndarray, n: int) -> np.ndarray:
    """n numbers in [0, 1) for each id (a row each), from the counter-based hash of (seed, epoch, id, 0..n-1)."""
    with np.errstate(over="ignore"):
        base = _mix(np.array([_mix(np.array([seed & MASK], np.uint64))[0] ^ np.uint64(epoch & MASK)], np.uint64))[0]
        counters = np.asarray(ids, np.uint64)[:, None] * np.uint64(n) + np.arange(n, dtype=np.uint64)
        return (_mix(base + counters * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(11)) * 2.0 ** -53


def _augmentation(u: np.ndarray, scale_jitter: tuple[float, float] | None, flip: bool) -> np.ndarray:
    lo, hi = scale_jitter or (1.0, 1.0)
    return np.stack([lo + u[:, 0] * (hi - lo), u[:, 1], u[:, 2], (u[:, 3] < 0.5) & flip], axis=1)


class Segments:
    """TSN's sampling: a video's K frames, one from each of K equal segments of its packed samples.

    Training draws a place in each segment (MMAction2's SampleFrames, TSN), eval takes each
    segment's centre (K evenly spaced frames: TSN tests with 25). A video of fewer than K
    samples has segments shorter than a sample: some of its samples come more than once
    (repetition, as TSN and MMAction2 do). Videos are named by their place in the stream
    (the manifest's video_info order, which is the shards' order).
    """

    def __init__(self, k: int, video_samples: list[int]):
        self.k = k
        self.lengths = np.asarray(video_samples, np.int64)
        self.starts = np.cumsum(np.concatenate([[0], self.lengths[:-1]])).astype(np.int64)

    def shard_videos(self, shard_samples: list[int]) -> list[int]:
        """Videos a shard holds (counted in the shard of their first sample): the units epoch_order shuffles."""
        bounds = np.cumsum([0] + list(shard_samples))
        shards = np.searchsorted(bounds, self.starts, side="right") - 1
        return np.bincount(shards, minlength=len(shard_samples)).tolist()

    def frames(self, videos: np.ndarray, places: np.ndarray | None = None) -> np.ndarray:
        """The sample ids of the videos' K frames, video after video; places (videos x K, in 0..1): where in each
        segment (None: its centre)."""
        videos = np.asarray(videos, np.int64)
        if places is None:
            places = np.full((len(videos), self.k), 0.5)
        n = self.lengths[videos][:, None]
        offsets = np.floor((np.arange(self.k) + places) * n / self.k).astype(np.int64)
        return (self.starts[videos][:, None] + np.minimum(offsets, n - 1)).reshape(-1)


def rows(seed: int, epoch: int, entries: np.ndarray, train: bool, scale_jitter: tuple[float, float] | None,
         flip: bool, segments: Segments | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """The sample ids of plan entries, in the order a batch holds them, and their augmentation rows (None in eval).

    Frames (no segments): the entries themselves, draws() each. Segments: K frames a video,
    the video's K rows sharing its one crop, scale and flip, all from the hash of (seed, epoch, video).
    """
    if segments is None:
        return entries, (draws(seed, epoch, entries, scale_jitter, flip) if train else None)
    if not train:
        return segments.frames(entries), None
    u = uniform(seed, epoch, entries, 4 + segments.k)
    return segments.frames(entries, u[:, 4:]), np.repeat(_augmentation(u[:, :4], scale_jitter, flip), segments.k, 0)


MASK = 2 ** 64 - 1


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, on uint64 arrays (wrapping)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class Lost(Exception):
    """A sample that cannot be given: its shard, its key (or its place in the shard) and why."""

    def __init__(self, shard: str, key: str, reason: str):
        super().__init__(reason)
        self.shard, self.key = shard, key


class ShardReader:
    """Samples by id, read from the shards through their indexes (a mapped file each, the last `keep` kept open).

    A sample lying past the end of its file (a shard cut short), behind a garbled index line,
    in a shard that cannot be opened, or lacking one of the stream's components raises Lost;
    so does one its index does not list. So does one whose bytes are not those packed (each
    member's CRC-32C against the sample's checksums member, in shards packed with them), or
    whose label is not its video's in the manifest: what is read is what was written.
    """

    def __init__(self, stream: Stream, keep: int = 256):
        self.stream, self.keep = stream, keep
        self.starts = np.cumsum([0] + list(stream.shard_samples))
        self._open: OrderedDict[str, tuple] = OrderedDict()  # tar -> (data, index lines, whole samples, why not all)

    def locate(self, sample: int) -> tuple[int, int]:
        """(shard, sample within it) of a sample id."""
        shard = int(np.searchsorted(self.starts, sample, side="right")) - 1
        return shard, sample - int(self.starts[shard])

    def read(self, sample: int) -> dict:
        """{ext: bytes, "__key__", "__url__"} of one sample, or Lost."""
        shard, i = self.locate(sample)
        tar = self.stream.tars[shard]
        data, lines, whole, problem = self._shard(tar, self.stream.indexes[shard])
        if i >= whole:
            raise Lost(tar, self._key(lines, i), problem or f"its index lists {len(lines)} samples, the manifest more")
        entries = index_entries(lines[i])
        out = {"__url__": tar, "__key__": key_of(entries[0][3])}
        for ext, start, length, _ in entries:
            out[ext] = data[start:start + length]
        checked = self.stream.checksummed is not None and self.stream.checksummed[shard]
        needed = self.stream.exts + ["cls"]
        missing = next((ext for ext in needed + [CHECKSUMS] * checked if ext not in out), None)
        if missing:
            raise Lost(tar, out["__key__"], f"missing its {missing}")
        if checked:
            problem = checksum_problem(out[CHECKSUMS], [(ext, name, out[ext]) for ext, _, _, name in entries
                                                        if ext in needed])
            if problem:
                raise Lost(tar, out["__key__"], problem)
        self._check_label(tar, out)
        return out

    def _check_label(self, tar: str, sample: dict) -> None:
        """Lost unless the sample's cls is its video's label in the manifest (a valid wrong label trains as one)."""
        labels = self.stream.video_labels
        if labels is None:
            return
        key = sample["__key__"]
        try:
            label = parse_label(sample["cls"], self.stream)
        except ValueError as e:
            raise Lost(tar, key, str(e)) from None
        expected = labels.get(key.rsplit("/", 1)[0])
        if expected is None:
            raise Lost(tar, key, "its video is not in the manifest")
        if label != expected:
            raise Lost(tar, key, f"label {label}, its video's in the manifest is {expected}")

    def _shard(self, tar: str, index: str) -> tuple:
        if tar in self._open:
            self._open.move_to_end(tar)
            return self._open[tar]
        try:
            lines = read_index(index)
            with open(tar, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
            whole, _, problem = whole_samples(lines, size)
            opened = (data, lines, whole, problem)
        except (OSError, ValueError) as e:
            opened = (b"", [], 0, f"unreadable: {e}")
        self._open[tar] = opened
        if len(self._open) > self.keep:
            closing = self._open.popitem(last=False)[1][0]
            if isinstance(closing, mmap.mmap):
                closing.close()
        return opened

    @staticmethod
    def _key(lines: list[str], i: int) -> str:
        try:
            return key_of(index_entries(lines[i])[0][3])
        except (IndexError, ValueError):
            return f"#{i} of the shard"


class Planner:
    """A loader's plans and position: which samples each epoch serves, in which order, and where it is."""

    def __init__(self, stream: Stream, train: bool, seed: int, rank: int, world_size: int, batch_size: int,
                 shuffle_buffer: int, segments: int = 1):
        self.stream, self.train, self.seed, self.rank, self.world_size = stream, train, seed, rank, world_size
        self.batch_size, self.shuffle_buffer = batch_size, shuffle_buffer
        # segments > 1: a plan's entry is a video (its K frames), else a sample
        self.segments = Segments(segments, stream.video_samples) if segments > 1 else None
        if self.segments is not None:
            check_videos(stream)
        self.epoch, self.served = 0, 0  # the position: the next entry to serve is plan(epoch)[served]
        self._plans: dict[int, np.ndarray] = {}

    @property
    def frames_per_entry(self) -> int:
        """Rows of a batch per plan entry: K with segments, else 1."""
        return self.segments.k if self.segments else 1

    @property
    def entries(self) -> int:
        """What a plan's epoch holds: samples, or videos with segments."""
        return len(self.segments.lengths) if self.segments else self.stream.samples

    def plan(self, epoch: int) -> np.ndarray:
        """This rank's sample ids (or video numbers, with segments) of `epoch`, in order."""
        if epoch not in self._plans:
            units = (self.segments.shard_videos(self.stream.shard_samples) if self.segments
                     else self.stream.shard_samples)
            order = epoch_order(units, self.seed, epoch, self.train, self.shuffle_buffer)
            self._plans = {epoch: rank_plan(order, self.rank, self.world_size, self.train)}
        return self._plans[epoch]

    def rows(self, epoch: int, entries: np.ndarray, scale_jitter: tuple[float, float] | None,
             flip: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """rows() of some of this planner's entries of `epoch`."""
        return rows(self.seed, epoch, entries, self.train, scale_jitter, flip, self.segments)

    def batches(self) -> int:
        """Batches in an epoch: the full ones in training, all (the last partial) in eval; fewer if samples are lost."""
        n = self.entries // self.world_size if self.train else len(range(self.rank, self.entries, self.world_size))
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def state(self) -> dict:
        """The position, and what makes the plans and their batches (what a resume must match)."""
        return {"epoch": self.epoch, "served": self.served, "seed": self.seed, "world_size": self.world_size,
                "batch_size": self.batch_size, "shuffle_buffer": self.shuffle_buffer, "samples": self.stream.samples,
                "segments": self.frames_per_entry}

    def load_state(self, state: dict) -> None:
        """Go on from a saved position; ValueError naming what differs if these plans are not the saved ones."""
        mine = self.state()
        if not isinstance(state.get("epoch"), int) or not isinstance(state.get("served"), int):
            raise ValueError(f"its loader position {state!r} is not one this version writes")
        then = {"segments": 1, **state}  # positions written before segments were of frames
        differ = [f"{name} {then.get(name)} then, {mine[name]} now" for name in mine
                  if name not in ("epoch", "served") and then.get(name) != mine[name]]
        if differ:
            raise ValueError("its batches would differ from the run's (" + "; ".join(differ) + ")")
        self.epoch, self.served = state["epoch"], state["served"]
