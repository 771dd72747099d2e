"""Check a packed DATA folder, every byte of it: for data copied to a new machine, or a loader's warning.

    python -m pack.verify DATA [--split val] [--workers 8]

First checks every shard's and index's bytes against the SHA-256 the manifest recorded when
they were packed (a bit flipped in a JPEG that still decodes is found only so). Then reads
every shard the manifest lists and checks that its tar and its index agree (the same
members at the same offsets), that every sample has its components, that every JPEG
decodes (strictly: damaged data behind an intact header is an error here, which DALI cannot
tell), that every `cls` is an integer in range and the label of its video, and that the
counts match the manifest (per shard, per video, per split; rgb and flow hold the same
samples), and that no sample key is in a split twice. One line per problem, naming the shard's file and the sample; the exit status is
0 only when all is well.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import tarfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import simplejpeg
from tqdm import tqdm

from .files import file_sha256
from .manifest import load_manifest
from .shards import CHECKSUMS, checksum_problem, index_entries, key_of, parse_label, read_index, whole_samples
from .workers import die_with_parent


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pack.verify", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", type=Path, help="the packed DATA folder")
    p.add_argument("--split", action="append", help="check only this split (repeat for several; default: all)")
    p.add_argument("--workers", type=int, default=mp.cpu_count(), help="processes checking shards in parallel")
    return p


def tar_members(path: Path) -> tuple[dict[str, tuple[int, int]], str | None]:
    """{member name: (data offset, size)} of a tar, and what is wrong with it if it cannot be read to its end."""
    members = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                members[m.name] = (m.offset_data, m.size)
                if m.offset_data + m.size > path.stat().st_size:
                    return members, f"truncated: member {m.name} ends past the end of the file"
    except (tarfile.TarError, OSError) as e:
        return members, f"not a readable tar after {len(members)} member(s): {e}"
    return members, None


def changed_bytes(data: Path, piece: dict) -> list[str]:
    """The shard's files whose bytes are not those packed (their SHA-256 against the manifest's); none if unrecorded."""
    problems = []
    for name, recorded in ((piece["tar"], piece.get("sha256")), (piece["idx"], piece.get("idx_sha256"))):
        if recorded is not None and file_sha256(data / name) != recorded:
            problems.append(f"{Path(name).name}: its bytes changed since it was packed (SHA-256 differs from the "
                            f"manifest's): copy it again from the source, or re-pack its group")
    return problems


def check_shard(data: Path, piece: dict, modality: str, exts: list[str], expected_cls: dict[str, int],
                num_classes: int, labelled: bool) -> tuple[list[str], list[str]]:
    """(problems, sample keys) of one shard: its bytes as packed, tar and index agree, components, JPEGs, labels, count."""
    tar_path, idx_path = data / piece["tar"], data / piece["idx"]
    name = tar_path.name
    for path in (tar_path, idx_path):
        if not path.is_file():
            return [f"{path.name}: missing"], []
    problems = changed_bytes(data, piece)
    members, broken = tar_members(tar_path)
    if broken:
        problems.append(f"{name}: {broken}")
    try:
        lines = read_index(idx_path)
    except ValueError as e:
        return problems + [f"{idx_path.name}: {e}"], []
    if broken is None:  # a tar cut at a block boundary reads as a shorter whole one: its index tells
        cut = whole_samples(lines, tar_path.stat().st_size)[2]
        if cut and cut.startswith("truncated"):
            broken = cut
            problems.append(f"{name}: {broken}")
    if len(lines) != piece["samples"]:
        problems.append(f"{idx_path.name}: {len(lines)} samples, the manifest says {piece['samples']}")
    keys, indexed, size = [], set(), tar_path.stat().st_size
    with open(tar_path, "rb") as f:
        for number, line in enumerate(lines, start=2):
            try:
                entries = index_entries(line)
            except ValueError as e:
                problems.append(f"{idx_path.name}: line {number}: {e}")
                continue
            key = key_of(entries[0][3])
            keys.append(key)
            if broken and any(start + length > size or member not in members for _, start, length, member in entries):
                problems.append(f"{name}: {key}: this sample and the {len(lines) - number + 1} after it are not in "
                                f"the tar (it ends at byte {size})")
                keys += [key_of(rest.split()[3]) for rest in lines[number - 1:] if len(rest.split()) > 3]  # indexed, lost
                break
            problems += check_sample(f, name, key, entries, members, indexed, exts, expected_cls, num_classes,
                                     labelled, piece.get("checksums") == CHECKSUMS)
    unindexed = sorted(set(members) - indexed)
    if unindexed and not broken:
        problems.append(f"{name}: {len(unindexed)} member(s) the index does not list, the first {unindexed[0]}")
    return problems, keys


def check_sample(f, shard: str, key: str, entries: list, members: dict, indexed: set, exts: list[str],
                 expected_cls: dict[str, int], num_classes: int, labelled: bool, checksummed: bool) -> list[str]:
    """The problems of one sample: its index entries against the tar, its components, their checksums, JPEGs, label."""
    problems, parts = [], {}
    for ext, start, size, member in entries:
        indexed.add(member)
        if members.get(member) != (start, size):
            problems.append(f"{shard}: {key}: {ext}: the index says bytes {start}+{size}, the tar "
                            + (f"{members[member][0]}+{members[member][1]}" if member in members else "has no such member"))
            continue
        f.seek(start)
        parts[ext] = f.read(size)
    for ext in exts + ["cls"] + [CHECKSUMS] * checksummed:
        if ext not in {e for e, *_ in entries}:
            problems.append(f"{shard}: {key}: no {ext}")
    if CHECKSUMS in parts:
        problem = checksum_problem(parts[CHECKSUMS], [(ext, member, parts[ext]) for ext, _, _, member in entries
                                                      if ext in parts and ext != CHECKSUMS])
        if problem:
            problems.append(f"{shard}: {key}: {problem}")
    for ext in exts:
        if ext in parts:
            try:
                simplejpeg.decode_jpeg(parts[ext], strict=True)
            except ValueError as e:
                problems.append(f"{shard}: {key}: {ext} does not decode: {e}")
    if "cls" in parts:
        try:
            label = parse_label(parts["cls"], num_classes, labelled)
        except ValueError as e:
            problems.append(f"{shard}: {key}: {e}")
        else:
            video = key.rsplit("/", 1)[0]
            if video in expected_cls and expected_cls[video] != label:
                problems.append(f"{shard}: {key}: label {label}, its video's is {expected_cls[video]}")
    return problems


def split_jobs(data: Path, manifest: dict, split: str) -> list[tuple]:
    info = manifest["splits"][split]
    flow_len = info["params"]["flow_len"]
    exts = {"rgb": ["rgb.jpg"], "flow": [f"flow{i}.jpg" for i in range(flow_len)]}
    expected_cls = {v.get("key", vid): v["cls"] for vid, v in info["video_info"].items()}
    labelled = any(v["cls"] >= 0 for v in info["video_info"].values())
    return [(split, modality, (data, piece, modality, exts[modality], expected_cls, len(manifest["classes"]), labelled))
            for modality, pieces in info["shards"].items() for piece in pieces]


def check_counts(manifest: dict, split: str, keys: dict[str, list[str]]) -> list[str]:
    """Per split and per video, what the shards hold against what the manifest says; rgb and flow alike."""
    info, problems = manifest["splits"][split], []
    if not info["complete"]:
        problems.append(f"{split}: packed in part ({info['groups_done']} of {info['groups_total']} shard groups); "
                        f"finish it with the same pack command (or python -m pack.merge after all parts)")
    for modality, found in keys.items():
        if len(found) != info["samples"]:
            problems.append(f"{split}/{modality}: {len(found)} samples in the shards, the manifest says {info['samples']}")
        per_video = Counter(k.rsplit("/", 1)[0] for k in found)
        for vid, v in info["video_info"].items():
            if per_video.get(v.get("key", vid), 0) != v["samples"]:
                problems.append(f"{split}/{modality}: video {vid}: {per_video.get(v.get('key', vid), 0)} samples in "
                                f"the shards, the manifest says {v['samples']}")
        repeated = [k for k, n in Counter(found).items() if n > 1]
        if repeated:
            problems.append(f"{split}/{modality}: {len(repeated)} sample key(s) in the split more than once, the first "
                            f"{repeated[0]}: a shard listed twice, or parts of two packs joined; re-pack the split")
    if len(keys) == 2 and set(keys["rgb"]) != set(keys["flow"]):
        problems.append(f"{split}: rgb and flow shards hold other samples "
                        f"({len(set(keys['rgb']) ^ set(keys['flow']))} keys in one only)")
    return problems


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        manifest = load_manifest(args.data)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    splits = args.split or sorted(manifest["splits"])
    if not splits:
        raise SystemExit(f"error: {args.data}/manifest.json lists no split: nothing to check")
    unknown = sorted(set(splits) - set(manifest["splits"]))
    if unknown:
        raise SystemExit(f"error: {args.data} has no split {', '.join(unknown)}; it has {sorted(manifest['splits'])}")
    jobs = [job for split in splits for job in split_jobs(args.data, manifest, split)]
    unhashed = sum("sha256" not in job[2][1] for job in jobs)
    if unhashed:
        print(f"note: {unhashed} of {len(jobs)} shards have no recorded SHA-256 (packed before pack recorded it): "
              f"their bytes are checked by reading them only; re-pack to record their hashes")
    problems, keys = [], {split: {} for split in splits}
    with ProcessPoolExecutor(max(1, args.workers), mp_context=mp.get_context("fork"), initializer=die_with_parent) as pool, \
            tqdm(total=len(jobs), unit="shard", desc="verifying", file=sys.stderr) as bar:
        futures = [(split, modality, pool.submit(check_shard, *job_args)) for split, modality, job_args in jobs]
        for split, modality, future in futures:
            found, shard_keys = future.result()
            for line in found:
                bar.write(f"{split}/{modality}/{line}")
            problems += found
            keys[split].setdefault(modality, []).extend(shard_keys)
            bar.update()
    for split in splits:
        for line in check_counts(manifest, split, keys[split]):
            print(line)
            problems.append(line)
    samples = sum(len(k) for s in keys.values() for k in s.values())
    if problems:
        print(f"{len(problems)} problem(s) in {args.data} ({len(jobs)} shards, {samples} samples read)")
        return 1
    hashed = "" if unhashed else ", every byte as packed"
    print(f"all well: {args.data}, {', '.join(splits)}: {len(jobs)} shards, {samples} samples, every JPEG decodes{hashed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
