"""Annotation files as published, read into clips: Kinetics CSVs, UCF101 and HMDB51 split files, list files, class folders.

Every reader gives Annotations: the clips of each split it read, the class order the layout
defines (UCF101's classInd, HMDB51's and folders' sorted names; None: the labels' sorted
order, or the classes already packed), and the files each split came from. Every error
names the file and the line.
"""
from __future__ import annotations

import csv
import hashlib
import io
import math
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from .video import VIDEO_EXTENSIONS, walk_files

# Kinetics-700-2020 calls its validation split "validate"; the others say "val".
SPLIT_ALIASES = {"validate": "val"}
LABEL_LIKE = {"label", "labels", "class", "classname", "class_name", "action", "category"}


class AnnotationError(ValueError):
    """An annotation file that cannot be read as it is: the message names the file and line and says what to fix."""


@dataclass(frozen=True)
class Clip:
    """One annotated video of a split."""

    video_id: str  # what results are keyed by: Kinetics' crawler stem, else the path without its extension
    label: str | None  # None where the annotations have no labels (Kinetics' test CSV)
    split: str
    where: str  # "file:line", for messages
    path: str | None = None  # its path under the videos folder, where the layout names it (else found by id)
    youtube_id: str | None = None  # Kinetics only


@dataclass
class Annotations:
    splits: dict[str, list[Clip]]
    classes: list[str] | None = None
    sources: dict[str, dict] = field(default_factory=dict)  # split -> {"layout", "files": {name: sha256}, ...}
    # True: a split may hold only some of the classes of a class list given or already packed (class folders: a val
    # split without one class's folder); else the layout's class list is the whole one and must match.
    classes_subset: bool = False


def read_text(path: Path) -> str:
    """A text file as UTF-8 (a spreadsheet's byte-order mark dropped); an error naming the line that is not UTF-8."""
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"{path}: no such file")
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise AnnotationError(f"{path}:{line}: not UTF-8 text (byte {data[e.start]:#04x}; a Latin-1 or Windows "
                              f"file?): save it as UTF-8") from None


def fingerprint(*paths: Path) -> dict[str, str]:
    """{file name: the start of its SHA-256}: which annotation files a split was packed from (parts must agree)."""
    return {Path(p).name: hashlib.sha256(Path(p).read_bytes()).hexdigest()[:16] for p in paths}


def check_label(label: str, where: str) -> str:
    """A label as a class name: stripped, in Unicode's composed form (NFC), so that "café" typed on macOS (decomposed,
    as its file names are) and elsewhere is one class."""
    label = unicodedata.normalize("NFC", label.strip())
    if not label:
        raise AnnotationError(f"{where}: empty label")
    if "\n" in label or "\r" in label:
        raise AnnotationError(f"{where}: the label {label[:40]!r} holds a line break (classes.txt holds a class a line)")
    return label


def crawler_stem(youtube_id: str, time_start: int, time_end: int) -> str:
    """The name the Kinetics crawler gives a downloaded clip (without extension)."""
    return f"{youtube_id}_{time_start:06d}_{time_end:06d}"


def seconds(value: str | None, column: str, where: str) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or number < 0:
        raise AnnotationError(f"{where}: {column} {value!r} is not a number of seconds")
    return int(number)


def read_kinetics(path: Path) -> Annotations:
    """A Kinetics CSV (400, 600, 700): label,youtube_id,time_start,time_end,split (label optional, quoted if it holds commas)."""
    path = Path(path)
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    header = [h.strip() for h in reader.fieldnames or []]
    reader.fieldnames = header
    missing = {"youtube_id", "time_start", "time_end"} - set(header)
    if missing:
        raise AnnotationError(f"{path}:1: not a Kinetics CSV, missing column(s) {sorted(missing)}; expected a header "
                              f"like label,youtube_id,time_start,time_end,split")
    if "label" not in header and LABEL_LIKE & {h.lower() for h in header}:
        print(f"warning: {path}: no 'label' column (it has {header}): packed without labels; name the column "
              f"'label' to pack them")
    clips = []
    for row in reader:
        where = f"{path}:{reader.line_num}"
        if None in row.values():
            raise AnnotationError(f"{where}: fewer fields than the header's {len(header)}")
        if None in row:
            raise AnnotationError(f"{where}: more fields than the header's {len(header)} (a label with a comma must "
                                  f"be quoted)")
        youtube_id = row["youtube_id"].strip()
        if not youtube_id:
            raise AnnotationError(f"{where}: empty youtube_id")
        start, end = (seconds(row[c], c, where) for c in ("time_start", "time_end"))
        split = (row.get("split") or "").strip()
        label = check_label(row["label"], where) if "label" in row else None
        clips.append(Clip(video_id=crawler_stem(youtube_id, start, end), label=label, where=where,
                          split=SPLIT_ALIASES.get(split, split), youtube_id=youtube_id))
    splits: dict[str, list[Clip]] = {}
    for clip in clips:
        splits.setdefault(clip.split or "train", []).append(clip)
    source = {"layout": "kinetics", "files": fingerprint(path)}
    return Annotations(splits, None, {s: source for s in splits})


def lines_of(path: Path) -> list[tuple[str, str]]:
    """(file:line, text) of each non-blank line, CRLF or not, trailing spaces stripped."""
    return [(f"{path}:{n}", line.strip()) for n, line in enumerate(read_text(path).splitlines(), start=1) if line.strip()]


def list_path(text: str) -> str:
    """A video's path as a list file gives it, in the one form the videos folder is searched by: `/`, no `./`."""
    path = text.replace("\\", "/")
    while path.startswith("./"):
        path = path[2:].lstrip("/")
    return path


def without_extension(path: str) -> str:
    return path.rsplit(".", 1)[0] if Path(path).suffix.lower() in VIDEO_EXTENSIONS else path


def read_ucf101(folder: Path, fold: int) -> Annotations:
    """UCF101's classInd.txt, trainlistK.txt ("Class/v_Class_gXX_cYY.avi N", N 1-based) and testlistK.txt (no label)."""
    folder = Path(folder)
    files = [folder / "classInd.txt", folder / f"trainlist{fold:02d}.txt", folder / f"testlist{fold:02d}.txt"]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise AnnotationError(f"{folder}: no {', '.join(missing)} (UCF101's ucfTrainTestlist holds folds 1 to 3; "
                              f"--fold {fold})")
    classes, index = [], {}
    for where, line in lines_of(files[0]):
        parts = line.split(None, 1)
        if len(parts) != 2 or parts[0] != str(len(classes) + 1):
            raise AnnotationError(f"{where}: expected '{len(classes) + 1} ClassName', got {line[:60]!r}")
        classes.append(check_class(parts[1], where, index))
    splits = {"train": [], "val": []}
    for where, line in lines_of(files[1]):
        parts = line.rsplit(None, 1)
        if len(parts) != 2 or not parts[1].isdigit():
            raise AnnotationError(f"{where}: a line without its class index (expected 'Class/video.avi N')")
        path, number = list_path(parts[0]), int(parts[1])
        if not 1 <= number <= len(classes):
            raise AnnotationError(f"{where}: class index {number} out of range: classInd.txt has 1 to {len(classes)}")
        folder_class = path.split("/")[0]
        if folder_class in index and folder_class != classes[number - 1]:
            raise AnnotationError(f"{where}: {path} is in {folder_class}'s folder but has the index of "
                                  f"{classes[number - 1]}")
        splits["train"].append(Clip(without_extension(path), classes[number - 1], "train", where, path))
    for where, line in lines_of(files[2]):
        path = list_path(line.rsplit(None, 1)[0] if line.rsplit(None, 1)[-1].isdigit() else line)
        label = unicodedata.normalize("NFC", path.split("/")[0])  # the class is the folder, never the file name's
        if label not in index:
            raise AnnotationError(f"{where}: {path}: its folder {label!r} is not a class of classInd.txt")
        splits["val"].append(Clip(without_extension(path), label, "val", where, path))
    return Annotations(splits, classes, {"train": {"layout": "ucf101", "fold": fold, "files": fingerprint(*files[:2])},
                                         "val": {"layout": "ucf101", "fold": fold,
                                                 "files": fingerprint(files[0], files[2])}})


def read_hmdb51(folder: Path, fold: int) -> Annotations:
    """HMDB51's split files, one a class: <class>_test_splitK.txt, lines "<video>.avi <mark>" (1 train, 2 test, 0 unused)."""
    folder = Path(folder)
    suffix = f"_test_split{fold}.txt"
    files = sorted(f for f in folder.glob(f"*{suffix}") if f.is_file())
    if not files:
        raise AnnotationError(f"{folder}: no *{suffix} files (HMDB51's testTrainMulti_7030_splits holds folds 1 to "
                              f"3; --fold {fold})")
    classes = sorted(f.name[:-len(suffix)] for f in files)
    splits = {"train": [], "val": []}
    for file in files:
        label = file.name[:-len(suffix)]
        for where, line in lines_of(file):
            parts = line.rsplit(None, 1)
            if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
                raise AnnotationError(f"{where}: expected '<video>.avi <0, 1 or 2>', got {line[:60]!r}")
            if parts[1] == "0":
                continue
            split, path = "train" if parts[1] == "1" else "val", f"{label}/{parts[0]}"
            splits[split].append(Clip(without_extension(path), label, split, where, path))
    source = {"layout": "hmdb51", "fold": fold, "files": fingerprint(*files)}
    return Annotations(splits, classes, {"train": source, "val": source})


def read_list(path: Path, split: str, classes: list[str] | None) -> Annotations:
    """A list file: "relative/path label" a line (the path may hold spaces); a label is a class name or an index into classes."""
    path = Path(path)
    names = set(classes or [])
    clips = []
    for where, line in lines_of(path):
        parts = line.rsplit(None, 1)
        if len(parts) != 2:
            raise AnnotationError(f"{where}: a line without a label (expected 'relative/path label')")
        video, label = list_path(parts[0]), parts[1]
        if label not in names and re.fullmatch(r"-?\d+", label):
            if classes is None:
                raise AnnotationError(f"{where}: the label {label} is a class index: give the class list (--classes)")
            if not 0 <= int(label) < len(classes):
                raise AnnotationError(f"{where}: class index {label} out of range: --classes has 0 to {len(classes) - 1}")
            label = classes[int(label)]
        elif classes is not None and label not in names:
            raise AnnotationError(f"{where}: the class {label!r} is not in --classes")
        clips.append(Clip(without_extension(video), check_label(label, where), split, where, video))
    return Annotations({split: clips}, None, {split: {"layout": "list", "files": fingerprint(path)}})


def read_folders(root: Path, split: str) -> Annotations:
    """Every video under root/<class>/ (sub-folders and links followed); classes in sorted order."""
    root = Path(root)
    if not root.is_dir():
        raise AnnotationError(f"--folders {root}: no such folder")
    folders = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not folders:
        raise AnnotationError(f"--folders {root}: no class folders in it (expected {root}/<class>/<video>)")
    clips = []
    for folder in folders:  # two folders whose names differ only in Unicode form are one class
        for file in walk_files(root / folder):
            if file.suffix.lower() in VIDEO_EXTENSIONS:
                relative = file.relative_to(root).as_posix()
                clips.append(Clip(without_extension(relative), check_label(folder, str(file)), split, str(file), relative))
    classes = sorted({check_label(folder, str(root / folder)) for folder in folders})
    return Annotations({split: clips}, classes, {split: {"layout": "folders", "folder": root.name}}, classes_subset=True)


def check_class(name: str, where: str, seen: dict[str, str]) -> str:
    """A class of a class list, once: a name given twice would make two outputs of one class (seen: name -> where)."""
    name = check_label(name, where)
    if name in seen:
        raise AnnotationError(f"{where}: the class {name!r} is named twice (also at {seen[name]}): keep one line")
    seen[name] = where
    return name


def class_difference(ours: list[str], theirs: list[str], our_name: str, their_name: str) -> str:
    """What tells two class lists apart, by name: the classes only one has (the first few), else the first place
    where their orders differ."""
    only = [(name, [c for c in a if c not in set(b)]) for name, a, b in ((our_name, ours, theirs),
                                                                         (their_name, theirs, ours))]
    said = [f"only in {name}: {', '.join(repr(str(c)) for c in extra[:5])}"
            f"{f' and {len(extra) - 5} more' if len(extra) > 5 else ''}"
            for name, extra in only if extra]
    if said:
        return "; ".join(said)
    i = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
    return (f"the same classes in another order: class {i} is {str(ours[i])!r} in {our_name}, {str(theirs[i])!r} in "
            f"{their_name}")


def read_class_file(path: str | Path) -> list[str]:
    """One class per line (blank lines ignored), as pack writes DATA/classes.txt."""
    seen: dict[str, str] = {}
    return [check_class(line, where, seen) for where, line in lines_of(Path(path))]


def deduplicated(clips: list[Clip]) -> list[Clip]:
    """The clips without repeats: a video listed twice with one label once (said), with two labels an error naming both.

    Two files that would get one id (`walk/0001.avi` and `walk/0001.mp4`) are an error naming
    both: which one the id means cannot be told, and packing one would drop the other unsaid.
    """
    first: dict[str, Clip] = {}
    repeats = []
    for clip in clips:
        seen = first.setdefault(clip.video_id, clip)
        if seen is clip:
            continue
        if seen.path != clip.path:
            also = "" if seen.where.endswith(str(seen.path)) else f" (at {seen.where})"
            raise AnnotationError(f"{clip.where}: {clip.path} and {seen.path}{also} would both be the video "
                                  f"{clip.video_id!r}: rename or remove one of them")
        if seen.label != clip.label:
            raise AnnotationError(f"{clip.where}: {clip.video_id} is listed again with another label ({clip.label!r}; "
                                  f"{seen.where} says {seen.label!r}): keep the right one")
        repeats.append(clip)
    if repeats:
        print(f"note: {len(repeats)} line(s) repeat an earlier one and are ignored (e.g. {repeats[0].where} repeats "
              f"{first[repeats[0].video_id].where})")
    return list(first.values())


def check_disjoint(annotations: Annotations) -> None:
    """A video in two splits of one fold would be trained and tested on."""
    seen: dict[str, Clip] = {}
    for clips in annotations.splits.values():
        for clip in clips:
            other = seen.setdefault(clip.video_id, clip)
            if other.split != clip.split:
                raise AnnotationError(f"{clip.where}: {clip.video_id} is in split {clip.split}, and in "
                                      f"{other.split} at {other.where}: a video belongs to one split of a fold")


def class_list(clips: list[Clip], given: list[str] | None = None) -> list[str]:
    """The given class order, else the sorted unique labels; every label must be a class."""
    classes = given if given else sorted({c.label for c in clips if c.label is not None})
    unknown = [c for c in clips if c.label is not None and c.label not in set(classes)]
    if unknown:
        names = sorted({c.label for c in unknown})
        raise ValueError(f"labels not in the class list ({len(names)}): {names[:5]}, the first at {unknown[0].where}; "
                         f"pack with the class list of the training split (--classes)")
    return classes
