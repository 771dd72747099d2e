"""What is read is what was written: every consumer checks the bytes it reads, one flipped bit at a time.

A shard member (a JPEG that still decodes, a label that is still a valid one), an index line,
the manifest, a checkpoint: each is damaged by one bit, and each command that reads it says so.
"""
from __future__ import annotations

import io
import json
import pickle
import shutil
import struct
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

import score
import train
from loaders.common import open_stream
from loaders.plan import Lost, ShardReader
from pack.manifest import load_manifest, stamped
from pack.shards import key_of
from tests.test_loaders import agree_on_damage, damaged_copy
from tests.test_pack import flip_a_bit_that_still_decodes

TINY = ["--modality", "rgb", "--arch", "resnet18", "--input-size", "32", "--batch-size", "8", "--workers", "1",
        "--val-split", "", "--log-every", "1", "--deterministic", "--lr", "0.01"]


def flip(path: Path, offset: int, bit: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


def member(tar: Path, name_end: str, nth: int = 0) -> tarfile.TarInfo:
    with tarfile.open(tar) as t:
        return [m for m in t.getmembers() if m.name.endswith(name_end)][nth]


def test_a_flipped_bit_in_a_jpeg_is_a_lost_sample_for_both_loaders_and_the_reader(data, tmp_path):
    copy, split = damaged_copy(data, tmp_path)
    tar = copy / split["shards"]["rgb"][0]["tar"]
    key = key_of(flip_a_bit_that_still_decodes(tar))  # it still decodes: only its checksum tells
    agree_on_damage(copy, 1, key, tar.name, "damaged: its rgb.jpg is not what was packed (CRC-32C mismatch)")
    reader = ShardReader(open_stream(copy, "val", "rgb"))  # the one reader: loaders, bench, window probe
    with pytest.raises(Lost, match="CRC-32C mismatch") as lost:
        for sample in range(split["shards"]["rgb"][0]["samples"]):
            reader.read(sample)
    assert lost.value.key == key


def test_a_flipped_bit_in_a_label_that_is_still_a_label_is_a_lost_sample(data, tmp_path):
    """'2' -> '3' is a valid wrong label: the checksum finds it, and in shards without checksums the manifest's label."""
    copy, split = damaged_copy(data, tmp_path)
    tar = copy / split["shards"]["rgb"][0]["tar"]
    cls = member(tar, ".cls", 3)
    flip(tar, cls.offset_data)  # ASCII digit 0..5 with its lowest bit flipped: another class of the 6
    key = key_of(cls.name)
    agree_on_damage(copy, 1, key, tar.name, "damaged: its cls is not what was packed (CRC-32C mismatch)")
    # the same shard as an older pack wrote it (no checksums recorded): the label against its video's in the manifest
    manifest = load_manifest(copy)
    del manifest["splits"]["val"]["shards"]["rgb"][0]["checksums"]
    (copy / "manifest.json").write_text(json.dumps(stamped(manifest)))
    with pytest.warns(UserWarning, match="1 of 3 shards were packed before per-sample checksums"):
        open_stream(copy, "val", "rgb")
    video = split["video_info"][key.rsplit("/", 1)[0]]["cls"]
    agree_on_damage(copy, 1, key, tar.name, f"label {video ^ 1}, its video's in the manifest is {video}")


def test_a_flipped_bit_in_an_index_is_a_lost_sample(data, tmp_path):
    """A sample's name (its frame number) or offset changed in the index: it is not what its checksums name."""
    copy, split = damaged_copy(data, tmp_path)
    piece = split["shards"]["rgb"][1]
    index = copy / piece["idx"]
    text = index.read_text()
    line = text.splitlines()[1 + 4]  # the fifth sample
    name = line.split()[3]
    renamed = name.replace(name.split("/")[-1][:6], f"{int(name.split('/')[-1][:6]) ^ 1:06d}", 1)
    flip(index, text.index(name) + len(renamed.split(".")[0]) - 1)  # the last digit of its frame number
    assert index.read_text() == text.replace(name, renamed, 1)
    agree_on_damage(copy, 1, key_of(renamed), Path(piece["tar"]).name, "is not among the members packed")


def test_a_damaged_or_edited_manifest_is_named_by_every_reader_and_merge_mends_it(data, tmp_path, capsys):
    from pack.merge import main as merge
    from pack.verify import main as verify

    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    path = copy / "manifest.json"
    whole = path.read_text()
    assert '"flow_bound": 8.0' in whole
    path.write_text(whole.replace('"flow_bound": 8.0', '"flow_bound": 9.0', 1))  # valid JSON, another bound
    damaged = f"{path} is damaged: its content is not what pack wrote"
    for reader in (lambda: load_manifest(copy), lambda: open_stream(copy, "val", "rgb")):
        with pytest.raises(ValueError, match=damaged):
            reader()
    with pytest.raises(SystemExit, match=f"error: {damaged}.*python -m pack.merge {copy}"):
        verify([str(copy)])
    with pytest.raises(SystemExit, match=f"error: {copy}/train: {damaged}"):
        train.main(train.get_args_parser().parse_args(["--data", str(copy), *TINY, "--save-dir", str(tmp_path / "r")]))
    with pytest.raises(SystemExit, match=f"error: {damaged}"):
        score.main(score.get_args_parser().parse_args(["--checkpoint", str(tmp_path / "none.pt"), "--data", str(copy),
                                                       "--out", str(tmp_path / "s.npz")]))
    assert merge([str(copy)]) == 0  # rebuilt from the plans and records
    assert load_manifest(copy)["splits"]["val"]["params"]["flow_bound"] == 8.0
    # a manifest from before the checksum: read, with a note that says how to add one
    manifest = json.loads(path.read_text())
    del manifest["sha256"]
    path.write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match=f"carries no checksum .* python -m pack.merge {copy} rewrites it with one"):
        load_manifest(copy)


@pytest.fixture(scope="module")
def run_dir(data, tmp_path_factory):
    """A finished 2-iteration run with a checkpoint at each iteration."""
    save = tmp_path_factory.mktemp("run")
    train.main(train.get_args_parser().parse_args(
        [str(a) for a in ["--data", data, *TINY, "--max-iterations", "2", "--ckpt-every", "1", "--save-dir", save]]))
    return save


def record_data_offset(path: Path, record_end: str) -> tuple[int, int]:
    """Where a zip record's bytes start in the file, and how many (torch.save stores them uncompressed)."""
    raw = path.read_bytes()
    info = next(i for i in zipfile.ZipFile(path).infolist() if i.filename.endswith(record_end))
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
    return info.header_offset + 30 + name_len + extra_len, info.compress_size


def test_a_checkpoint_with_a_flipped_bit_is_named_damaged_at_every_load(data, run_dir, tmp_path):
    ckpt = tmp_path / "best.pt"
    shutil.copyfile(run_dir / "latest.pt", ckpt)
    start, size = record_data_offset(ckpt, "/data/0")  # the first tensor's storage
    flip(ckpt, start + size // 2, 3)
    torch.load(ckpt, map_location="cpu", weights_only=True)  # torch itself loads it, another weight in it
    damaged = rf"{ckpt} is damaged: its record \S+/data/0 is not the bytes torch.save wrote \(CRC-32 mismatch\)"
    with pytest.raises(SystemExit, match=f"--checkpoint {damaged}; copy it again"):
        score.main(score.get_args_parser().parse_args(["--checkpoint", str(ckpt), "--data", str(data),
                                                       "--out", str(tmp_path / "s.npz")]))
    with pytest.raises(SystemExit, match=f"--init {damaged}"):
        train.main(train.get_args_parser().parse_args(["--data", str(data), *TINY, "--max-iterations", "3",
                                                       "--init", str(ckpt), "--save-dir", str(tmp_path / "fine")]))
    import predict

    with pytest.raises(SystemExit, match=f"--rgb {damaged}"):
        predict.main(predict.get_args_parser().parse_args([str(ROOT_DATA / "bikes.mp4"), "--rgb", str(ckpt)]))
    assert not (tmp_path / "s.npz").exists() and not (tmp_path / "fine" / "latest.pt").exists()


def test_a_flipped_bit_in_a_checkpoints_pickle_is_damage_not_foreign_code(run_dir, tmp_path):
    from training.checkpoints import read_checkpoint

    ckpt = tmp_path / "latest.pt"
    pristine = (run_dir / "latest.pt").read_bytes()
    start, size = record_data_offset(run_dir / "latest.pt", "/data.pkl")
    for offset in range(start, start + size):  # the first flip that torch's safe unpickler refuses
        data = bytearray(pristine)
        data[offset] ^= 1
        try:
            torch.load(io.BytesIO(bytes(data)), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            break
        except Exception:
            continue
    else:
        raise AssertionError("no flip in the pickle that the unpickler refuses")
    ckpt.write_bytes(bytes(data))
    with pytest.raises(SystemExit, match=r"--checkpoint \S+ is damaged: its record \S+/data.pkl is not the bytes"):
        read_checkpoint(ckpt, "--checkpoint")


def test_resume_passes_over_a_damaged_checkpoint_saying_so(data, run_dir, tmp_path):
    save = tmp_path / "run"
    shutil.copytree(run_dir, save)
    start, size = record_data_offset(save / "latest.pt", "/data/1")
    flip(save / "latest.pt", start + size - 1)
    (save / "ckpt-00000002.pt").unlink()
    train.main(train.get_args_parser().parse_args(
        [str(a) for a in ["--data", data, *TINY, "--max-iterations", "3", "--ckpt-every", "1", "--save-dir", save,
                          "--resume"]]))
    log = (save / "train.log").read_text()
    assert f"checkpoint {save / 'latest.pt'} is damaged: its record" in log and "trying the previous one" in log
    assert "resumed from iteration 1" in log


ROOT_DATA = Path(__file__).resolve().parent / "data"
