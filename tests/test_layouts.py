"""pack on every layout people download or already have: UCF101, HMDB51, list files, class folders; bad annotations; parts."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import DATA, ROOT, run_pack
from pack.manifest import load_manifest
from tests.test_pack import decoded_frames

FAST = ["--stride", "8", "--short-side", "48", "--flow", "dis", "--workers", "2", "--shard-videos", "2"]
CLIPS = {"g1": DATA / "g1.avi", "car": DATA / "carphone_pristine.mp4"}  # 16 and 120 frames


def place(path, clip: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(CLIPS[clip], path)


def samples_of(clip: str, stride: int = 8) -> int:
    return -(-decoded_frames(CLIPS[clip]) // stride)


def ucf101(root):
    """UCF101 as downloaded: UCF-101/<Class>/v_<Class>_gXX_cYY.avi and ucfTrainTestlist/ with CRLF line ends.

    HandstandPushups' folder holds v_HandStandPushups_* files (as in the real data): the class is the folder's.
    """
    videos, lists = root / "UCF-101", root / "ucfTrainTestlist"
    lists.mkdir(parents=True)
    train = [("ApplyEyeMakeup", "v_ApplyEyeMakeup_g08_c01", "g1"), ("ApplyEyeMakeup", "v_ApplyEyeMakeup_g09_c02", "car"),
             ("HandstandPushups", "v_HandStandPushups_g08_c01", "g1"), ("Biking", "v_Biking_g10_c03", "car"),
             ("Biking", "v_Biking_g11_c01", "g1")]
    test = [("ApplyEyeMakeup", "v_ApplyEyeMakeup_g01_c01", "car"), ("HandstandPushups", "v_HandStandPushups_g01_c01", "g1"),
            ("Biking", "v_Biking_g01_c01", "g1")]
    classes = ["ApplyEyeMakeup", "HandstandPushups", "Biking"]  # classInd's order, not sorted
    for cls, name, clip in train + test:
        place(videos / cls / f"{name}.avi", clip)
    (lists / "classInd.txt").write_bytes("".join(f"{i + 1} {c}\r\n" for i, c in enumerate(classes)).encode())
    (lists / "trainlist01.txt").write_bytes("".join(f"{c}/{n}.avi {classes.index(c) + 1}\r\n" for c, n, _ in train).encode())
    (lists / "testlist01.txt").write_bytes("".join(f"{c}/{n}.avi\r\n" for c, n, _ in test).encode())
    return videos, lists, classes, train, test


def test_ucf101_packs_both_splits_in_classind_order(tmp_path):
    videos, lists, classes, train, test = ucf101(tmp_path)
    out = tmp_path / "data"
    assert run_pack("--ucf101", lists, "--fold", "1", "--videos", videos, "--out", out, *FAST) == 0
    manifest = load_manifest(out)
    assert manifest["classes"] == classes and (out / "classes.txt").read_text().splitlines() == classes
    for split, listed in (("train", train), ("val", test)):
        info = manifest["splits"][split]
        assert info["complete"] and not info["failed"]
        assert {vid: v["label"] for vid, v in info["video_info"].items()} == {f"{c}/{n}": c for c, n, _ in listed}
        assert all(info["video_info"][f"{c}/{n}"]["samples"] == samples_of(clip) for c, n, clip in listed)
        assert info["samples"] == sum(samples_of(clip) for *_, clip in listed)
        assert info["source"]["layout"] == "ucf101" and info["source"]["fold"] == 1
    assert set(manifest["splits"]["train"]["source"]["files"]) == {"classInd.txt", "trainlist01.txt"}
    assert set(manifest["splits"]["val"]["source"]["files"]) == {"classInd.txt", "testlist01.txt"}
    handstand = manifest["splits"]["val"]["video_info"]["HandstandPushups/v_HandStandPushups_g01_c01"]
    assert handstand["cls"] == 1  # from the folder and classInd, not the file name's "HandStand"
    from pack.verify import main as verify

    assert verify([str(out), "--workers", "1"]) == 0


def hmdb51(root):
    """HMDB51 as unpacked: hmdb51/<class>/<video>.avi, and one split file a class, lines '<video>.avi <mark> '."""
    videos, splits = root / "hmdb51", root / "testTrainMulti_7030_splits"
    splits.mkdir(parents=True)
    marks = {"clap": [("#20_Rhythm_clap_u_nm_np1_fr_goo_0", "1", "g1"),
                      ("Bruno_Mars_(Just_the_way_you_are)_&_more!_clap_f_cm_np1_ba_med_1", "2", "car"),
                      ("unused_clap_u_nm_np1_fr_med_2", "0", "g1")],
             "brush_hair": [("April_09_brush_hair_u_nm_np1_ba_goo_0", "1", "car"),
                            ("Brushing_Hair_with_Beth_brush_hair_h_nm_np1_le_goo_0", "1", "g1"),
                            ("Aussie_Brunette_Brushing_Hair_II_brush_hair_u_nm_np4_ri_med_3", "2", "g1")]}
    for cls, rows in marks.items():
        for name, _, clip in rows:
            place(videos / cls / f"{name}.avi", clip)
        (splits / f"{cls}_test_split1.txt").write_text("".join(f"{n}.avi {m} \n" for n, m, _ in rows))
    return videos, splits, marks


def test_hmdb51_packs_both_splits_with_safe_keys_and_real_ids(tmp_path):
    videos, splits, marks = hmdb51(tmp_path)
    out = tmp_path / "data"
    assert run_pack("--hmdb51", splits, "--fold", "1", "--videos", videos, "--out", out, *FAST) == 0
    manifest = load_manifest(out)
    assert manifest["classes"] == ["brush_hair", "clap"]
    for split, mark in (("train", "1"), ("val", "2")):
        info = manifest["splits"][split]
        expected = {f"{c}/{n}": clip for c, rows in marks.items() for n, m, clip in rows if m == mark}
        assert set(info["video_info"]) == set(expected) and not info["failed"]  # mark 0: not packed
        assert all(info["video_info"][vid]["samples"] == samples_of(clip) for vid, clip in expected.items())
    bruno = manifest["splits"]["val"]["video_info"]["clap/Bruno_Mars_(Just_the_way_you_are)_&_more!_clap_f_cm_np1_ba_med_1"]
    assert bruno["key"] != "clap/Bruno_Mars_(Just_the_way_you_are)_&_more!_clap_f_cm_np1_ba_med_1"
    assert bruno["key"].startswith("clap/Bruno_Mars_Just_the_way_you_are_more_clap")
    from pack.verify import main as verify

    assert verify([str(out), "--workers", "1"]) == 0


def test_a_list_file_and_class_folders(tmp_path):
    clips = tmp_path / "clips"
    place(clips / "my walks" / "walk 0001.mp4", "car")
    place(clips / "runs" / "0001.avi", "g1")
    place(clips / "walk" / "0001.mp4", "g1")
    listing = tmp_path / "train.txt"
    listing.write_text("my walks/walk 0001.mp4 walking\nruns/0001.avi running\nwalk/0001.mp4 walking\n")
    out = tmp_path / "data"
    assert run_pack("--list", listing, "--split", "train", "--videos", clips, "--out", out, *FAST) == 0
    info = load_manifest(out)["splits"]["train"]
    assert load_manifest(out)["classes"] == ["running", "walking"]
    assert {v: i["label"] for v, i in info["video_info"].items()} == {
        "my walks/walk 0001": "walking", "runs/0001": "running", "walk/0001": "walking"}  # walk/0001, runs/0001 apart
    # integer labels index --classes (0-based, as MMAction2's lists); the val split keeps train's order
    (tmp_path / "classes.txt").write_text("walking\nrunning\n")
    indexed = tmp_path / "val.txt"
    indexed.write_text("runs/0001.avi 1\nwalk/0001.mp4 0\n")
    assert run_pack("--list", indexed, "--split", "val", "--classes", tmp_path / "classes.txt", "--videos", clips,
                    "--out", tmp_path / "other", *FAST) == 0
    labels = {v: i["label"] for v, i in load_manifest(tmp_path / "other")["splits"]["val"]["video_info"].items()}
    assert labels == {"runs/0001": "running", "walk/0001": "walking"}
    # class folders: every video under DIR/<class>/, classes sorted
    assert run_pack("--folders", clips, "--split", "val", "--out", tmp_path / "folders", *FAST) == 0
    manifest = load_manifest(tmp_path / "folders")
    assert manifest["classes"] == ["my walks", "runs", "walk"]
    assert set(manifest["splits"]["val"]["video_info"]) == {"my walks/walk 0001", "runs/0001", "walk/0001"}


@pytest.mark.parametrize("case", ["ucf no label", "ucf index out of range", "ucf fold missing", "ucf in both splits",
                                  "list no label", "list index out of range", "list class not in --classes",
                                  "list index without --classes", "hmdb bad mark", "hmdb fold missing"])
def test_bad_annotations_get_one_error_naming_file_and_line(tmp_path, case):
    videos, lists, classes, train, test = ucf101(tmp_path / "u")
    h_videos, h_splits, _ = hmdb51(tmp_path / "h")
    (tmp_path / "classes.txt").write_text("a\nb\n")
    listing = tmp_path / "list.txt"
    trainlist = lists / "trainlist01.txt"
    if case == "ucf no label":
        trainlist.write_bytes(trainlist.read_bytes() + b"Biking/v_Biking_g12_c01.avi\r\n")
        args, where, match = ["--ucf101", lists, "--videos", videos], f"{trainlist}:6", "without its class index"
    elif case == "ucf index out of range":
        trainlist.write_bytes(trainlist.read_bytes() + b"Biking/v_Biking_g12_c01.avi 9\r\n")
        args, where, match = ["--ucf101", lists, "--videos", videos], f"{trainlist}:6", "class index 9 out of range"
    elif case == "ucf fold missing":
        args, where, match = ["--ucf101", lists, "--fold", "2", "--videos", videos], str(lists), "no trainlist02.txt"
    elif case == "ucf in both splits":
        trainlist.write_bytes(trainlist.read_bytes() + b"Biking/v_Biking_g01_c01.avi 3\r\n")
        args, where, match = ["--ucf101", lists, "--videos", videos], f"{lists / 'testlist01.txt'}:3", \
            "is in split val, and in train at .*trainlist01.txt:6"
    elif case == "list no label":
        listing.write_text("a/1.mp4 a\na/2.mp4\n")
        args, where, match = ["--list", listing, "--split", "train", "--videos", videos], f"{listing}:2", "without a label"
    elif case == "list index out of range":
        listing.write_text("a/1.mp4 2\n")
        args = ["--list", listing, "--split", "train", "--classes", tmp_path / "classes.txt", "--videos", videos]
        where, match = f"{listing}:1", "class index 2 out of range"
    elif case == "list class not in --classes":
        listing.write_text("a/1.mp4 a\na/2.mp4 c\n")
        args = ["--list", listing, "--split", "train", "--classes", tmp_path / "classes.txt", "--videos", videos]
        where, match = f"{listing}:2", "class 'c' is not in --classes"
    elif case == "list index without --classes":
        listing.write_text("a/1.mp4 0\n")
        args, where, match = ["--list", listing, "--split", "train", "--videos", videos], f"{listing}:1", "give the class list"
    elif case == "hmdb bad mark":
        bad = h_splits / "clap_test_split1.txt"
        bad.write_text(bad.read_text() + "another_clap_video.avi 3 \n")
        args, where, match = ["--hmdb51", h_splits, "--videos", h_videos], f"{bad}:4", "expected '<video>.avi <0, 1 or 2>'"
    else:
        args, where, match = ["--hmdb51", h_splits, "--fold", "3", "--videos", h_videos], str(h_splits), "no \\*_test_split3"
    with pytest.raises(SystemExit) as e:
        run_pack(*args, "--out", tmp_path / "data", *FAST)
    message = str(e.value.code)
    assert message.startswith(f"error: {where}") and message.count("\n") == 0, message
    assert __import__("re").search(match, message), message
    assert not (tmp_path / "data" / "manifest.json").exists()


def test_missing_and_broken_videos_of_a_layout_are_reported_and_resume_works(tmp_path):
    videos, lists, classes, train, test = ucf101(tmp_path)
    (videos / "Biking" / "v_Biking_g10_c03.avi").unlink()
    (videos / "Biking" / "v_Biking_g11_c01.avi").write_bytes(b"not a video")
    out = tmp_path / "data"
    args = ["--ucf101", lists, "--videos", videos, "--out", out, *FAST]
    assert run_pack(*args) == 0 and run_pack(*args, "--strict") == 1
    failed = load_manifest(out)["splits"]["train"]["failed"]
    assert failed["Biking/v_Biking_g10_c03"].startswith("missing") and failed["Biking/v_Biking_g11_c01"].startswith("undecodable")
    records = sorted((out / "train" / "records").glob("*.json"))
    times = [r.stat().st_mtime_ns for r in records]
    assert run_pack(*args) == 0 and [r.stat().st_mtime_ns for r in records] == times  # nothing redone


def slurm_pack(args: list, task: int, count: int, first: int = 1):
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_COUNT": str(count),
           "SLURM_ARRAY_TASK_MIN": str(first)}
    return subprocess.run([sys.executable, "-m", "pack", *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_a_slurm_job_array_packs_in_parts_and_merge_joins_or_refuses_them(tmp_path):
    """--array=1-2: each task packs its part; merge lists a missing part, then joins them; a part of another plan is refused."""
    videos, lists, *_ = ucf101(tmp_path)
    out = tmp_path / "data"
    args = ["--ucf101", lists, "--videos", videos, "--out", out, *FAST[:-2], "--shard-videos", "1"]
    done = slurm_pack(args, task=2, count=2)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[0] == "packing part 1 of 2 (0..1), from the Slurm job array (task 2 of 1..2)"
    from pack.merge import main as merge

    assert merge([str(out)]) == 1
    assert slurm_pack(args, task=1, count=2).returncode == 0
    assert merge([str(out)]) == 0
    whole = tmp_path / "whole"
    assert run_pack("--ucf101", lists, "--videos", videos, "--out", whole, *FAST[:-2], "--shard-videos", "1") == 0
    assert load_manifest(out)["splits"]["train"]["video_info"] == load_manifest(whole)["splits"]["train"]["video_info"]
    # a part packed elsewhere with another stride, its record copied in: refused
    other = tmp_path / "other"
    assert run_pack("--ucf101", lists, "--videos", videos, "--out", other, "--stride", "4", "--short-side", "48",
                    "--flow", "dis", "--workers", "2", "--shard-videos", "1", "--part", "1", "--num-parts", "2") == 0
    shutil.copy(other / "train" / "records" / "00001.json", out / "train" / "records" / "00001.json")
    with pytest.raises(SystemExit, match=r"group 1 \(part 1 of 2\) were packed with other parameters or annotation files"):
        merge([str(out)])


def test_merge_lists_the_parts_not_finished(tmp_path, capsys):
    videos, lists, *_ = ucf101(tmp_path)
    out = tmp_path / "data"
    assert run_pack("--ucf101", lists, "--videos", videos, "--out", out, *FAST[:-2], "--shard-videos", "1",
                    "--part", "2", "--num-parts", "3") == 0
    from pack.merge import main as merge

    assert merge([str(out)]) == 1
    printed = capsys.readouterr().out
    assert "train: 1 videos" in printed and "part(s) 0, 1 of 3 (0..2) have not finished: groups 0, 1, 3, 4 have no record" in printed


def test_train_score_fuse_and_predict_work_unchanged_on_a_layout(tmp_path):
    """HMDB51's names (brackets, &, !) go under safe keys; results are keyed by the real video ids."""
    import fuse
    import predict
    import score
    import train

    videos, splits, marks = hmdb51(tmp_path)
    data = tmp_path / "data"
    assert run_pack("--hmdb51", splits, "--videos", videos, "--out", data, *FAST) == 0
    expected = {f"{c}/{n}" for c, rows in marks.items() for n, m, _ in rows if m == "2"}
    scores = {}
    for modality in ("rgb", "flow"):
        save = tmp_path / modality
        train.main(train.get_args_parser().parse_args(
            ["--data", str(data), "--modality", modality, "--arch", "resnet18", "--input-size", "32", "--batch-size", "4",
             "--workers", "1", "--max-iterations", "2", "--val-every", "2", "--val-batches", "2", "--save-dir", str(save)]))
        for backend in ("cpu", "dali"):
            out = tmp_path / f"{modality}-{backend}.npz"
            score.main(score.get_args_parser().parse_args(["--checkpoint", str(save / "latest.pt"), "--data", str(data),
                                                           "--out", str(out), "--backend", backend, "--workers", "1"]))
            assert set(json.loads(out.with_suffix(".json").read_text())["results"]) == expected
            scores[modality, backend] = __import__("numpy").load(out)
        assert scores[modality, "cpu"]["keys"].tolist() == scores[modality, "dali"]["keys"].tolist()
        assert set(scores[modality, "cpu"]["videos"].tolist()) == expected
    report = fuse.main(fuse.get_args_parser().parse_args([str(tmp_path / "rgb-cpu.npz"), str(tmp_path / "flow-cpu.npz"),
                                                          "--out", str(tmp_path / "fused")]))
    assert report["rows"]["RGB+FLOW"]["videos"] == len(expected) and report["classes"] == ["brush_hair", "clap"]
    bruno = videos / "clap" / "Bruno_Mars_(Just_the_way_you_are)_&_more!_clap_f_cm_np1_ba_med_1.avi"
    outcome = predict.main(predict.get_args_parser().parse_args([str(bruno), "--rgb", str(tmp_path / "rgb" / "latest.pt"),
                                                                 "--flow", str(tmp_path / "flow" / "latest.pt")]))
    assert list(outcome["results"]) == [bruno.stem] and outcome["classes"] == ["brush_hair", "clap"]


@pytest.mark.parametrize("layout", ["folders", "list", "ucf101", "hmdb51", "csv"])
def test_two_files_that_would_be_one_id_stop_the_pack_naming_both(tmp_path, layout):
    """walk/0001.avi beside walk/0001.mp4 (a Kinetics {youtube_id}.mp4 beside its .mkv): which one is meant cannot be told."""
    clips = tmp_path / "clips"
    place(clips / "walk" / "0001.avi", "g1")
    place(clips / "walk" / "0001.mp4", "g1")
    place(clips / "run" / "0002.mp4", "g1")
    lists = tmp_path / "lists"
    lists.mkdir()
    if layout == "folders":
        args, names = ["--folders", clips, "--split", "train"], ["walk/0001.avi", "walk/0001.mp4"]
    elif layout == "list":
        (lists / "train.txt").write_text("walk/0001.avi walk\nwalk/0001.mp4 walk\nrun/0002.mp4 run\n")
        args, names = ["--list", lists / "train.txt", "--split", "train", "--videos", clips], ["walk/0001.avi", "walk/0001.mp4"]
    elif layout == "ucf101":
        (lists / "classInd.txt").write_text("1 walk\n2 run\n")
        (lists / "trainlist01.txt").write_text("walk/0001.avi 1\nwalk/0001.mp4 1\n")
        (lists / "testlist01.txt").write_text("run/0002.mp4\n")
        args, names = ["--ucf101", lists, "--videos", clips], ["walk/0001.avi", "walk/0001.mp4"]
    elif layout == "hmdb51":
        (lists / "walk_test_split1.txt").write_text("0001.avi 1\n0001.mp4 1\n")
        (lists / "run_test_split1.txt").write_text("0002.mp4 2\n")
        args, names = ["--hmdb51", lists, "--videos", clips], ["walk/0001.avi", "walk/0001.mp4"]
    else:
        place(clips / "abc.mp4", "g1")
        place(clips / "more" / "abc.mkv", "car")
        (lists / "k.csv").write_text("label,youtube_id,time_start,time_end,split\nwalk,abc,0,10,train\n"
                                     "run,0002,0,10,train\n")
        args, names = ["--csv", lists / "k.csv", "--videos", clips], ["abc.mp4", "more/abc.mkv"]
    with pytest.raises(SystemExit) as e:
        run_pack(*args, "--out", tmp_path / "data", *FAST)
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message and all(n in message for n in names), message
    assert "rename" in message and not (tmp_path / "data" / "manifest.json").exists()


def test_a_split_whose_videos_are_all_missing_or_unlisted_is_an_error(tmp_path):
    clips = tmp_path / "clips"
    place(clips / "walk" / "0001.mp4", "g1")
    listing = tmp_path / "train.txt"
    listing.write_text("walk/0002.mp4 walk\nrun/0003.mp4 run\n")
    with pytest.raises(SystemExit, match=r"^error: split train: none of its 2 videos is under .*clips .*check --videos"):
        run_pack("--list", listing, "--split", "train", "--videos", clips, "--out", tmp_path / "data", *FAST)
    listing.write_text("\n")
    with pytest.raises(SystemExit, match=r"^error: .*train.txt: split train lists no videos"):
        run_pack("--list", listing, "--split", "train", "--videos", clips, "--out", tmp_path / "data", *FAST)
    assert not (tmp_path / "data" / "manifest.json").exists()


def test_list_paths_are_normalised_and_a_file_of_other_case_is_named(tmp_path):
    clips = tmp_path / "clips"
    place(clips / "walk" / "0001.mp4", "g1")
    place(clips / "run" / "0002.avi", "g1")
    place(clips / "run" / "Jump.avi", "g1")
    listing = tmp_path / "train.txt"
    listing.write_bytes(b".\\walk\\0001.mp4 walk\r\n./run/0002.avi run\r\nrun/jump.avi run\r\n")
    out = tmp_path / "data"
    assert run_pack("--list", listing, "--split", "train", "--videos", clips, "--out", out, *FAST) == 0
    info = load_manifest(out)["splits"]["train"]
    assert set(info["video_info"]) == {"walk/0001", "run/0002"}
    assert info["failed"] == {"run/jump": "missing: no video file with this name under --videos (did you mean "
                                          "run/Jump.avi? its letter case differs)"}


@pytest.mark.parametrize("env, match", [
    ({"SLURM_ARRAY_TASK_ID": "one", "SLURM_ARRAY_TASK_COUNT": "2"}, "SLURM_ARRAY_TASK_ID='one' is not a number"),
    ({"SLURM_ARRAY_TASK_ID": "1"}, "SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not"),
    ({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_MIN": ""}, "SLURM_ARRAY_TASK_MIN=''"),
    ({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2", "--num-parts": "2"}, "--num-parts 2 without --part"),
])
def test_odd_slurm_variables_and_flags_are_refused_before_any_work(tmp_path, monkeypatch, env, match):
    videos, lists, *_ = ucf101(tmp_path)
    flags = [f"--num-parts={env.pop('--num-parts')}"] if "--num-parts" in env else []
    for name in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit, match=f"^error: {match}"):
        run_pack("--ucf101", lists, "--videos", videos, "--out", tmp_path / "data", *FAST, *flags)
    assert not (tmp_path / "data" / "train").exists()


def test_class_folders_hidden_files_a_val_split_lacking_a_class_and_an_empty_class(tmp_path, capsys):
    """._* (macOS metadata) and hidden folders are no videos; val without one of train's classes packs; an empty class is said."""
    train, val = tmp_path / "train", tmp_path / "val"
    for cls in ("run", "walk"):
        place(train / cls / "a.mp4", "g1")
    (train / "walk" / "._a.mp4").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    place(train / "walk" / ".thumbs" / "a.mp4", "g1")
    (train / "jump").mkdir()
    place(val / "walk" / "b.mp4", "g1")
    out = tmp_path / "data"
    assert run_pack("--folders", train, "--split", "train", "--out", out, *FAST) == 0
    assert "warning: split train has no videos of 1 of its 3 classes: jump" in capsys.readouterr().out
    info = load_manifest(out)["splits"]["train"]
    assert set(info["video_info"]) == {"run/a", "walk/a"} and not info["failed"]
    assert run_pack("--folders", val, "--split", "val", "--classes", out / "classes.txt", "--out", out, *FAST) == 0
    manifest = load_manifest(out)
    assert manifest["classes"] == ["jump", "run", "walk"] and manifest["splits"]["val"]["video_info"]["walk/b"]["cls"] == 2


def test_a_class_named_twice_is_an_error_naming_the_line(tmp_path):
    videos, lists, *_ = ucf101(tmp_path)
    (lists / "classInd.txt").write_bytes(b"1 ApplyEyeMakeup\r\n2 HandstandPushups\r\n3 Biking\r\n4 Biking\r\n")
    with pytest.raises(SystemExit, match=rf"^error: {lists / 'classInd.txt'}:4: the class 'Biking' is named twice "
                                         rf"\(also at .*classInd.txt:3\)"):
        run_pack("--ucf101", lists, "--videos", videos, "--out", tmp_path / "data", *FAST)
    (tmp_path / "classes.txt").write_text("a\nb\na\n")
    listing = tmp_path / "l.txt"
    listing.write_text("x.mp4 a\n")
    with pytest.raises(SystemExit, match=r"classes.txt:3: the class 'a' is named twice"):
        run_pack("--list", listing, "--split", "train", "--classes", tmp_path / "classes.txt", "--videos", videos,
                 "--out", tmp_path / "data", *FAST)
