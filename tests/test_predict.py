"""predict.py on raw videos: the numbers pack -> score -> fuse give, a timeline, the JSON, bad input."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import fuse
import metrics
import predict
from conftest import DATA, ROOT
from pack.synth import write_video


def run_predict(*argv) -> dict:
    return predict.main(predict.get_args_parser().parse_args([str(a) for a in argv]))


def checkpoints(trained) -> list:
    return ["--rgb", trained["rgb"] / "latest.pt", "--flow", trained["flow"] / "latest.pt"]


def test_predictions_equal_score_and_fuse_on_the_packed_videos(synth, trained, capsys):
    outcome = run_predict(synth / "videos" / "val", *checkpoints(trained), "--top", "3")
    results = outcome["results"]
    assert len(results) == 12 and not outcome["report"]["failed"]
    streams = {name: fuse.load_scores(trained[f"{m}_npz"], "logits", None) for name, m in (("RGB", "rgb"), ("Flow", "flow"))}
    fused_logits = fuse.fuse([s["videos"] for s in streams.values()], [1.0, 1.0])
    for name, m in (("RGB", "rgb"), ("Flow", "flow")):
        z = trained[f"{m}_scores"]
        ids, expected = metrics.video_scores(z["scores"], z["videos"], 0)
        for video_id, row in zip(ids, expected):
            got = results[video_id.rsplit("_", 2)[0]]["videos"][name]  # keyed by YouTube id
            assert np.allclose(got, row, atol=1e-4), (name, video_id)
            assert list(np.argsort(-got)[:5]) == list(np.argsort(-row)[:5])
    for video_id, logits in fused_logits.items():
        got = results[video_id.rsplit("_", 2)[0]]["fused"]
        assert np.allclose(got, predict.softmax(logits), atol=1e-4)
        assert list(got.argsort()[::-1][:5]) == list(predict.softmax(logits).argsort()[::-1][:5])
    printed = capsys.readouterr().out
    assert printed.count("| class | fused | RGB | Flow |") == 12


def test_real_clips_timeline_and_result_json(trained, tmp_path):
    out = tmp_path / "predictions.json"
    outcome = run_predict(DATA, *checkpoints(trained), "--tta", "flip",  # the folder: its three clips
                          "--out", out, "--timeline", tmp_path / "timeline", "--top", "4", "--batch-size", "7")
    assert set(outcome["results"]) == {"bikes", "carphone_pristine", "g1"}
    doc = json.loads(out.read_text())
    assert doc["version"] == "KINETICS-400" and doc["external_data"] == {"used": False, "details": ""}
    classes = outcome["classes"]
    for key, top5 in doc["results"].items():
        assert len(top5) == 5 and all(set(p) == {"label", "score"} and p["label"] in classes for p in top5)
        scores = [p["score"] for p in top5]
        assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1 + 1e-6
    assert doc["report"]["failed"] == {} and doc["report"]["tta"] == "flip"
    for key, result in outcome["results"].items():
        png = tmp_path / "timeline" / f"{key}.png"
        with Image.open(png) as image:
            assert image.width > 500
            drawn = json.loads(image.text["Description"])
        assert drawn["panels"] == ["RGB", "Flow", "fused"]
        assert drawn["classes"] == [classes[c] for c in result["top"][:4]] and len(set(drawn["classes"])) == 4
        samples = len(result["streams"]["RGB"]["frames"])
        assert samples == -(-result["frames"] // 4)  # one sample every 4 frames (the stride the data was packed with)


def test_either_stream_alone(trained):
    video = DATA / "g1.avi"
    rgb = run_predict(video, "--rgb", trained["rgb"] / "latest.pt")["results"]["g1"]
    both = run_predict(video, *checkpoints(trained))["results"]["g1"]
    assert list(rgb["videos"]) == ["RGB"] and np.allclose(rgb["fused"], rgb["videos"]["RGB"])
    assert np.allclose(rgb["videos"]["RGB"], both["videos"]["RGB"], atol=1e-5)  # no flow computed, same RGB inputs
    flow = run_predict(video, "--flow", trained["flow"] / "latest.pt")["results"]["g1"]
    assert np.allclose(flow["videos"]["Flow"], both["videos"]["Flow"], atol=1e-5)


def test_bad_videos_are_reported_and_the_rest_predicted(trained, tmp_path):
    frames = [np.full((72, 96, 3), v, np.uint8) for v in (40, 200)]
    write_video(tmp_path / "one_frame.mp4", frames[:1], 25, "libx264")
    write_video(tmp_path / "two_frames.mp4", frames, 25, "libx264")
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "notes.mp4").write_text("not a video\n")
    (tmp_path / "truncated.mp4").write_bytes((DATA / "bikes.mp4").read_bytes()[:3000])
    out = tmp_path / "p.json"
    inputs = [tmp_path / "missing.mp4", tmp_path / "one_frame.mp4", tmp_path / "empty.mp4", tmp_path / "notes.mp4",
              tmp_path / "truncated.mp4", tmp_path / "two_frames.mp4", DATA / "g1.avi"]
    done = subprocess.run([sys.executable, "predict.py", *map(str, inputs), *map(str, checkpoints(trained)),
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-2000:]
    report = json.loads(out.read_text())["report"]
    failed = {k.rsplit("/", 1)[1]: v for k, v in report["failed"].items()}
    assert failed["missing.mp4"].startswith("missing") and failed["one_frame.mp4"].startswith("too short")
    assert failed["empty.mp4"].startswith("undecodable") and failed["notes.mp4"].startswith("undecodable")
    assert failed["truncated.mp4"].startswith(("undecodable", "empty"))
    assert set(json.loads(out.read_text())["results"]) == {"two_frames", "g1"}
    assert "shorter than one flow stack" in report["notes"][str(tmp_path / "two_frames.mp4")]
    for name in failed:
        assert f"{name}: NOT predicted" in done.stdout
    assert "5 of 7 video(s) NOT predicted" in done.stdout


def test_checkpoints_that_do_not_say_how_their_inputs_were_made(data, trained, tmp_path):
    old = torch.load(trained["rgb"] / "latest.pt", map_location="cpu", weights_only=True)
    del old["pack_params"]
    torch.save(old, tmp_path / "old.pt")
    with pytest.raises(SystemExit, match="give --data DATA"):
        run_predict(DATA / "g1.avi", "--rgb", tmp_path / "old.pt")
    with_data = run_predict(DATA / "g1.avi", "--rgb", tmp_path / "old.pt", "--data", data)["results"]["g1"]
    assert np.allclose(with_data["fused"], run_predict(DATA / "g1.avi", "--rgb", trained["rgb"] / "latest.pt")["results"]["g1"]["fused"])
    other = torch.load(trained["flow"] / "latest.pt", map_location="cpu", weights_only=True)
    other["classes"] = other["classes"][::-1]
    torch.save(other, tmp_path / "other.pt")
    with pytest.raises(SystemExit, match="other class lists"):
        run_predict(DATA / "g1.avi", "--rgb", trained["rgb"] / "latest.pt", "--flow", tmp_path / "other.pt")
    with pytest.raises(SystemExit, match="--rgb CHECKPOINT, --flow CHECKPOINT"):
        run_predict(DATA / "g1.avi")


def test_streams_packed_with_other_parameters_each_use_their_own(trained, tmp_path):
    """A flow checkpoint trained on data packed at stride 2 beside an RGB one at stride 4: each gets its own samples."""
    ckpt = torch.load(trained["flow"] / "latest.pt", map_location="cpu", weights_only=True)
    ckpt["pack_params"] = {**ckpt["pack_params"], "stride": 2}
    torch.save(ckpt, tmp_path / "flow_stride2.pt")
    result = run_predict(DATA / "g1.avi", "--rgb", trained["rgb"] / "latest.pt", "--flow", tmp_path / "flow_stride2.pt",
                         "--timeline", tmp_path)["results"]["g1"]
    rgb, flow = result["streams"]["RGB"]["frames"], result["streams"]["Flow"]["frames"]
    assert rgb.tolist() == list(range(0, 16, 4)) and flow.tolist() == list(range(0, 16, 2))
    frames, values = result["fused_frames"]
    assert frames.tolist() == flow.tolist() and np.allclose(values.sum(1), 1.0, atol=1e-5)
    assert (tmp_path / "g1.png").is_file()


def test_wrong_checkpoints_and_empty_inputs_are_refused_before_any_work(trained, tmp_path):
    with pytest.raises(SystemExit, match="is a flow stream, given as the rgb one"):
        run_predict(DATA / "g1.avi", "--rgb", trained["flow"] / "latest.pt", "--flow", trained["rgb"] / "latest.pt")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no videos here\n")
    done = subprocess.run([sys.executable, "predict.py", str(tmp_path / "empty"), "--rgb", str(trained["rgb"] / "latest.pt")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "no videos in" in done.stderr, done.stderr[-2000:]
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit, match="--timeline .*a_file is a file, not a folder"):
        run_predict(DATA / "g1.avi", "--rgb", trained["rgb"] / "latest.pt", "--timeline", tmp_path / "a_file" / "t")
    with pytest.raises(SystemExit, match="--out .* is a folder"):
        run_predict(DATA / "g1.avi", "--rgb", trained["rgb"] / "latest.pt", "--out", tmp_path / "empty")


def test_a_video_whose_scores_are_not_finite_is_reported(trained, tmp_path):
    ckpt = torch.load(trained["rgb"] / "latest.pt", map_location="cpu", weights_only=True)
    ckpt["model"]["fc.weight"] = ckpt["model"]["fc.weight"].sign() * 3e38  # finite weights, logits that overflow
    torch.save(ckpt, tmp_path / "huge.pt")
    outcome = run_predict(DATA / "g1.avi", "--rgb", tmp_path / "huge.pt", "--out", tmp_path / "p.json")
    assert outcome["report"]["failed"][str(DATA / "g1.avi")].startswith("not finite: ")

    def refuse(constant):
        raise ValueError(constant)

    assert json.loads((tmp_path / "p.json").read_text(), parse_constant=refuse)["results"] == {}
    allowed = run_predict(DATA / "g1.avi", "--rgb", tmp_path / "huge.pt", "--allow-non-finite", "--out", tmp_path / "q.json")
    assert "g1" in allowed["results"]
    json.loads((tmp_path / "q.json").read_text(), parse_constant=refuse)


def test_a_phone_clip_with_a_display_rotation_is_predicted_upright(synth, data, tmp_path):
    """The same clip stored sideways with a 90-degree display rotation (as phones record) is predicted as the upright
    one is, both streams (its flow, on turned frames, moves the right way), with a note; stored sideways without the
    rotation it is another picture (a disc moving sideways), scored otherwise. Streams trained 2 iterations will do:
    what is compared is their logits on the same inputs, or on others."""
    import av

    import train

    for modality in ("rgb", "flow"):
        train.main(train.get_args_parser().parse_args(
            ["--data", str(data), "--modality", modality, "--arch", "resnet18", "--input-size", "32", "--batch-size",
             "8", "--workers", "1", "--max-iterations", "2", "--val-split", "", "--save-dir", str(tmp_path / modality)]))
    clip = sorted((synth / "videos" / "val").rglob("*.mp4"))[0]
    with av.open(str(clip)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    sideways = [np.ascontiguousarray(np.rot90(f, -1)) for f in frames]  # a player turns it back 90 degrees
    write_video(tmp_path / "upright.mp4", frames, 25, "libx264")
    write_video(tmp_path / "phone.mp4", sideways, 25, "libx264", display=(90, False))
    write_video(tmp_path / "sideways.mp4", sideways, 25, "libx264")
    out = run_predict(*(tmp_path / f"{name}.mp4" for name in ("upright", "phone", "sideways")),
                      "--rgb", tmp_path / "rgb" / "latest.pt", "--flow", tmp_path / "flow" / "latest.pt")
    results, notes = out["results"], out["report"]["notes"]
    upright, phone, wrong = (results[name]["streams"] for name in ("upright", "phone", "sideways"))
    for stream in ("RGB", "Flow"):
        near = np.abs(phone[stream]["logits"] - upright[stream]["logits"]).max()
        far = np.abs(wrong[stream]["logits"] - upright[stream]["logits"]).max()
        assert near < far / 5, (stream, near, far)
    assert notes[str(tmp_path / "phone.mp4")] == "rotated 90 degrees as its display matrix says (as a player shows it)"
    assert str(tmp_path / "upright.mp4") not in notes
