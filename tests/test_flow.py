"""Flow methods and encodings (issue 25): each stores a known motion with the right sign and axis, is recorded, and
mixing them is refused; a mirrored training view negates x whatever the encoding, in both loaders."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import loaders
import predict
import train
from conftest import run_pack
from loaders.common import FLOW_MEAN, FLOW_STD
from pack.flow import DEFAULT_BOUNDS, ENCODINGS, METHODS, decode_flow
from pack.manifest import load_manifest, params_differ, plan_id
from pack.packer import PackParams
from pack.synth import texture, write_video
from test_provenance import run_fuse, run_score, tiny  # noqa: F401 (tiny: the module's two trained streams)

MOTION = (2.0, -1.0)  # pixels a frame: right and up (y grows downwards); unequal, so that a swap of x and y shows
WIDTH, HEIGHT = 96, 72


def moving_texture(path: Path, seed: int, frames: int) -> None:
    """A real (H.264) video of a texture whose every pixel moves by MOTION each frame (a window sliding over it)."""
    big = (255 * texture(np.random.default_rng(seed), HEIGHT + 64, WIDTH + 64, 2.0)).astype(np.uint8)
    dx, dy = (int(v) for v in MOTION)
    x0, y0 = 48, 16  # the window moves by -MOTION, so the content moves by MOTION
    write_video(path, [np.repeat(big[y0 - dy * t:y0 - dy * t + HEIGHT, x0 - dx * t:x0 - dx * t + WIDTH, None], 3, axis=2)
                       for t in range(frames)], 25, "libx264")


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    """clips/moving/*.mp4: three videos of the known motion (one class: a --folders layout)."""
    root = tmp_path_factory.mktemp("motion")
    (root / "moving").mkdir()
    for seed in range(3):
        moving_texture(root / "moving" / f"clip{seed}.mp4", seed, frames=12)
    return root


def packed(clips: Path, out: Path, *flags) -> Path:
    assert run_pack("--folders", clips, "--split", "train", "--out", out, "--stride", "2", "--short-side", HEIGHT,
                    "--workers", "1", *flags) == 0
    return out


def stored_flows(data: Path) -> list[bytes]:
    """Every flow0 JPEG of the train split."""
    jpegs = []
    for piece in load_manifest(data)["splits"]["train"]["shards"]["flow"]:
        with tarfile.open(data / piece["tar"]) as tar:
            jpegs += [tar.extractfile(m).read() for m in tar if m.name.endswith(".flow0.jpg")]
    return jpegs


def quantisation(jpeg: bytes) -> dict:
    """A JPEG's quantisation tables: what its quality setting decides."""
    return Image.open(io.BytesIO(jpeg)).quantization


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("method", METHODS)
def test_each_method_and_encoding_stores_the_known_motion(clips, tmp_path, method, encoding):
    data = packed(clips, tmp_path / "data", "--flow", method, "--flow-encoding", encoding, "--flow-quality", "85")
    params = load_manifest(data)["splits"]["train"]["params"]
    bound = DEFAULT_BOUNDS[encoding]
    assert (params["flow"], params["flow_encoding"], params["flow_bound"], params["flow_quality"]) == \
        (method, encoding, bound, 85)
    jpegs = stored_flows(data)
    assert len(jpegs) == 18  # 3 videos x 6 samples
    quality_85 = cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 85])[1].tobytes()
    assert quantisation(jpegs[0]) == quantisation(quality_85)
    for jpeg in jpegs:
        image = cv2.cvtColor(cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        inner = image[16:-16, 16:-16]  # away from the borders, where content enters
        x, y = np.median(decode_flow(inner, bound).reshape(-1, 2), axis=0)
        assert abs(x - MOTION[0]) < 0.5 and abs(y - MOTION[1]) < 0.5, f"{method}/{encoding}: read ({x:.2f}, {y:.2f})"
        third = np.median(inner[..., 2])
        expected = 128 + np.hypot(*MOTION) * 128 / bound if encoding == "xym" else 128
        assert abs(third - expected) < 4, f"{method}/{encoding}: third channel {third}, not {expected:.0f}"


@pytest.mark.parametrize("backend", ["cpu", "dali"])
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_a_mirrored_training_view_negates_x_for_every_encoding(clips, tmp_path, encoding, backend):
    """Mirrored, the motion right-and-up reads left-and-up: x negated, y and the third channel as they were."""
    data = packed(clips, tmp_path / "data", "--flow", "dis", "--flow-encoding", encoding)
    loader = loaders.build(data, "train", "flow", True, 6, crop=40, backend=backend, device="cpu", workers=1)
    images = torch.cat([x.float() for x, _, _ in loader]) * FLOW_STD + FLOW_MEAN  # back to stored levels
    bound = DEFAULT_BOUNDS[encoding]
    x, y = ((images[:, c].median(2).values.median(1).values - 128) * bound / 128 for c in (0, 1))
    third = images[:, 2].median(2).values.median(1).values
    mirrored = x < 0
    assert len(images) == 18 and 0 < mirrored.sum() < 18, "some views are mirrored, some not"
    assert torch.allclose(x.abs(), torch.full_like(x, MOTION[0]), atol=0.6), x
    assert torch.allclose(y, torch.full_like(y, MOTION[1]), atol=0.6), y
    expected = 128 + np.hypot(*MOTION) * 128 / bound if encoding == "xym" else 128
    assert torch.allclose(third, torch.full_like(third, float(expected)), atol=4), third


OLD = {"stride": 4, "flow": "dis", "flow_len": 2, "flow_bound": 8.0, "short_side": 72, "quality": 90,
       "shard_videos": 4, "shard_mb": 1000, "seed": 0}  # a record of before --flow-encoding and --flow-quality


def test_records_older_than_the_new_parameters_read_as_what_they_were_packed_with():
    now = {**OLD, "flow_encoding": "xym", "flow_quality": 90}
    assert params_differ(OLD, now, "flow") == [] and params_differ(now, OLD, "flow") == []
    assert params_differ(OLD, {**now, "flow_encoding": "xy"}, "flow") == ["flow_encoding xym vs xy"]
    assert params_differ(OLD, {**now, "flow_quality": 75}, "flow") == ["flow_quality 90 vs 75"]
    assert params_differ({**OLD, "quality": 75}, {**now, "flow_quality": 75}, "flow") == []  # flow had RGB's quality
    assert params_differ(OLD, {**now, "flow_encoding": "xy"}, "rgb") == []  # RGB inputs do not depend on flow's
    assert params_differ({}, now, "flow") == []  # a checkpoint that does not say: nothing to compare


def test_a_split_packed_before_the_new_parameters_resumes(clips, tmp_path):
    """An unfinished split of an older pack (its plan and records without the new keys) is finished, not refused."""
    data = packed(clips, tmp_path / "data", "--flow", "dis", "--shard-videos", "1")
    split = data / "train"
    plan = json.loads((split / "plan.json").read_text())
    for key in ("flow_encoding", "flow_quality"):
        del plan["params"][key]
    (split / "plan.json").write_text(json.dumps(plan))
    for record in (split / "records").glob("*.json"):
        (record.unlink() if record.name == "00002.json" else
         record.write_text(json.dumps({**json.loads(record.read_text()), "plan": plan_id(plan)})))
    with pytest.raises(SystemExit, match="packed from other annotations or with other parameters"):
        packed(clips, data, "--flow", "dis", "--shard-videos", "1", "--flow-encoding", "xy")
    packed(clips, data, "--flow", "dis", "--shard-videos", "1")
    info = load_manifest(data)["splits"]["train"]
    assert info["complete"] and info["samples"] == 18 and "flow_encoding" not in info["params"]


def edited(ckpt_path: Path, out: Path, **params) -> Path:
    """A copy of a checkpoint whose pack parameters are changed (None: removed, as an older one lacks them)."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    ckpt["pack_params"] = {k: v for k, v in {**ckpt["pack_params"], **params}.items() if v is not None}
    torch.save(ckpt, out)
    return out


def test_score_init_and_fuse_refuse_another_flow_encoding_or_quality(data, synth, tiny, tmp_path):  # noqa: F811
    for change, says in (({"flow_encoding": "xy", "flow_bound": 20.0}, "flow_encoding xy vs xym[,;] flow_bound 20.0 vs 8.0"),
                         ({"flow_quality": 75}, "flow_quality 75 vs 90")):
        ckpt = edited(tiny["flow"], tmp_path / "other.pt", **change)
        with pytest.raises(SystemExit, match=f"packed with other parameters .*{says}"):
            run_score("--checkpoint", ckpt, "--data", data, "--out", tmp_path / "s.npz")
        with pytest.raises(SystemExit, match=f"packed with other parameters .*{says}"):
            train.main(train.get_args_parser().parse_args(
                ["--data", str(data), "--modality", "flow", "--input-size", "32", "--batch-size", "4", "--workers", "1",
                 "--max-iterations", "2", "--init", str(ckpt), "--save-dir", str(tmp_path / "init")]))
    old = edited(tiny["flow"], tmp_path / "old.pt", flow_encoding=None, flow_quality=None)  # read as xym at quality 90
    run_score("--checkpoint", old, "--data", data, "--out", tmp_path / "old.npz")
    xy = tmp_path / "xy"  # the same val videos, packed as x/y
    assert run_pack("--csv", synth / "val.csv", "--videos", synth / "videos", "--out", xy, "--workers", "1", "--stride",
                    "4", "--flow-len", "2", "--short-side", "72", "--flow", "dis", "--flow-encoding", "xy") == 0
    run_score("--checkpoint", tiny["flow"], "--data", xy, "--out", tmp_path / "xy.npz", "--allow-other-params")
    with pytest.raises(SystemExit, match="different data or splits"):
        run_fuse(tiny["rgb_npz"], tmp_path / "xy.npz", "--out", tmp_path / "fused")


def test_predict_makes_flow_as_the_checkpoint_was_packed(tiny, tmp_path):  # noqa: F811
    args = predict.get_args_parser().parse_args(["x.mp4", "--flow", str(tiny["flow"])])
    for change, expected in (({"flow": "tvl1", "flow_encoding": "xy", "flow_bound": 20.0, "flow_quality": 75},
                              {"flow": "tvl1", "flow_encoding": "xy", "flow_bound": 20.0, "flow_quality": 75}),
                             ({"flow_encoding": None, "flow_quality": None, "quality": 80},  # older: xym at RGB's quality
                              {"flow": "dis", "flow_encoding": "xym", "flow_bound": 8.0, "flow_quality": 80})):
        ckpt = edited(tiny["flow"], tmp_path / "c.pt", **change)
        params = predict.load_stream("Flow", ckpt, None, torch.device("cpu"), args)["params"]
        assert isinstance(params, PackParams)
        assert {k: getattr(params, k) for k in expected} == expected
