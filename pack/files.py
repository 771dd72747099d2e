"""Writing files safely: whole or not at all, valid JSON only, outputs checked before the work, one writer at a time."""
from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import socket
import time
import weakref
from pathlib import Path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary name in the same folder, then rename: readers see all or nothing (a write that fails, on a
    full disk say, leaves no temporary behind)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """The SHA-256 of a file's bytes, hex: what an artifact records of another (a checkpoint of its --init, ...)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def json_safe(obj):
    """obj with every non-finite float (NaN, inf) as None: JSON has no NaN, and a bare NaN breaks its readers."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def json_text(obj: object, indent: int | None = 1) -> str:
    """Valid JSON (non-finite numbers written as null)."""
    return json.dumps(json_safe(obj), indent=indent, allow_nan=False)


def atomic_write_json(path: Path, obj: object) -> None:
    atomic_write_bytes(path, json_text(obj).encode())


def check_output_file(path: Path, flag: str) -> None:
    """Fail now, not after hours of work, if `path` cannot be written: make its folder, try a file there."""
    path = Path(path)
    if path.is_dir():
        raise SystemExit(f"error: {flag} {path} is a folder; give a file name")
    check_output_dir(path.parent, flag, of=path)


def check_output_dir(folder: Path, flag: str, of: Path | None = None) -> None:
    """Make `folder` (and its parents) and try writing a file in it; one clear line if that fails."""
    what = f"{flag} {of if of is not None else folder}"
    existing = next(p for p in [folder, *folder.parents] if p.exists())
    if not existing.is_dir():
        raise SystemExit(f"error: {what}: {existing} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise SystemExit(f"error: {what}: cannot write there ({e.strerror or e})") from None


class Lock:
    """An exclusive lock on a file (flock): held until released or the process ends, even by kill -9.

    The file says who holds it (host, pid, start time), for the message the next one gets.
    It belongs to the process that took it: a forked child (a loader's or pack's worker)
    closes its copy at once, so a worker outliving its parent for a moment cannot keep it.
    """

    _held: "weakref.WeakSet[Lock]" = weakref.WeakSet()  # this process's locks, for children to let go of

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file = None

    def acquire(self, what: str) -> "Lock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise SystemExit(f"error: {what} is in use by {holder} ({self.path}); wait for it to finish, "
                             f"or use another folder") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        self._file = f
        Lock._held.add(self)
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the lock; the file stays (removing it would race the next holder)
            self._file = None

    def __enter__(self) -> "Lock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    @staticmethod
    def _let_go_in_child() -> None:
        for lock in list(Lock._held):
            if lock._file is not None:
                lock._file.close()  # the child's copy of the descriptor only: the parent's lock stays
                lock._file = None


os.register_at_fork(after_in_child=Lock._let_go_in_child)
