"""What score.py, fuse.py and predict.py write: checked before the work, never over a file unasked, never over an input.

An output that exists is another run's result until the user says otherwise (--overwrite);
an output that is one of the run's own inputs is refused even then (it would be destroyed
while being read); two outputs of one run never name one file.
"""
from __future__ import annotations

import os
from pathlib import Path

from pack.files import check_output_file


def file_identity(path: str | Path) -> tuple:
    """What tells two names of one file (links, relative paths) from two files: device and inode, else the resolved path."""
    try:
        st = os.stat(path)
        return ("inode", st.st_dev, st.st_ino)
    except OSError:
        return ("path", str(Path(path).resolve()))


def check_outputs(outputs: list[tuple[str, Path]], inputs: list[Path], overwrite: bool) -> list[Path]:
    """Refuse, before any work, outputs (flag, path) that are one file, that are an input, or that exist (unless
    overwrite); each output's folder is made and tried. Returns the outputs that will replace a file."""
    seen: dict[tuple, tuple[str, Path]] = {}
    for flag, path in outputs:
        other = seen.setdefault(file_identity(path), (flag, path))
        if other != (flag, path):
            raise SystemExit(f"error: {other[0]} {other[1]} and {flag} {path} are one file: one would overwrite the "
                             f"other; give them different names")
    read = {file_identity(p): p for p in inputs}
    replaced = []
    for flag, path in outputs:
        check_output_file(path, flag)
        source = read.get(file_identity(path))
        if source is not None:
            raise SystemExit(f"error: {flag} {path} is an input of this run ({source}): writing it would destroy it; "
                             f"give another {flag} (--overwrite does not allow this)")
        if path.exists() or path.is_symlink():
            if not overwrite:
                raise SystemExit(f"error: {flag} {path} exists (an earlier run's result?); give another {flag}, "
                                 f"or --overwrite to replace it")
            replaced.append(path)
    return replaced


def replaced_note(replaced: list[Path]) -> str:
    """What a run says after writing when it replaced files (--overwrite)."""
    if not replaced:
        return ""
    shown = ", ".join(map(str, replaced[:5])) + (f" and {len(replaced) - 5} more" if len(replaced) > 5 else "")
    return f" (--overwrite: replaced {shown})"
