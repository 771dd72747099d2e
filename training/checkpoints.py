"""Checkpoint files: written whole (then renamed), loaded safely, kept or rotated; a save-dir holds one run."""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import torch


CHECKPOINT_KEYS = ("model", "args", "classes", "iteration")  # what every train.py checkpoint holds


def damage(data: bytes) -> str | None:
    """What is damaged in a checkpoint's bytes, or None: each record of torch.save's zip (the pickle, each tensor's
    storage) carries a CRC-32 of its bytes, which torch.load does not check; this checks them all.

    Bytes that are not a whole zip (cut short, another kind of file) are left to torch.load to name.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError, ValueError):
        return None
    try:
        bad = archive.testzip()
    except Exception as e:  # a damaged record header: its bytes cannot even be found
        return f"its zip records are unreadable ({type(e).__name__}: {str(e)[:80]})"
    return f"its record {bad} is not the bytes torch.save wrote (CRC-32 mismatch)" if bad else None


def read_checkpoint(path: Path, flag: str) -> dict:
    """A train.py checkpoint, loaded safely (weights_only), or one line saying what the file is instead.

    Every byte is checked first (damage): a flipped bit in a weight would load silently, one
    in the pickle would read as a pickle of other objects. It holds the SHA-256 of the bytes
    loaded as "file_sha256" (what artifacts made from it record): hashed as read, since a
    training run may replace latest.pt meanwhile.
    """
    data = Path(path).read_bytes()
    damaged = damage(data)
    if damaged:
        raise SystemExit(f"error: {flag} {path} is damaged: {damaged}; copy it again, or take another checkpoint "
                         f"of its run")
    try:
        ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not zipfile.is_zipfile(io.BytesIO(data)):  # torch.save writes a zip archive: this is something else
            raise SystemExit(f"error: {flag} {path} is not a torch checkpoint file (random bytes, another kind of "
                             f"file, or a legacy pickle): give a train.py checkpoint (best.pt, latest.pt)") from None
        raise SystemExit(f"error: {flag} {path} holds Python objects beyond tensors (a pickle, not a train.py "
                         f"checkpoint): it is not loaded, as it could run code ({str(e).splitlines()[0][:120]})") from None
    except Exception as e:  # cut short, damaged, not a torch file at all
        said = str(e).strip().split(". ")[0][:160] or "damaged"  # torch's first sentence (its advice is not for this)
        raise SystemExit(f"error: {flag} {path} does not load ({type(e).__name__}: {said}): cut short or "
                         f"damaged? copy it again, or take another checkpoint of its run") from None
    if not isinstance(ckpt, dict) or not all(k in ckpt for k in CHECKPOINT_KEYS):
        plain = isinstance(ckpt, dict) and all(isinstance(v, torch.Tensor) for v in ckpt.values())
        what = "a plain state_dict (weights without the run's arguments and classes)" if plain else "not one"
        raise SystemExit(f"error: {flag} {path} is not a train.py checkpoint ({what}); give the best.pt or latest.pt "
                         f"train.py wrote (ImageNet weights of a torchvision .pth file go to train.py --pretrained)")
    ckpt["file_sha256"] = hashlib.sha256(data).hexdigest()
    return ckpt


def checkpoints(save_dir: Path) -> list[Path]:
    """Resume candidates, best first: latest, then the numbered ones newest first."""
    numbered = sorted(save_dir.glob("ckpt-*.pt"), reverse=True)
    latest = save_dir / "latest.pt"
    return ([latest] if latest.exists() else []) + numbered


RUN_FILES = ("latest.pt", "best.pt", "ckpt-*.pt", "train.log", "tensorboard", "curves.png")  # what a run writes


def claim_save_dir(args) -> str | None:
    """A fresh run writes only into a --save-dir without another run's checkpoints; --overwrite removes that run first.

    Returns what to say in the log, if anything. Files that train.py did not write are never
    removed (and a fresh run refuses a folder that holds them: it is not a run's folder).
    A folder whose earlier run saved no checkpoint (it failed at start) is taken as it is.
    """
    if args.resume:
        return None
    ours = [p for pattern in RUN_FILES for p in sorted(args.save_dir.glob(pattern))]
    theirs = [p.name for p in args.save_dir.iterdir() if p not in ours and not p.name.startswith(".")]
    if theirs:
        raise SystemExit(f"error: --save-dir {args.save_dir} holds files train.py did not write ({', '.join(theirs[:3])}"
                         f"{' ...' if len(theirs) > 3 else ''}): give an empty or new folder")
    saved = [p for p in ours if p.suffix == ".pt"]
    if not saved:
        return None
    if not args.overwrite:
        raise SystemExit(f"error: --save-dir {args.save_dir} holds a run ({', '.join(p.name for p in saved[:3])}): "
                         f"give --resume to continue it, --overwrite to replace it, or another --save-dir")
    for p in ours:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return f"--overwrite: removed the run that was in {args.save_dir} ({len(saved)} checkpoint file(s), its log and curves)"


def remove_stale_temporaries(save_dir: Path, log) -> None:
    """Half-written checkpoints of a run that was killed while saving (the save-dir's lock says none is running)."""
    stale = list(save_dir.glob(".*.pt.tmp*"))
    for tmp in stale:
        tmp.unlink()
    if stale:
        log(f"removed {len(stale)} half-written checkpoint(s) of an earlier run that was killed while saving")


def atomic_save(obj: dict, path: Path) -> None:
    """torch.save under a temporary name, then renamed; a write that fails (a full disk) removes it and stops the run
    with one line (torch's own error is a RuntimeError of its zip writer, "unexpected pos ...")."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        tmp.unlink(missing_ok=True)
        free = shutil.disk_usage(path.parent).free / 2**20
        kept = sorted(path.parent.glob("ckpt-*.pt"))
        why = getattr(e, "strerror", None) or "the write failed"
        raise SystemExit(f"error: the checkpoint {path} could not be written ({why}; {free:.1f} MiB free on its "
                         f"disk, or a file size limit?): nothing half-written "
                         f"is left; free space, then run the same command with --resume (it goes on from "
                         f"{kept[-1].name if kept else 'the start: no checkpoint yet'})") from None


def save_checkpoint(state: dict, save_dir: Path, keep: int, best: bool) -> None:
    """ckpt-{iteration}.pt, then latest.pt and best.pt as links to it; older ones beyond `keep` go."""
    path = save_dir / f"ckpt-{state['iteration']:08d}.pt"
    atomic_save(state, path)
    for name in ["latest.pt"] + (["best.pt"] if best else []):
        tmp = save_dir / f".{name}.tmp{os.getpid()}"
        tmp.unlink(missing_ok=True)
        try:
            os.link(path, tmp)
        except OSError:  # file systems without hard links
            shutil.copyfile(path, tmp)
        os.replace(tmp, save_dir / name)
    for old in sorted(save_dir.glob("ckpt-*.pt"))[:-keep]:
        old.unlink()


def load_checkpoint(save_dir: Path, log) -> dict:
    """The newest checkpoint that loads; a broken one is reported and the previous one tried."""
    for path in checkpoints(save_dir):
        data = path.read_bytes()
        damaged = damage(data)
        if damaged:
            log(f"checkpoint {path} is damaged: {damaged}; trying the previous one")
            continue
        try:
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as e:  # truncated or corrupt file: say so, fall back
            log(f"checkpoint {path} does not load ({type(e).__name__}: {e}); trying the previous one")
    raise SystemExit(f"error: no checkpoint in {save_dir} loads")
