"""Writing WebDataset tar shards with their DALI index, never leaving a partial file behind."""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import tarfile
from pathlib import Path

import google_crc32c

from .files import atomic_write_bytes

# DALI's wds2idx format: "v1.2 <samples>", then per sample "ext offset size name ..." triples.
INDEX_VERSION = "v1.2"
# What a sample key may hold: the index separates fields with spaces, the readers split a member's name at its
# first dot, and a USTAR name holds 100 bytes ("{key}/000000.flow15.jpg" fits with a key of 80).
SAFE_KEY = re.compile(r"[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*")
MAX_KEY = 80
# Each sample's last member: the CRC-32C of each of its other members, a line `{member name} {crc:08x}` each (as
# TFRecord's per-record CRC-32C, checked by every reader as it reads: ~1.5 us for a 25 kB JPEG with the CPU's crc32
# instruction, where zlib's CRC-32 took ~8; all the reader's checks, 1-2% of a loader's time a sample:
# docs/benchmarks.md).
CHECKSUMS = "crc32c"


def sample_key(video_id: str) -> str:
    """The name a video's samples go under in the shards: its id where the tar and index formats can carry it.

    An id with anything else (spaces, dots, brackets, &, #, non-ASCII letters, ...) or a long one
    gets a safe form of itself and a hash of the id (unique); the manifest's video_info keeps
    the id, and the results are keyed by it.
    """
    if SAFE_KEY.fullmatch(video_id) and len(video_id) <= MAX_KEY:
        return video_id
    safe = "/".join(part for part in re.sub(r"[^A-Za-z0-9/-]+", "_", video_id).split("/") if part.strip("_"))
    return f"{safe[:MAX_KEY - 13] or 'video'}_{hashlib.sha1(video_id.encode()).hexdigest()[:12]}"


class HashingFile:
    """A file opened for writing that hashes (SHA-256) what passes through: a shard's hash costs no second read."""

    def __init__(self, path: Path):
        self._file = open(path, "wb")
        self.digest = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self._file.write(data)

    def tell(self) -> int:
        return self._file.tell()

    def sync(self) -> None:
        """Flush to disk: a renamed shard is whole even after a crash."""
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


class ShardWriter:
    """Writes samples into `{prefix}-{k:03d}.tar` pieces, starting a new piece past max_bytes.

    Each piece is written under a temporary name with its `.idx` beside it and renamed
    when whole, so a killed job leaves only complete shards and ignorable temporaries.
    """

    def __init__(self, prefix: Path, max_bytes: int):
        self.prefix = prefix
        self.max_bytes = max_bytes
        self.finished: list[dict] = []  # {"tar", "idx", "samples", "bytes", "sha256", "idx_sha256"} per closed piece
        self._tar: tarfile.TarFile | None = None

    def _open(self) -> None:
        self._path = Path(f"{self.prefix}-{len(self.finished):03d}.tar")
        self._tmp = self._path.with_name(f".{self._path.name}.tmp{os.getpid()}")
        self._file = HashingFile(self._tmp)
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self._index: list[str] = []

    def write(self, key: str, components: dict[str, bytes]) -> None:
        """Add one sample: components maps extension (e.g. "rgb.jpg") to bytes; their checksums go last."""
        if self._tar is None:
            self._open()
        entries = []
        components = {**components, CHECKSUMS: checksum_table(key, components)}
        for ext, data in components.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444  # fixed metadata: same bytes every run
            self._tar.addfile(info, io.BytesIO(data))
            data_offset = self._tar.offset - -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            entries.append(f"{ext} {data_offset} {len(data)} {info.name}")
        self._index.append(" ".join(entries))
        if self._tar.offset >= self.max_bytes:
            self.close()

    def close(self) -> None:
        """Finish the open piece: close the tar, write its index, rename both into place."""
        if self._tar is None:
            return
        self._tar.close()
        size = self._file.tell()
        self._file.sync()
        self._file.close()
        idx = self._path.with_suffix(".idx")
        index = f"{INDEX_VERSION} {len(self._index)}\n{chr(10).join(self._index)}\n".encode()
        atomic_write_bytes(idx, index)
        os.replace(self._tmp, self._path)
        self.finished.append({"tar": self._path.name, "idx": idx.name, "samples": len(self._index), "bytes": size,
                              "sha256": self._file.digest.hexdigest(), "idx_sha256": hashlib.sha256(index).hexdigest(),
                              "checksums": CHECKSUMS})
        self._tar = None

    def abort(self) -> None:
        """Drop the open piece (on error): its temporary file is removed."""
        if self._tar is not None:
            with contextlib.suppress(OSError):  # a full disk fails the close's flush: the file goes all the same
                self._file.close()
            self._tmp.unlink(missing_ok=True)
            self._tar = None


def checksum_table(key: str, components: dict[str, bytes]) -> bytes:
    """A sample's CHECKSUMS member: each component's member name and CRC-32C (the names too: a damaged index is caught)."""
    return "".join(f"{key}.{ext} {google_crc32c.value(data):08x}\n" for ext, data in components.items()).encode()


# ---------------------------------------------------------------- reading them back


def checksum_problem(table: bytes, members: list[tuple[str, str, bytes]]) -> str | None:
    """Why a sample's (ext, member name, bytes) are not what its CHECKSUMS member says was packed; None if they are."""
    try:
        fields = bytes(table).decode("ascii").split()
        recorded = {name: int(crc, 16) for name, crc in zip(fields[0::2], fields[1::2])}
    except (UnicodeDecodeError, ValueError):
        return f"damaged: its {CHECKSUMS} member is unreadable"
    for ext, name, data in members:
        if name not in recorded:
            return f"damaged: {name} is not among the members packed (its index or {CHECKSUMS} changed)"
        if google_crc32c.value(data) != recorded[name]:
            return f"damaged: its {ext} is not what was packed (CRC-32C mismatch)"
    return None


def key_of(member_name: str) -> str:
    """Sample key of a tar member name: `vid/000012.rgb.jpg` -> `vid/000012` (WebDataset's rule)."""
    dot = member_name.find(".", member_name.rfind("/") + 1)
    return member_name[:dot]


def index_entries(line: str) -> list[tuple[str, int, int, str]]:
    """One sample's line of a wds2idx index: (ext, offset, size, member name) per component; ValueError if garbled."""
    fields = line.split()
    if not fields or len(fields) % 4:
        raise ValueError(f"index line {line[:80]!r} is not 'ext offset size name' groups (a name with a space?)")
    return [(ext, int(start), int(size), name) for ext, start, size, name in
            zip(fields[0::4], fields[1::4], fields[2::4], fields[3::4])]


def whole_samples(lines: list[str], file_size: int) -> tuple[int, str | None, str | None]:
    """How many samples, from the first, a shard of file_size bytes holds whole and indexed readably:
    (that count, the next sample's key if its line names one, why the rest is lost or None)."""
    for i, line in enumerate(lines):
        try:
            entries = index_entries(line)
        except ValueError as e:
            return i, None, f"unreadable index: {e}"
        if any(start + size > file_size for _, start, size, _ in entries):
            return i, key_of(entries[0][3]), f"truncated: the file ends at byte {file_size}, its index goes on"
    return len(lines), None, None


def read_index(index: str) -> list[str]:
    """A shard index's sample lines (after its `v1.2 <samples>` header); ValueError if it is not one."""
    with open(index, encoding="utf-8") as f:
        lines = f.read().splitlines()
    header = lines[0].split() if lines else []
    if len(header) != 2 or not header[1].isdigit() or int(header[1]) != len(lines) - 1:
        raise ValueError(f"{index} is not a whole shard index (header {lines[0][:40] if lines else ''!r}, "
                         f"{max(len(lines) - 1, 0)} lines)")
    return lines[1:]


LABEL = re.compile(rb"-?[0-9]{1,8}")


def parse_label(raw: bytes, num_classes: int, labelled: bool = True) -> int:
    """A sample's `cls` bytes -> its label; ValueError unless ASCII digits in the split's range (0..C-1, or -1 unlabelled)."""
    raw = bytes(raw)
    if not LABEL.fullmatch(raw):
        raise ValueError(f"bad label {raw[:12]!r}: not an integer")
    label = int(raw)
    if labelled and not 0 <= label < num_classes:
        raise ValueError(f"label {label} out of range: the data has {num_classes} classes")
    if not labelled and label != -1:
        raise ValueError(f"label {label} in a split packed without labels (-1)")
    return label
