"""Packing real footage, flow correctness, broken inputs, kill and resume, reading shards back."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import av
import numpy as np
import pytest
import simplejpeg
import webdataset as wds

from conftest import DATA, ROOT, run_pack
from pack.flow import decode_flow
from pack.manifest import load_manifest
from pack.synth import texture, write_video


def decoded_frames(path: Path) -> int:
    with av.open(str(path)) as c:
        return sum(1 for _ in c.decode(video=0))


def kinetics_csv(path: Path, rows: list[tuple[str, str]], split: str = "train") -> Path:
    lines = ["label,youtube_id,time_start,time_end,split"] + [f'"{label}",{vid},0,10,{split}' for vid, label in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def tar_members(tar: Path) -> dict[str, bytes]:
    with tarfile.open(tar) as t:
        return {m.name: t.extractfile(m).read() for m in t.getmembers()}


def shard_contents(data: Path, split: str = "train") -> dict[str, bytes]:
    manifest = load_manifest(data)
    out = {}
    for modality, pieces in manifest["splits"][split]["shards"].items():
        for piece in pieces:
            out.update({f"{modality}:{k}": v for k, v in tar_members(data / piece["tar"]).items()})
    return out


def test_real_footage_sample_counts(tmp_path):
    """H.264 mp4s and an MPEG-4 AVI under the `{youtube_id}.{ext}` naming; g1.avi (16 frames)
    is shorter than the 20-image flow snippet and is padded with its last flow."""
    csv = kinetics_csv(tmp_path / "k.csv", [("bikes", "riding a bike"), ("carphone_pristine", "talking"), ("g1", "riding a bike")])
    out = tmp_path / "data"
    assert run_pack("--csv", csv, "--videos", DATA, "--out", out, "--stride", "25", "--flow-len", "20",
                    "--short-side", "64", "--flow", "dis", "--workers", "2", "--shard-videos", "2") == 0
    split = load_manifest(out)["splits"]["train"]
    assert split["complete"] and not split["failed"]
    for vid, name in [("bikes", "bikes.mp4"), ("carphone_pristine", "carphone_pristine.mp4"), ("g1", "g1.avi")]:
        info = split["video_info"][f"{vid}_000000_000010"]  # the crawler's name, found as {youtube_id}.{ext}
        assert info["frames"] == decoded_frames(DATA / name)
        assert info["samples"] == -(-info["frames"] // 25)  # frames 0, 25, 50, ...
    assert split["samples"] == sum(v["samples"] for v in split["video_info"].values())
    members = shard_contents(out)
    assert sum(k.endswith(".rgb.jpg") for k in members) == split["samples"]
    # g1 has 16 frames: pairs 0->1 .. 14->15 exist, later ones repeat the last (14->15)
    g1 = [members[f"flow:g1_000000_000010/000000.flow{i}.jpg"] for i in range(20)]
    assert g1[15:] == [g1[14]] * 5 and g1[14] != g1[13]
    image = simplejpeg.decode_jpeg(members["rgb:bikes_000000_000010/000025.rgb.jpg"])
    assert min(image.shape[:2]) == 64


def test_flow_decodes_to_known_translation(tmp_path):
    """A texture translating by (dx, dy) = (2, -1) per frame: the stored flow JPEG says so."""
    rng = np.random.default_rng(0)
    base = (texture(rng, 140, 180, 2.0) * 255).astype(np.uint8)
    frames = [np.repeat(np.roll(base, (-t, 2 * t), axis=(0, 1))[20:116, 20:148, None], 3, axis=2) for t in range(8)]
    (tmp_path / "v").mkdir()
    write_video(tmp_path / "v" / "shift.mp4", frames, 25, "libx264")
    csv = kinetics_csv(tmp_path / "k.csv", [("shift", "x")])
    run_pack("--csv", csv, "--videos", tmp_path / "v", "--out", tmp_path / "d", "--stride", "3", "--short-side", "96",
             "--workers", "1")
    members = shard_contents(tmp_path / "d")
    step = 8.0 / 128  # the quantisation step at the default bound 8
    for t in (0, 3):
        jpeg = members[f"flow:shift_000000_000010/{t:06d}.flow0.jpg"]
        flow = decode_flow(simplejpeg.decode_jpeg(jpeg), 8.0)[16:-16, 16:-16]
        dx, dy = np.median(flow[..., 0]), np.median(flow[..., 1])
        assert abs(dx - 2.0) <= step and abs(dy + 1.0) <= step, (dx, dy)


def test_broken_inputs_are_reported_not_fatal(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    shutil.copy(DATA / "carphone_pristine.mp4", videos / "good.mp4")
    whole = (DATA / "carphone_pristine.mp4").read_bytes()
    (videos / "truncated.mp4").write_bytes(whole[: len(whole) // 3])
    (videos / "empty.mp4").write_bytes(b"")
    (videos / "text.webm").write_text("this is not a video\n" * 50)
    csv = kinetics_csv(tmp_path / "k.csv", [(v, "x") for v in ("good", "truncated", "empty", "text", "missing")])
    args = ("--csv", csv, "--videos", videos, "--out", tmp_path / "d", "--short-side", "64", "--flow", "dis", "--workers", "2",
            "--shard-videos", "2")
    assert run_pack(*args) == 0
    split = load_manifest(tmp_path / "d")["splits"]["train"]
    name = "{}_000000_000010".format
    assert list(split["video_info"]) == [name("good")]
    assert set(split["failed"]) == {name(v) for v in ("truncated", "empty", "text", "missing")}
    assert split["failed"][name("missing")].startswith("missing")
    assert all(split["failed"][name(v)].startswith(("undecodable", "empty")) for v in ("truncated", "empty", "text"))
    assert run_pack(*args, "--strict") == 1


def test_kill_and_resume_gives_the_same_shards(synth, tmp_path):
    args = [sys.executable, "-m", "pack", "--csv", str(synth / "train.csv"), "--videos", str(synth / "videos"),
            "--workers", "1", "--stride", "2", "--short-side", "72", "--shard-videos", "3", "--flow", "farneback"]
    subprocess.run(args + ["--out", str(tmp_path / "ref")], check=True, cwd=ROOT, capture_output=True)

    out = tmp_path / "killed"
    proc = subprocess.Popen(args + ["--out", str(out)], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = out / "train" / "records"
    deadline = time.time() + 60
    while not (records.exists() and len(list(records.glob("*.json"))) >= 2) and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {p: p.stat().st_mtime_ns for p in records.glob("*.json")}
    assert 2 <= len(finished) < 10, "the kill should land mid-job"
    shard_times = {p: p.stat().st_mtime_ns for p in (out / "train").glob("*/*.tar")}

    subprocess.run(args + ["--out", str(out)], check=True, cwd=ROOT, capture_output=True)
    assert {p: p.stat().st_mtime_ns for p in finished} == finished, "a finished group was redone"
    for p, t in shard_times.items():
        if (records / f"{p.name[6:11]}.json") in finished:
            assert p.stat().st_mtime_ns == t
    assert shard_contents(out) == shard_contents(tmp_path / "ref")
    assert not list(out.rglob("*.tmp*")), "temporary files left behind"
    manifest, ref = load_manifest(out), load_manifest(tmp_path / "ref")
    assert manifest["splits"]["train"]["video_info"] == ref["splits"]["train"]["video_info"]


def test_parts_packed_separately_join_into_one_manifest(synth, tmp_path):
    common = ["--csv", synth / "val.csv", "--videos", synth / "videos", "--workers", "1", "--short-side", "48",
              "--shard-videos", "2", "--flow", "dis"]
    run_pack(*common, "--out", tmp_path / "whole")
    run_pack(*common, "--out", tmp_path / "parts", "--part", "0", "--num-parts", "2")
    assert not load_manifest(tmp_path / "parts")["splits"]["val"]["complete"]
    run_pack(*common, "--out", tmp_path / "parts", "--part", "1", "--num-parts", "2")
    from pack.merge import main as merge

    assert merge([str(tmp_path / "parts")]) == 0
    assert shard_contents(tmp_path / "parts", "val") == shard_contents(tmp_path / "whole", "val")
    joined, whole = (load_manifest(tmp_path / d)["splits"]["val"]["shards"] for d in ("parts", "whole"))
    assert joined == whole and all(len(p["sha256"]) == len(p["idx_sha256"]) == 64 for p in joined["rgb"] + joined["flow"])


def test_repacking_with_other_parameters_is_refused(synth, tmp_path):
    common = ["--csv", synth / "val.csv", "--videos", synth / "videos", "--out", tmp_path, "--workers", "1", "--flow", "dis"]
    run_pack(*common, "--short-side", "48")
    with pytest.raises(SystemExit, match="other parameters"):
        run_pack(*common, "--short-side", "64")


def test_manifest_and_shards_read_back_with_webdataset_and_dali(data):
    manifest = load_manifest(data)
    assert manifest["classes"] == sorted(manifest["classes"]) and len(manifest["classes"]) == 6
    split = manifest["splits"]["train"]
    rgb = [str(data / p["tar"]) for p in split["shards"]["rgb"]]
    flow = [str(data / p["tar"]) for p in split["shards"]["flow"]]
    assert len(rgb) >= 4  # several shards
    rgb_samples = list(wds.WebDataset(rgb, shardshuffle=False, empty_check=False))
    flow_samples = list(wds.WebDataset(flow, shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in rgb_samples] == [s["__key__"] for s in flow_samples]  # same keys, same order
    assert len(rgb_samples) == split["samples"]
    assert set(flow_samples[0]) >= {"flow0.jpg", "flow1.jpg", "cls"} and "rgb.jpg" not in flow_samples[0]
    for s in rgb_samples:
        video = s["__key__"].split("/")[0]
        assert int(s["cls"]) == split["video_info"][video]["cls"]
        assert manifest["classes"][int(s["cls"])] == split["video_info"][video]["label"]
    # a shard never holds a single class
    first = [int(s["cls"]) for s in rgb_samples[: split["shards"]["rgb"][0]["samples"]]]
    assert len(set(first)) > 1

    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=8, num_threads=1, device_id=None)
    def read():
        jpeg, cls = fn.readers.webdataset(paths=rgb, index_paths=[p[:-4] + ".idx" for p in rgb], ext=["rgb.jpg", "cls"],
                                          name="Reader")
        return jpeg, cls

    pipe = read()
    pipe.build()
    total = pipe.reader_meta("Reader")["epoch_size"]
    assert total == split["samples"]
    jpegs, cls = pipe.run()
    assert bytes(np.array(jpegs[0])) == rgb_samples[0]["rgb.jpg"]
    assert bytes(np.array(cls[0])) == rgb_samples[0]["cls"]


def test_help_explains_every_flag():
    out = subprocess.run([sys.executable, "-m", "pack", "--help"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for flag in ("--csv", "--videos", "--out", "--split", "--workers", "--stride", "--flow", "--flow-len",
                 "--short-side", "--quality", "--part", "--num-parts", "--strict", "--classes"):
        assert flag in out


def test_ids_the_shard_formats_cannot_carry_pack_under_safe_keys(tmp_path):
    """A custom crawl's `my clip.mp4`: the samples go under a safe key; both loaders read them; results keep the id."""
    videos = tmp_path / "videos"
    videos.mkdir()
    shutil.copy(DATA / "g1.avi", videos / "my clip.avi")
    shutil.copy(DATA / "carphone_pristine.mp4", videos / "caf\u00e9 (take 2).mp4")
    csv = kinetics_csv(tmp_path / "k.csv", [("my clip", "riding"), ("caf\u00e9 (take 2)", "talking")], split="val")
    out = tmp_path / "d"
    assert run_pack("--csv", csv, "--videos", videos, "--out", out, "--stride", "8", "--short-side", "48",
                    "--flow", "dis", "--workers", "1") == 0
    split = load_manifest(out)["splits"]["val"]
    assert not split["failed"] and set(split["video_info"]) == {"my clip_000000_000010", "caf\u00e9 (take 2)_000000_000010"}
    keys = {v["key"] for v in split["video_info"].values()}
    assert all(re.fullmatch(r"[A-Za-z0-9_/-]+", k) for k in keys) and len(keys) == 2
    for piece in split["shards"]["rgb"]:
        for line in (out / piece["idx"]).read_text().splitlines()[1:]:
            assert len(line.split()) == 12  # ext offset size name, three times (rgb.jpg, cls, crc32c): parseable
    import loaders

    seen = {}
    for backend in ("cpu", "dali"):
        loader = loaders.build(out, "val", "rgb", False, 4, crop=40, backend=backend, device="cpu", workers=1)
        seen[backend] = sorted(k for _, _, batch_keys in loader for k in batch_keys)
        assert loader.skipped == 0
    assert seen["cpu"] == seen["dali"] and len(seen["cpu"]) == split["samples"]
    assert {k.rsplit("/", 1)[0] for k in seen["cpu"]} == keys


def test_one_file_for_two_time_ranges_is_reported_for_both(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    shutil.copy(DATA / "g1.avi", videos / "abc.avi")
    csv = tmp_path / "k.csv"
    csv.write_text("label,youtube_id,time_start,time_end,split\nx,abc,0,10,train\ny,abc,20,30,train\n")
    run_pack("--csv", csv, "--videos", videos, "--out", tmp_path / "d", "--short-side", "48", "--flow", "dis",
             "--workers", "1")
    split = load_manifest(tmp_path / "d")["splits"]["train"]
    assert not split["video_info"] and set(split["failed"]) == {"abc_000000_000010", "abc_000020_000030"}
    assert all(reason.startswith("ambiguous: abc.avi is the file of 2 clips") for reason in split["failed"].values())


def test_linked_sub_folders_are_searched(tmp_path):
    elsewhere = tmp_path / "elsewhere" / "batch2"
    elsewhere.mkdir(parents=True)
    shutil.copy(DATA / "g1.avi", elsewhere / "g1.avi")
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "batch2").symlink_to(elsewhere, target_is_directory=True)
    (elsewhere / "loop").symlink_to(videos, target_is_directory=True)  # a cycle: each real folder is walked once
    csv = kinetics_csv(tmp_path / "k.csv", [("g1", "riding")])
    run_pack("--csv", csv, "--videos", videos, "--out", tmp_path / "d", "--short-side", "48", "--flow", "dis",
             "--workers", "1")
    split = load_manifest(tmp_path / "d")["splits"]["train"]
    assert list(split["video_info"]) == ["g1_000000_000010"] and not split["failed"]


def test_two_packs_into_one_folder_the_second_is_refused(synth, tmp_path):
    from pack.files import Lock

    args = ["--csv", synth / "val.csv", "--videos", synth / "videos", "--out", tmp_path, "--workers", "1", "--flow", "dis",
            "--short-side", "48"]
    with Lock(tmp_path / "val" / ".pack-part0-of-1.lock").acquire("a pack"):  # as if another pack were at work
        with pytest.raises(SystemExit, match=r"val \(part 0 of 1\) is in use by pid \d+ on"):
            run_pack(*args)
    assert run_pack(*args) == 0


def test_verify_finds_every_problem_and_passes_whole_data(data, tmp_path, capsys):
    from pack.verify import main as verify
    from tests.test_loaders import rewrite_member

    assert verify([str(data), "--workers", "2"]) == 0
    assert "all well" in capsys.readouterr().out
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    split = load_manifest(copy)["splits"]["val"]
    rgb = [copy / p["tar"] for p in split["shards"]["rgb"]]
    bad_label = rewrite_member(rgb[0], ".cls", b"x").rsplit(".", 1)[0]
    jpeg = tar_members(rgb[1])
    target = sorted(k for k in jpeg if k.endswith(".rgb.jpg"))[2]
    damaged = jpeg[target][: len(jpeg[target]) // 2] + bytes(len(jpeg[target]) - len(jpeg[target]) // 2)
    rewrite_member(rgb[1], target[-20:], damaged)  # the second half zeroed, the header intact: DALI decodes it
    rgb[2].write_bytes(rgb[2].read_bytes()[: rgb[2].stat().st_size // 2])
    assert verify([str(copy), "--split", "val", "--workers", "2"]) == 1
    out = capsys.readouterr().out
    assert f"val/rgb/{rgb[0].name}: {bad_label}: bad label b'x'" in out
    assert f"val/rgb/{rgb[1].name}: {target.rsplit('.', 2)[0]}: rgb.jpg does not decode" in out
    assert re.search(rf"val/rgb/{rgb[2].name}: \S+: this sample and the \d+ after it are not in the tar", out)
    assert re.search(rf"val/rgb/{rgb[2].name}: truncated", out)
    for shard in rgb[:3]:  # the hashes find each first, then the checks as before say what is wrong
        assert f"val/rgb/{shard.name}: its bytes changed since it was packed" in out
    assert out.splitlines()[-1].startswith(f"{3 + 4} problem(s) in {copy}")  # one line each, nothing else


def flip_a_bit_that_still_decodes(tar: Path) -> str:
    """Flip one bit in the middle of a JPEG's entropy-coded data, where it still decodes (strictly): its member's name."""
    with tarfile.open(tar) as t:
        member = next(m for m in t.getmembers() if m.name.endswith(".jpg"))
    data = bytearray(tar.read_bytes())
    start, size = member.offset_data, member.size
    for position in range(start + size // 2, start + size - 2):
        for bit in range(8):
            jpeg = bytearray(data[start:start + size])
            jpeg[position - start] ^= 1 << bit
            try:
                simplejpeg.decode_jpeg(bytes(jpeg), strict=True)
            except ValueError:
                continue
            data[position] ^= 1 << bit
            tar.write_bytes(bytes(data))
            return member.name
    raise AssertionError("no bit flip that still decodes")


def test_verify_checks_every_byte_against_the_packed_hashes_first(data, tmp_path, capsys):
    """One bit of a JPEG's data flipped (it still decodes): verify names the shard; a manifest without hashes still verifies."""
    import json

    from pack.files import file_sha256
    from pack.verify import main as verify

    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    pieces = load_manifest(copy)["splits"]["val"]["shards"]["rgb"]
    assert all(p["sha256"] == file_sha256(copy / p["tar"]) and p["idx_sha256"] == file_sha256(copy / p["idx"])
               for p in pieces)
    shard = copy / pieces[1]["tar"]
    flip_a_bit_that_still_decodes(shard)
    assert verify([str(copy), "--split", "val", "--workers", "2"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"val/rgb/{shard.name}: its bytes changed since it was packed (SHA-256 differs from the " \
                     f"manifest's): copy it again from the source, or re-pack its group"
    assert re.fullmatch(f"val/rgb/{shard.name}: .*/[0-9]{{6}}: damaged: its rgb.jpg is not what was packed "
                        r"\(CRC-32C mismatch\)", out[1])  # and the sample's checksums name the sample
    assert out[-1].startswith(f"2 problem(s) in {copy}")  # the rest of the checks pass
    # a manifest of an earlier version (no hashes, no checksums): verified as before, and it says the hashes are absent
    shutil.copyfile(data / pieces[1]["tar"], shard)
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["sha256"]
    for split in manifest["splits"].values():
        for modality_pieces in split["shards"].values():
            for piece in modality_pieces:
                del piece["sha256"], piece["idx_sha256"], piece["checksums"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert verify([str(copy), "--split", "val", "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "have no recorded SHA-256 (packed before pack recorded it)" in out and "all well" in out
    assert "every byte as packed" not in out
    # a shard listed twice (a hand-joined manifest): its sample keys are in the split twice
    manifest["splits"]["val"]["shards"]["rgb"].append(manifest["splits"]["val"]["shards"]["rgb"][0])
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert verify([str(copy), "--split", "val", "--workers", "2"]) == 1
    assert re.search(r"val/rgb: \d+ sample key\(s\) in the split more than once", capsys.readouterr().out)


def session_processes(session: int) -> list[str]:
    """The live (not zombie) processes of a session: `pid state command`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session and fields[0] != "Z":
            found.append(f"{stat.parent.name} {fields[0]} {(stat.parent / 'cmdline').read_bytes()[:80]!r}")
    return found


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_sigterm_to_the_main_process_stops_its_workers_and_a_rerun_finishes_alike(tmp_path, sig):
    """kill PID (SIGTERM: the workers stopped, a message) or kill -9 PID (the kernel ends the workers with it)."""
    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(4):
        shutil.copy(DATA / "carphone_pristine.mp4", videos / f"car{i}.mp4")
    csv = kinetics_csv(tmp_path / "k.csv", [(f"car{i}", "talking") for i in range(4)])
    args = [sys.executable, "-m", "pack", "--csv", str(csv), "--videos", str(videos), "--workers", "2", "--stride", "1",
            "--short-side", "128", "--shard-videos", "1", "--flow", "farneback"]
    out = tmp_path / "killed"
    proc = subprocess.Popen(args + ["--out", str(out)], cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while len(session_processes(proc.pid)) < 3 and time.time() < deadline:  # the main process and its 2 workers
        time.sleep(0.05)
    time.sleep(1.0)  # mid-video
    proc.send_signal(sig)  # the main process only
    assert len(list((out / "train" / "records").glob("*.json"))) < 4, "the kill should land mid-job"
    stderr = proc.communicate(timeout=60)[1]  # the workers hold stderr open while they live
    assert proc.returncode != 0 and "Traceback" not in stderr
    assert sig == signal.SIGKILL or "error: stopped by SIGTERM" in stderr
    deadline = time.time() + 10
    while session_processes(proc.pid) and time.time() < deadline:
        time.sleep(0.1)
    assert not session_processes(proc.pid), "a worker outlived the main process"
    subprocess.run(args + ["--out", str(out)], check=True, cwd=ROOT, capture_output=True)
    subprocess.run(args + ["--out", str(tmp_path / "ref")], check=True, cwd=ROOT, capture_output=True)
    assert load_manifest(out)["splits"]["train"]["shards"] == load_manifest(tmp_path / "ref")["splits"]["train"]["shards"]
    assert not list(out.rglob(".*.tmp*")), "temporary files left behind"


def test_two_splits_packed_at_once_into_a_new_folder_take_one_class_list(synth, tmp_path):
    """train and val started together; val lacks a class: the one class list is the first plan's, the manifest whole."""
    from pack.verify import main as verify

    rows = (synth / "val.csv").read_text().splitlines()
    val = tmp_path / "val.csv"
    val.write_text("\n".join(r for r in rows if not r.startswith('"red moving up"')) + "\n")
    out = tmp_path / "data"
    common = ["--videos", str(synth / "videos"), "--out", str(out), "--workers", "1", "--stride", "4", "--short-side",
              "48", "--flow", "dis", "--shard-videos", "4"]
    runs = {split: subprocess.Popen([sys.executable, "-m", "pack", "--csv", str(csv), *common], cwd=ROOT,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for split, csv in (("train", synth / "train.csv"), ("val", val))}
    results = {split: (p.wait(timeout=300), p.stdout.read() + p.stderr.read()) for split, p in runs.items()}
    for split, (code, output) in results.items():
        assert "Traceback" not in output, output[-3000:]
        errors = [line for line in output.splitlines() if line.startswith("error: ")]
        assert code == 0 or (split == "train" and errors and "not in the class list" in errors[0]), output[-3000:]
    manifest = load_manifest(out)
    assert all(manifest["splits"][s]["complete"] for s, (code, _) in results.items() if code == 0)
    assert verify([str(out), "--workers", "1"]) == 0
    if results["train"][0] == 0:  # train's plan came first: val took its 6 classes
        assert len(manifest["classes"]) == 6 and set(manifest["splits"]) == {"train", "val"}


@pytest.mark.parametrize("flag, value", [("--stride", "0"), ("--flow-len", "0"), ("--shard-videos", "0"),
                                         ("--quality", "101"), ("--flow-bound", "nan"), ("--num-parts", "0")])
def test_flags_out_of_range_are_refused_before_any_work(tmp_path, flag, value):
    csv = kinetics_csv(tmp_path / "k.csv", [("g1", "x")])
    done = subprocess.run([sys.executable, "-m", "pack", "--csv", str(csv), "--videos", str(DATA), "--out",
                           str(tmp_path / "d"), flag, value], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and f"error: argument {flag}: {value} is" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and not (tmp_path / "d").exists()


def test_a_broken_manifest_plan_or_record_is_named_in_one_line(data, tmp_path):
    from pack.merge import main as merge
    from pack.verify import main as verify

    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    whole = (copy / "manifest.json").read_text()
    for text, match in ((whole[:100], "not valid JSON"), ('{"format_version": 1}', r"not the file pack writes \(no classes, splits\)")):
        (copy / "manifest.json").write_text(text)
        with pytest.raises(SystemExit, match=f"^error: {copy / 'manifest.json'}: {match}"):
            verify([str(copy)])
    (copy / "val" / "records" / "00001.json").write_text("{}")
    with pytest.raises(SystemExit, match=rf"^error: {copy / 'val' / 'records' / '00001.json'}: not the file pack writes"):
        merge([str(copy)])
    with pytest.raises(SystemExit, match="no such folder"):
        merge([str(tmp_path / "nothing")])
    assert not (tmp_path / "nothing").exists()


def test_videos_with_a_display_rotation_are_packed_upright(tmp_path):
    """Phone clips: the stored picture is turned by the player (90, 180, 270 degrees, or turned and mirrored). The
    packed frame is the one a player shows, and so is its flow: a texture moving right as shown flows +x."""
    rng = np.random.default_rng(0)
    base = (texture(rng, 140, 180, 2.0) * 255).astype(np.uint8)
    shown = [np.repeat(np.roll(base, 2 * t, axis=1)[20:116, 20:84, None], 3, axis=2) for t in range(6)]  # 64 x 96
    shown = [np.ascontiguousarray(f * np.linspace(0.4, 1, 96)[:, None, None]).astype(np.uint8) for f in shown]
    (tmp_path / "v").mkdir()
    turns = {"r90": (90, False), "r180": (180, False), "r270": (270, False), "r90m": (90, True), "m": (0, True)}
    for name, (rotation, mirrored) in turns.items():  # stored so that turning it as the player does shows `shown`
        stored = [np.ascontiguousarray(np.rot90(f[:, ::-1] if mirrored else f, -rotation // 90)) for f in shown]
        write_video(tmp_path / "v" / f"{name}.mp4", stored, 25, "libx264", display=(rotation, mirrored))
    csv = kinetics_csv(tmp_path / "k.csv", [(name, "x") for name in turns])
    assert run_pack("--csv", csv, "--videos", tmp_path / "v", "--out", tmp_path / "d", "--stride", "3",
                    "--short-side", "64", "--workers", "1") == 0
    members, info = shard_contents(tmp_path / "d"), load_manifest(tmp_path / "d")["splits"]["train"]["video_info"]
    for name, (rotation, mirrored) in turns.items():
        vid = f"{name}_000000_000010"
        assert (info[vid]["rotation"], info[vid]["mirrored"]) == (rotation, mirrored)
        frame = simplejpeg.decode_jpeg(members[f"rgb:{vid}/000000.rgb.jpg"])
        assert frame.shape == shown[0].shape, name
        assert np.abs(frame.astype(int) - shown[0]).mean() < 4, name
        flow = decode_flow(simplejpeg.decode_jpeg(members[f"flow:{vid}/000000.flow0.jpg"]), 8.0)[16:-16, 16:-16]
        dx, dy = np.median(flow[..., 0]), np.median(flow[..., 1])
        assert abs(dx - 2.0) <= 0.25 and abs(dy) <= 0.25, (name, dx, dy)


def test_a_file_with_several_video_streams_says_which_was_read(tmp_path, capsys):
    """Two video streams (a clip and its small preview): the first is packed, and the manifest and the summary say
    which it was and what the other is."""
    (tmp_path / "v").mkdir()
    with av.open(str(tmp_path / "v" / "two.mp4"), "w") as container:
        streams = [container.add_stream("libx264", rate=25) for _ in range(2)]
        for stream, (w, h) in zip(streams, [(96, 64), (48, 32)]):
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for t in range(4):
            for stream in streams:
                image = np.full((stream.height, stream.width, 3), 40 * t, np.uint8)
                container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        for stream in streams:
            container.mux(stream.encode())
    csv = kinetics_csv(tmp_path / "k.csv", [("two", "x")])
    assert run_pack("--csv", csv, "--videos", tmp_path / "v", "--out", tmp_path / "d", "--short-side", "32",
                    "--workers", "1") == 0
    said = load_manifest(tmp_path / "d")["splits"]["train"]["video_info"]["two_000000_000010"]["video_stream"]
    assert said == "read video stream #0 h264 96x64 of 2 video streams (not read: #1 h264 48x32)"
    assert said in capsys.readouterr().out
