"""Kinetics annotation CSVs as published, and the class list derived from them."""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

# Kinetics-700-2020 calls its validation split "validate"; the others say "val".
SPLIT_ALIASES = {"validate": "val"}


@dataclass(frozen=True)
class Clip:
    """One annotated clip: the video id is the crawler's file stem."""

    video_id: str
    youtube_id: str
    label: str | None  # None in the test CSV, which has no label column
    split: str


def crawler_stem(youtube_id: str, time_start: int, time_end: int) -> str:
    """The name the Kinetics crawler gives a downloaded clip (without extension)."""
    return f"{youtube_id}_{time_start:06d}_{time_end:06d}"


def read_clips(path: str | Path) -> list[Clip]:
    """Parse a Kinetics CSV (label column optional, labels quoted when they hold commas)."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"youtube_id", "time_start", "time_end"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(
                f"{path}: not a Kinetics CSV, missing column(s) {sorted(missing)}; "
                f"expected a header like label,youtube_id,time_start,time_end,split"
            )
        clips = []
        for line, row in enumerate(reader, start=2):
            try:
                start, end = int(float(row["time_start"])), int(float(row["time_end"]))
            except ValueError:
                raise ValueError(f"{path}:{line}: time_start/time_end must be numbers, got {row}") from None
            split = (row.get("split") or "").strip()
            label = row.get("label")
            clips.append(
                Clip(
                    video_id=crawler_stem(row["youtube_id"], start, end),
                    youtube_id=row["youtube_id"],
                    label=label.strip() if label is not None else None,
                    split=SPLIT_ALIASES.get(split, split),
                )
            )
    return clips


def read_class_file(path: str | Path) -> list[str]:
    """One class per line (blank lines ignored), as pack writes DATA/classes.txt."""
    return [c.strip() for c in Path(path).read_text(encoding="utf-8").splitlines() if c.strip()]


def class_list(clips: list[Clip], given: list[str] | None = None) -> list[str]:
    """The given class order, else the sorted unique labels; every label must be a class."""
    classes = given if given else sorted({c.label for c in clips if c.label is not None})
    unknown = sorted({c.label for c in clips if c.label is not None} - set(classes))
    if unknown:
        raise ValueError(f"labels not in the class list ({len(unknown)}): {unknown[:5]}; "
                         f"pack with the class list of the training split (--classes)")
    return classes
