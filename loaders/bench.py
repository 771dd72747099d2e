"""Loader throughput in images per second, against the original way, in the same run.

    python -m loaders.bench --data DATA --split train --modality rgb --backend cpu dali

Runs the `files` baseline (one JPEG file per frame, PIL + torchvision transforms in a
DataLoader, as the original trained) and the raw JPEG decode ceiling beside the backends
asked for, so the ratios printed come from one run on one machine. An image is one JPEG:
a flow sample of --flow-len 5 counts 5. `--segments 1 3` measures each backend with frame
sampling and with TSN's segments (batches of --batch-size // 3 videos of 3 frames: about as
many images a batch) side by side.
"""
from __future__ import annotations

import argparse
import functools
import multiprocessing as mp
import platform
import time
from pathlib import Path

import simplejpeg
import torch
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import DataLoader, Dataset

import loaders
from loaders.common import add_loss, open_stream
from loaders.plan import Lost, ShardReader


def baseline_inputs(stream, folder: Path) -> tuple[list[list[Path]], list[bytes], list]:
    """The baselines' inputs, from the shards: a JPEG file per image (the original's layout, written once), 2,000
    JPEGs for the decode ceiling, and what was left out as the loaders leave it out (a bad JPEG, a shard cut short).

    Each distinct sample is checked once (benchmark data lists the same shards many times).
    """
    done = folder / ".complete"
    files, jpegs, checked, losses = [], [], {}, {}
    reader = ShardReader(stream)
    for sample_id in range(stream.samples):
        try:
            sample = reader.read(sample_id)
        except Lost as e:
            add_loss(losses, e.shard, e.key, 1, str(e))
            continue
        paths = [folder / f"{sample['__key__']}.{ext}" for ext in stream.exts]
        if paths[0] not in checked:
            checked[paths[0]] = _decodes(sample, stream.exts)
            if checked[paths[0]] and not done.exists():
                for path, ext in zip(paths, stream.exts):
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(sample[ext])
        if not checked[paths[0]]:
            add_loss(losses, sample["__url__"], sample["__key__"], 1, "an image does not decode")
            continue
        files.append(paths)
        if len(jpegs) < 2000:
            jpegs += [sample[ext] for ext in stream.exts]
    done.touch()
    return files, jpegs, list(losses.values())


def _decodes(sample: dict, exts: list[str]) -> bool:
    try:
        for ext in exts:
            simplejpeg.decode_jpeg(sample[ext], colorspace="RGB")
    except ValueError:
        return False
    return True


class FilesDataset(Dataset):
    """The baseline: PIL opens each file, torchvision transforms it (as the original did)."""

    def __init__(self, samples: list[list[Path]], crop: int, resize: int, mean, std):
        self.samples = samples
        self.resize = T.Resize(resize)
        self.augment = T.Compose([T.RandomCrop(crop), T.RandomHorizontalFlip(), T.Normalize(mean, std)])
        self.to_tensor = T.ToTensor()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        images = [self.to_tensor(self.resize(Image.open(p).convert("RGB"))) for p in self.samples[i]]
        return self.augment(torch.cat(images) * 255), 0


def rate(batches, images_per_sample: int, seconds: float, warmup: int = 3) -> tuple[int, float]:
    """(images, seconds) over about `seconds`, after `warmup` batches; loops over epochs as needed."""
    count, start, seen = 0, None, 0
    while True:
        for images, *_ in batches():
            seen += 1
            if seen == warmup:
                if images.is_cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
            elif seen > warmup:
                count += images.shape[0] * images_per_sample
                if time.perf_counter() - start >= seconds:
                    if images.is_cuda:
                        torch.cuda.synchronize()
                    return count, time.perf_counter() - start


def fresh_loader_rate(make, images_per_sample: int, seconds: float) -> tuple[int, float]:
    """rate() of a loader made for this turn, and gone with it (with its workers and their prefetching)."""
    loader = make()
    return rate(lambda: loader, images_per_sample, seconds)


def in_turns(contenders: dict, rounds: int, seconds: float) -> dict[str, float]:
    """Images per second of each contender, measured in turns: `rounds` times each, seconds/rounds a turn.

    This machine has slow and fast spells of several seconds; taking turns spreads them
    over all contenders alike, which measuring one after the other does not. Each turn
    starts its loader's workers and stops them: work a loader has prefetched must not run
    into the next one's turn (the files baseline's 2 batches a worker take seconds).
    """
    totals = {name: [0, 0.0] for name in contenders}
    for round_ in range(rounds):
        line = []
        for name, measure in contenders.items():
            count, elapsed = measure(seconds / rounds)
            totals[name][0] += count
            totals[name][1] += elapsed
            line.append(f"{name} {count / elapsed:.0f}")
        print(f"  round {round_ + 1}/{rounds}, images/s: {', '.join(line)}", flush=True)
    return {name: count / elapsed for name, (count, elapsed) in totals.items()}


def _decode_all(jpegs: list[bytes]) -> int:
    for jpeg in jpegs:
        simplejpeg.decode_jpeg(jpeg, colorspace="RGB")
    return len(jpegs)


class DecodeCeiling:
    """Raw JPEG decodes of the same images with the same number of processes: (images, seconds)."""

    def __init__(self, jpegs: list[bytes], processes: int):
        self.chunks = [jpegs[i::processes * 4] for i in range(processes * 4)]
        self.pool = mp.get_context("fork").Pool(processes)
        self.pool.map(_decode_all, self.chunks[:processes])  # warm-up

    def __call__(self, seconds: float) -> tuple[int, float]:
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            count += sum(self.pool.map(_decode_all, self.chunks))
        return count, time.perf_counter() - start


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loaders.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, type=Path, help="packed DATA folder")
    p.add_argument("--split", default="train", help="split to read")
    p.add_argument("--modality", default="rgb", choices=["rgb", "flow"], help="stream to read")
    p.add_argument("--backend", nargs="+", default=["cpu"], choices=["cpu", "dali", "files"],
                   help="loaders to measure (files, the baseline, always runs)")
    p.add_argument("--batch-size", type=int, default=64,
                   help="samples per batch (with --segments K > 1: batch-size // K videos, about as many images)")
    p.add_argument("--segments", type=int, nargs="+", default=[1], metavar="K",
                   help="the loaders' sampling, each K measured in the same run: 1 frames, K > 1 videos of K frames "
                        "(train.py --segments)")
    p.add_argument("--crop", type=int, default=224, help="crop size (the network's input size)")
    p.add_argument("--flow-len", type=int, help="flow images per sample (default: as packed)")
    p.add_argument("--workers", type=int, default=mp.cpu_count(), help="loader processes/threads, the same for all")
    p.add_argument("--seconds", type=float, default=20, help="measuring time per loader (over all its turns), after warm-up")
    p.add_argument("--rounds", type=int, default=4, help="turns each loader takes (the --seconds split among them)")
    p.add_argument("--device", default=None, help="where batches go (default: cuda if present, else cpu)")
    p.add_argument("--raw", action="store_true",
                   help="cpu backend: measure its uint8 batches as a GPU receives them (the crops' windows, "
                        "which the GPU resizes and normalises)")
    p.add_argument("--files-dir", type=Path, help="where the baseline's JPEG folders go (default: DATA/files-{split}-{modality})")
    return p


def main(args: argparse.Namespace) -> None:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        stream = open_stream(args.data, args.split, args.modality, args.flow_len)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    per_sample = len(stream.exts)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU"
    print(f"machine: {platform.processor() or platform.machine()}, {mp.cpu_count()} cores, {gpu}; "
          f"{args.modality} crop {args.crop}, batch {args.batch_size}, {args.workers} workers, "
          f"{per_sample} image(s) per sample, {stream.samples} samples")
    folder = args.files_dir or args.data / f"files-{args.split}-{args.modality}"
    files, jpegs, losses = baseline_inputs(stream, folder)
    if losses:
        print(f"the baselines leave out {sum(x.samples for x in losses)} bad sample(s), as the loaders do: "
              + "; ".join(map(str, losses[:3])))
    contenders = {"decode ceiling": DecodeCeiling(jpegs, args.workers)}
    names = {"decode ceiling": f"simplejpeg, {args.workers} processes, no augmentation",
             "files": "PIL + torchvision transforms, the baseline"}

    files = FilesDataset(files, args.crop, round(args.crop * 1.1), stream.mean, stream.std)

    def files_batches():
        for images, labels in DataLoader(files, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                                         drop_last=True, pin_memory=device.type == "cuda"):
            yield images.to(device, non_blocking=True), labels

    contenders["files"] = lambda seconds: rate(files_batches, per_sample, seconds)
    against = {}  # with several --segments: each contender -> its backend's at the first K
    for backend, k in [(b, k) for b in args.backend if b != "files" for k in args.segments]:
        raw = args.raw and backend == "cpu"
        name = f"{backend} ({'nvJPEG' if backend == 'dali' and device.type == 'cuda' else 'uint8' if raw else 'CPU'})"
        if args.segments != [1]:
            against[f"{name} K={k}"] = f"{name} K={args.segments[0]}"
            name = f"{name} K={k}"
        make = functools.partial(loaders.build, args.data, args.split, args.modality, True,
                                 max(args.batch_size // k, 1),
                                 crop=args.crop, backend=backend, device=device, flow_len=args.flow_len,
                                 workers=args.workers, segments=k, **({"raw": True} if raw else {}))
        contenders[name] = functools.partial(fresh_loader_rate, make, per_sample)
    print(f"measuring {len(contenders)} in turns: {args.rounds} rounds of {args.seconds / args.rounds:.1f} s each")
    results = in_turns(contenders, args.rounds, args.seconds)
    ceiling, files_rate = results["decode ceiling"], results["files"]
    for name, value in results.items():
        comparison = names.get(name) or (f"= {value / files_rate:.2f}x files, "
                                         f"{100 * value / ceiling:.0f}% of the decode ceiling")
        if against.get(name, name) != name:
            comparison += f", {value / results[against[name]]:.2f}x {against[name]}"
        print(f"{name:>16}: {value:8.0f} images/s {comparison}")


if __name__ == "__main__":
    parser = get_args_parser()
    arguments = parser.parse_args()
    if min(arguments.segments) < 1:
        parser.error(f"--segments {min(arguments.segments)}: give counts >= 1")
    main(arguments)
