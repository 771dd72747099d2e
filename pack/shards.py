"""Writing WebDataset tar shards with their DALI index, never leaving a partial file behind."""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

# DALI's wds2idx format: "v1.2 <samples>", then per sample "ext offset size name ..." triples.
INDEX_VERSION = "v1.2"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary name in the same folder, then rename: readers see all or nothing."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: object) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1).encode())


class ShardWriter:
    """Writes samples into `{prefix}-{k:03d}.tar` pieces, starting a new piece past max_bytes.

    Each piece is written under a temporary name with its `.idx` beside it and renamed
    when whole, so a killed job leaves only complete shards and ignorable temporaries.
    """

    def __init__(self, prefix: Path, max_bytes: int):
        self.prefix = prefix
        self.max_bytes = max_bytes
        self.finished: list[dict] = []  # {"tar", "idx", "samples", "bytes"} per closed piece
        self._tar: tarfile.TarFile | None = None

    def _open(self) -> None:
        self._path = Path(f"{self.prefix}-{len(self.finished):03d}.tar")
        self._tmp = self._path.with_name(f".{self._path.name}.tmp{os.getpid()}")
        self._file = open(self._tmp, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self._index: list[str] = []

    def write(self, key: str, components: dict[str, bytes]) -> None:
        """Add one sample: components maps extension (e.g. "rgb.jpg") to bytes."""
        if self._tar is None:
            self._open()
        entries = []
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
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        idx = self._path.with_suffix(".idx")
        atomic_write_bytes(idx, f"{INDEX_VERSION} {len(self._index)}\n{chr(10).join(self._index)}\n".encode())
        os.replace(self._tmp, self._path)
        self.finished.append({"tar": self._path.name, "idx": idx.name, "samples": len(self._index), "bytes": size})
        self._tar = None

    def abort(self) -> None:
        """Drop the open piece (on error): its temporary file is removed."""
        if self._tar is not None:
            self._file.close()
            self._tmp.unlink(missing_ok=True)
            self._tar = None
