"""DATA/manifest.json: the one file later stages read to find shards, classes and counts.

It is assembled from the per-split plans and the per-group records that packing writes,
so it can always be rebuilt (after a resumed run, or to join parts packed elsewhere):
`python -m pack.merge DATA`.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import warnings
from collections import Counter
from pathlib import Path

from .files import atomic_write_bytes, atomic_write_json, json_safe

FORMAT_VERSION = 1
PLAN_KEYS = ("params", "classes", "groups")


class BrokenFile(ValueError):
    """A file of DATA that is not what pack writes (cut short, edited, another kind): the message names it."""


def read_json(path: Path, needs: tuple[str, ...] = ()) -> dict:
    """A JSON object with the keys `needs`; BrokenFile naming the file otherwise."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BrokenFile(f"{path}: not valid JSON ({e}); it was cut short or edited") from None
    lacking = [k for k in needs if not isinstance(obj, dict) or k not in obj]
    if not isinstance(obj, dict) or lacking:
        raise BrokenFile(f"{path}: not the file pack writes (no {', '.join(lacking) or 'object'})")
    return obj


def plan_id(plan: dict) -> str:
    """A short hash of a split's plan: every part's records carry it, so parts of another plan are told apart."""
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]


def missing_parts(split: dict) -> str:
    """Which parts of an incomplete split have not finished, as far as the finished ones tell."""
    missing = split["groups_missing"]
    parts = split["parts"]
    if not parts:
        return f"no group has finished yet ({len(missing)} to pack)"
    lacking = sorted({g % parts for g in missing})
    return (f"part(s) {', '.join(map(str, lacking))} of {parts} (0..{parts - 1}) have not finished: groups "
            f"{', '.join(map(str, missing[:8]))}{' ...' if len(missing) > 8 else ''} have no record")


def incomplete_note(split: dict) -> str | None:
    """None for a split packed whole; else how much of it was packed and which parts are missing."""
    if split["complete"]:
        return None
    return (f"incomplete split: {split['groups_done']} of {split['groups_total']} shard groups packed, "
            f"{missing_parts(split)}")


def build_manifest(data: Path) -> dict:
    """Join every split's plan and group records under DATA into one manifest.

    A record of another plan (a part packed with other parameters or annotations, then
    copied here) is an error: its shards do not belong to this split.
    """
    data = Path(data)
    classes, splits = None, {}
    for plan_path in sorted(data.glob("*/plan.json")):
        split_dir = plan_path.parent
        plan = read_json(plan_path, needs=PLAN_KEYS)
        if plan["classes"]:
            if classes is not None and classes != plan["classes"]:
                raise ValueError(f"split {split_dir.name} was packed with another class list than the "
                                 f"other splits; pack it again with --classes {data / 'classes.txt'}")
            classes = plan["classes"]
        shards = {"rgb": [], "flow": []}
        videos, failed, done, missing, parts, foreign = {}, {}, 0, [], Counter(), []
        expected = plan_id(plan)
        for group in range(len(plan["groups"])):
            record_path = split_dir / "records" / f"{group:05d}.json"
            if not record_path.exists():
                missing.append(group)
                continue
            record = read_json(record_path, needs=("shards", "videos", "failed"))
            if record.get("plan", expected) != expected:
                foreign.append(f"group {group} (part {record['part'][0]} of {record['part'][1]})")
                continue
            parts[record.get("part", [0, 1])[1]] += 1
            done += 1
            for modality, pieces in record["shards"].items():
                for piece in pieces:
                    shards[modality].append({**piece, "tar": f"{split_dir.name}/{modality}/{piece['tar']}",
                                             "idx": f"{split_dir.name}/{modality}/{piece['idx']}"})
            videos.update(record["videos"])
            failed.update(record["failed"])
        if foreign:
            raise ValueError(f"{split_dir}: {', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''} were packed "
                             f"with other parameters or annotation files than {plan_path.name} says: re-pack them with "
                             f"the same command as the other parts (remove their records/ files first)")
        splits[split_dir.name] = {
            "plan": expected,  # the split's identity: what consumers record and compare (split_identity)
            "complete": done == len(plan["groups"]),
            "groups_done": done,
            "groups_total": len(plan["groups"]),
            "groups_missing": missing,
            "parts": parts.most_common(1)[0][0] if parts else None,
            "params": plan["params"],
            "source": plan.get("source"),
            "samples": sum(v["samples"] for v in videos.values()),
            "videos": len(videos),
            "shards": shards,
            "video_info": videos,
            "failed": failed,
        }
    return {"format_version": FORMAT_VERSION, "classes": classes or [], "splits": splits}


# The pack parameters that decide what a network's input looks like: a stream trained on one set
# and given inputs made with another sees other pictures than it learnt (stride, RGB quality and
# shard sizes do not change that; nor does the flow length packed: a stream reads its own
# number of flow images, which open_stream checks the data has).
INPUT_PARAMS = ("flow", "flow_encoding", "flow_bound", "flow_quality", "short_side")


def complete_params(params: dict) -> dict:
    """Pack parameters as recorded, with those added since read as what data packed before them was packed with.

    Before --flow-encoding and --flow-quality existed, flow was x/y/magnitude at the RGB JPEG quality.
    """
    if "flow" not in params:  # not a record of pack parameters (a checkpoint older than pack_params)
        return params
    return {"flow_encoding": "xym", "flow_quality": params.get("quality", 90), **params}


def params_differ(trained: dict, given: dict, modality: str) -> list[str]:
    """The input-deciding pack parameters that differ, as "name A vs B" (flow's only for the flow stream)."""
    names = INPUT_PARAMS if modality == "flow" else ("short_side",)
    trained, given = complete_params(trained), complete_params(given)
    return [f"{n} {trained.get(n)} vs {given.get(n)}" for n in names
            if n in trained and n in given and trained[n] != given[n]]


def split_identity(data: str | Path, manifest: dict, split: str) -> dict:
    """What an artifact made from one split records of it: the folder, the split, its plan's id, its pack parameters.

    Two artifacts of the same split of the same packed data carry the same `plan`; any other
    split, or data packed from other annotations or with other parameters, another one. A split
    packed in part (a --part never run) says so (`incomplete`).
    """
    info = manifest["splits"][split]
    incomplete = incomplete_note(info)
    return {"data": str(data), "split": split, "plan": info.get("plan"), "params": info["params"],
            **({"incomplete": incomplete} if incomplete else {})}


@contextlib.contextmanager
def data_lock(data: str | Path):
    """DATA's own files (a new split's plan and class list, manifest.json, classes.txt) changed by one process at a time.

    Two packs of two splits into one DATA wait here for each other a moment: each builds the
    manifest from what the other has finished, and a split's classes follow the first's.
    """
    with open(Path(data) / ".data.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # held until the file closes, even if this process is killed
        yield


def content_sha256(manifest: dict) -> str:
    """The SHA-256 of a manifest's content but its own "sha256" (keys sorted: the file's layout does not count)."""
    body = json_safe({k: v for k, v in manifest.items() if k != "sha256"})
    return hashlib.sha256(json.dumps(body, sort_keys=True, allow_nan=False).encode()).hexdigest()


def stamped(manifest: dict) -> dict:
    """The manifest with the hash of its content, which every reader checks (load_manifest)."""
    return {**manifest, "sha256": content_sha256(manifest)}


def write_manifest(data: Path) -> dict:
    with data_lock(data):
        manifest = stamped(build_manifest(data))
        atomic_write_json(Path(data) / "manifest.json", manifest)
        if manifest["classes"]:
            atomic_write_bytes(Path(data) / "classes.txt", ("\n".join(manifest["classes"]) + "\n").encode())
    return manifest


def load_manifest(data: str | Path) -> dict:
    """Read DATA/manifest.json with errors that say what to do."""
    path = Path(data) / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: pack the data first (python -m pack ...), "
                                f"or join packed parts with python -m pack.merge {data}")
    try:
        manifest = read_json(path, needs=("format_version", "classes", "splits"))
    except BrokenFile as e:
        raise BrokenFile(f"{e}; python -m pack.merge {data} writes it anew from the splits' plans and records") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format version {manifest.get('format_version')}, "
                         f"this code reads {FORMAT_VERSION}; re-pack the data")
    if "sha256" not in manifest:
        warnings.warn(f"{path} carries no checksum (written before pack recorded one): its content is read unchecked; "
                      f"python -m pack.merge {data} rewrites it with one", stacklevel=2)
    elif manifest["sha256"] != content_sha256(manifest):
        raise BrokenFile(f"{path} is damaged: its content is not what pack wrote (its SHA-256 is not the one it "
                         f"carries: a flipped bit, or an edit by hand); rebuild it from the splits' plans and records "
                         f"with python -m pack.merge {data}, then check the shards with python -m pack.verify {data}")
    return manifest
