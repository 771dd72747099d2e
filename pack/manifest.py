"""DATA/manifest.json: the one file later stages read to find shards, classes and counts.

It is assembled from the per-split plans and the per-group records that packing writes,
so it can always be rebuilt (after a resumed run, or to join parts packed elsewhere):
`python -m pack.merge DATA`.
"""
from __future__ import annotations

import json
from pathlib import Path

from .shards import atomic_write_json

FORMAT_VERSION = 1


def read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def build_manifest(data: Path) -> dict:
    """Join every split's plan and group records under DATA into one manifest."""
    data = Path(data)
    classes, splits = None, {}
    for plan_path in sorted(data.glob("*/plan.json")):
        split_dir = plan_path.parent
        plan = read_json(plan_path)
        if plan["classes"]:
            if classes is not None and classes != plan["classes"]:
                raise ValueError(f"split {split_dir.name} was packed with another class list than the "
                                 f"other splits; pack it again with --classes {data / 'classes.txt'}")
            classes = plan["classes"]
        shards = {"rgb": [], "flow": []}
        videos, failed, done = {}, {}, 0
        for group in range(len(plan["groups"])):
            record_path = split_dir / "records" / f"{group:05d}.json"
            if not record_path.exists():
                continue
            record = read_json(record_path)
            done += 1
            for modality, pieces in record["shards"].items():
                for piece in pieces:
                    shards[modality].append({**piece, "tar": f"{split_dir.name}/{modality}/{piece['tar']}",
                                             "idx": f"{split_dir.name}/{modality}/{piece['idx']}"})
            videos.update(record["videos"])
            failed.update(record["failed"])
        splits[split_dir.name] = {
            "complete": done == len(plan["groups"]),
            "groups_done": done,
            "groups_total": len(plan["groups"]),
            "params": plan["params"],
            "samples": sum(v["samples"] for v in videos.values()),
            "videos": len(videos),
            "shards": shards,
            "video_info": videos,
            "failed": failed,
        }
    return {"format_version": FORMAT_VERSION, "classes": classes or [], "splits": splits}


def write_manifest(data: Path) -> dict:
    manifest = build_manifest(data)
    atomic_write_json(Path(data) / "manifest.json", manifest)
    if manifest["classes"]:
        (Path(data) / "classes.txt").write_text("\n".join(manifest["classes"]) + "\n", encoding="utf-8")
    return manifest


def load_manifest(data: str | Path) -> dict:
    """Read DATA/manifest.json with errors that say what to do."""
    path = Path(data) / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: pack the data first (python -m pack ...), "
                                f"or join packed parts with python -m pack.merge {data}")
    manifest = read_json(path)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format version {manifest.get('format_version')}, "
                         f"this code reads {FORMAT_VERSION}; re-pack the data")
    return manifest
