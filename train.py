"""Train one stream (RGB or flow) of the two-stream network from the packed shards.

    python train.py --data DATA --modality rgb --save-dir runs/rgb
    python train.py --data ucf101-1 --modality rgb --init runs/rgb/best.pt --save-dir runs/ucf101-rgb
    torchrun --nproc-per-node 8 train.py --data DATA --modality flow --save-dir runs/flow

Kill it at any moment and run the same command with --resume: it continues from the latest
good checkpoint (weights, optimiser, learning-rate schedule, loss scale, random state, and
where the loader is in its planned data order) as the same run never stopped would.
SIGTERM (a scheduler's preemption) stops it after the step under way, with a checkpoint. A loss that is not finite stops it with an error: no checkpoint of
non-finite weights is ever written.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import os
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import loaders
import nets
from loaders.common import check_fills_a_batch, open_stream
from pack.files import Lock, check_output_dir, json_text
from pack.manifest import incomplete_note, load_manifest
from pack.workers import die_with_parent
from score import positive_int
from training.checkpoints import checkpoints, claim_save_dir, remove_stale_temporaries, save_checkpoint
from training.logs import Logger, Window, plot_curves
from training.run import Run, plain_args, random_state
from training.step import TrainStep, graph_decision, set_bn_eval

# fp16: a loss scale below this means even the unscaled gradients overflow: the run has diverged.
MIN_LOSS_SCALE = 1.0


def probability(text: str) -> float:
    """argparse type of a dropout probability, 0 <= p < 1."""
    p = float(text)
    if not 0 <= p < 1:
        raise argparse.ArgumentTypeError(f"{text}: give a probability from 0 up to (not including) 1")
    return p


def number(low: float, high: float = math.inf, integer: bool = False, above: bool = False):
    """argparse type of a finite number in low..high (above: more than low), else a one-line usage error: a learning
    rate of -1 or nan would otherwise fail deep in the optimiser, or train on NaN."""
    def parse(text: str):
        value = int(text) if integer else float(text)
        if not (math.isfinite(value) and (value > low if above else value >= low) and value <= high):
            raise argparse.ArgumentTypeError(f"{text}: give a finite number {'>' if above else '>='} {low:g}"
                                             + (f" and <= {high:g}" if high < math.inf else ""))
        return value
    return parse


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", type=Path, required=True, help="packed DATA folder (python -m pack)")
    g.add_argument("--modality", choices=["rgb", "flow"], required=True, help="which stream to train")
    g.add_argument("--train-split", default="train", help="split to train on")
    g.add_argument("--val-split", default="val", help="split to validate on ('' to skip validation)")
    g.add_argument("--flow-len", type=int, help="flow images stacked per sample (default: as packed)")
    g.add_argument("--backend", default="auto", choices=["auto", "dali", "cpu"], help="loader: DALI on a GPU, CPU workers otherwise")
    g.add_argument("--workers", type=int, default=4, help="loader worker processes (cpu) or threads (dali)")
    g.add_argument("--scale-jitter", type=float, nargs=2, metavar=("LO", "HI"), help="random short-side scale range, e.g. 0.875 1.15")
    g.add_argument("--no-flip", action="store_true", default=None,
                   help="no horizontal mirroring in training, for classes where left and right differ (recorded "
                        "in the checkpoint: score.py and predict.py then refuse mirrored test-time views)")
    g.add_argument("--segments", type=positive_int, metavar="K",
                   help="TSN's segment sampling: a training sample is a video, seen through K frames, one from each "
                        "of K equal segments of its packed samples (a random place in each; the centre in "
                        "validation), sharing one crop, scale and flip; the loss is taken on the mean of its K "
                        "logits, and --batch-size counts videos (B x K images a step). Videos of fewer than K "
                        "samples repeat some. Default 1: a sample is a frame (a resumed run keeps its own)")
    g.add_argument("--allow-partial", action="store_true",
                   help="train (and validate) on a split packed in part (a --part never run): the log, the "
                        "checkpoints' data and validation figures then say so")
    g.add_argument("--synthetic-data", action="store_true", help="random tensors on the device instead of data: the model-only ceiling")
    g = p.add_argument_group("model")
    g.add_argument("--arch", choices=nets.ARCHS, help="backbone (default: inception_v3, or --init's)")
    g.add_argument("--input-size", type=int, help="crop size fed to the network (default: 299)")
    g.add_argument("--pretrained", help="ImageNet weights: a torchvision .pth file, or 'imagenet' to download")
    g.add_argument("--init", type=Path, metavar="CKPT",
                   help="start from the weights of a train.py checkpoint (same arch and modality; e.g. the Kinetics "
                        "stream, to fine-tune on UCF101): the classifier is kept if the classes are the same, else "
                        "made anew; iterations, optimiser and schedule start afresh")
    g.add_argument("--allow-other-params", action="store_true",
                   help="--init from a stream whose inputs were packed with other parameters (flow method, bound, "
                        "short side) than this data's: recorded in the checkpoint")
    g.add_argument("--freeze-bn", action="store_true", help="batch-norm layers in eval mode (statistics frozen), as the original")
    g.add_argument("--partial-bn", action="store_true", default=None,
                   help="every batch-norm layer in eval mode (statistics frozen) but the first, as TSN trains")
    g.add_argument("--dropout", type=probability, metavar="P",
                   help="dropout probability just before the classifier, in training (TSN: 0.8 for RGB, 0.7 for "
                        "flow; default: the architecture's own, 0.5 for inception_v3 and vgg16_bn, none for resnets)")
    g = p.add_argument_group("optimisation (SGD as the original: biases at 2x lr, no decay)")
    g.add_argument("--batch-size", type=int, default=64,
                   help="samples per iteration on each GPU: frames, or videos with --segments K (B x K images)")
    # Their defaults are in training.run.RUN_FLAGS: with --resume, a flag not given keeps the run's value, and one
    # given anew applies from the resumed iteration on (the schedule rebuilt from it).
    g.add_argument("--lr", type=number(0, above=True), help="base learning rate (default: 0.001)")
    g.add_argument("--momentum", type=number(0, 1), help="SGD momentum (default: 0.9)")
    g.add_argument("--weight-decay", type=number(0), help="weight decay, not on biases or norms (default: 5e-4)")
    g.add_argument("--max-iterations", type=number(1, integer=True), help="iterations to train (default: 500000)")
    g.add_argument("--step-values", type=number(0, integer=True), nargs="*",
                   help="iterations where lr drops (default: 200000 400000)")
    g.add_argument("--gamma", type=number(0, above=True), help="lr factor at each step value (default: 0.1)")
    g.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"], help="mixed precision (auto: bf16 where supported, else fp16; off on CPU)")
    g.add_argument("--channels-last", action="store_true", help="NHWC memory format (faster convolutions on tensor cores)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--cuda-graph", default="auto", choices=["auto", "on", "off"],
                   help="capture the whole step (forward, backward, SGD) once as a CUDA graph and replay it: fewer "
                        "kernel launches (auto: on a single CUDA GPU in bf16 or fp32 without --compile)")
    g.add_argument("--seed", type=int, default=0, help="random seed")
    g.add_argument("--deterministic", action="store_true",
                   help="the same numbers run after run (deterministic kernels, no cuDNN autotuning): slower on a GPU")
    g = p.add_argument_group("validation, checkpoints, logging")
    g.add_argument("--val-every", type=int, default=5000, help="validate every N iterations (and at the end)")
    g.add_argument("--val-batches", type=int, default=50, help="validate on this many fixed batches of the val split")
    g.add_argument("--ckpt-every", type=int, default=5000, help="checkpoint every N iterations (and at the end)")
    g.add_argument("--keep", type=int, default=3, help="keep the last K checkpoints (plus best and latest)")
    g.add_argument("--save-dir", type=Path, default=Path("runs/train"), help="checkpoints, log, TensorBoard, curves")
    g.add_argument("--resume", action="store_true", help="continue from save-dir's latest good checkpoint")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --save-dir (its checkpoints, log and curves are removed first)")
    g.add_argument("--log-every", type=int, default=20,
                   help="log a line every N iterations (the loss is also checked for NaN there)")
    g.add_argument("--visdom", action="store_true", help="also plot to a running Visdom server (pip install visdom)")
    g.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if present)")
    return p


# ---------------------------------------------------------------- set-up


def setup_distributed(args) -> tuple[int, int, torch.device]:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; a plain run is rank 0 of 1."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if args.device:
        device = torch.device(args.device)
    elif torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = not args.deterministic  # fixed input sizes: let cuDNN pick its fastest kernels
    if args.deterministic:  # seeds fix the data and the initial weights; these, the arithmetic
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    if world > 1:
        if "TORCHELASTIC_RUN_ID" in os.environ:  # started by torchrun: a rank dies with it (kill -9 of it included),
            die_with_parent()                    # and its loader workers with the rank
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def amp_dtype(args, device: torch.device) -> torch.dtype | None:
    if args.amp == "off" or (args.amp == "auto" and device.type != "cuda"):
        return None
    if args.amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]


def check_before_work(args, world: int) -> list[str]:
    """Fail fast, before any model or loader is built, on what the user must fix; the class list."""
    if args.resume and args.init:
        raise SystemExit("error: --resume continues a run, --init starts a new one from a checkpoint; give one of them")
    if args.resume and args.overwrite:
        raise SystemExit("error: --resume continues the run in --save-dir, --overwrite replaces it; give one of them")
    if args.init and args.init.resolve().parent == args.save_dir.resolve():
        raise SystemExit(f"error: --init {args.init} lies in --save-dir {args.save_dir}, where this run writes its "
                         f"checkpoints (a run never writes over its own input): copy it elsewhere, or use another "
                         f"--save-dir")
    if args.init and args.pretrained:
        raise SystemExit("error: --init already gives the starting weights; drop --pretrained")
    if args.freeze_bn and args.partial_bn:
        raise SystemExit("error: --freeze-bn freezes every batch-norm layer, --partial-bn all but the first; give one")
    try:
        stream = open_stream(args.data, args.train_split, args.modality, args.flow_len)
        streams = [stream] + ([open_stream(args.data, args.val_split, args.modality, args.flow_len)] if args.val_split else [])
        if not args.synthetic_data:
            check_fills_a_batch(stream, args.batch_size, world, args.segments or 1)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {args.data}/{args.train_split}: {e}") from None
    partial = incomplete_splits(args)
    if partial and not args.allow_partial:
        raise SystemExit(f"error: {'; '.join(partial.values())}; run the missing parts' pack commands, then python -m "
                         f"pack.merge {args.data}, or give --allow-partial to train on what is there (marked in the log "
                         f"and the checkpoints)")
    for s in streams:
        if not s.labelled:
            raise SystemExit(f"error: {args.data}/{s.split} has no labels (every sample's class is -1: packed from "
                             f"an annotation file without labels, such as Kinetics' test CSV); train and validate on "
                             f"labelled splits (--train-split, --val-split '' to skip validation)")
    for option, path in (("--pretrained", args.pretrained if args.pretrained != "imagenet" else None),
                         ("--init", args.init)):
        if path and not Path(path).is_file():
            raise SystemExit(f"error: {option} {path}: no such file")
    if args.visdom and importlib.util.find_spec("visdom") is None:
        raise SystemExit("error: --visdom needs the visdom package (pip install visdom) and a running "
                         "server (python -m visdom.server)")
    check_output_dir(args.save_dir, "--save-dir")
    return stream.classes


def incomplete_splits(args) -> dict[str, str]:
    """The splits this run reads that were packed in part (a --part never run): split -> what is missing."""
    manifest = load_manifest(args.data)
    notes = {split: incomplete_note(manifest["splits"][split]) for split in (args.train_split, args.val_split) if split}
    return {split: f"{args.data}/{split}: {note}" for split, note in notes.items() if note}


def build_loaders(args, run: Run, stream, rank: int, world: int, device: torch.device, dtype):
    """(training batches without end, the training loader or None, the validation loader or None)."""
    if args.synthetic_data:
        return synthetic_batches(args, stream.channels, len(run.classes), device), None, None
    common = dict(crop=args.input_size, backend=args.backend, device=device, flow_len=stream.flow_len, rank=rank,
                  world_size=world, workers=args.workers, fp16=dtype == torch.float16, channels_last=args.channels_last,
                  segments=args.segments)
    # The data order is planned from the seed (loaders.plan): a resumed run goes on from its position.
    position = run.mine["loader"] if run.mine else None
    try:
        train_loader = loaders.build(args.data, args.train_split, args.modality, True, args.batch_size,
                                     scale_jitter=tuple(args.scale_jitter) if args.scale_jitter else None,
                                     flip=not args.no_flip, seed=args.seed, position=position, **common)
    except ValueError as e:
        if position is None:
            raise
        raise SystemExit(f"error: --resume: {e}; give the run's --seed and --batch-size (see its train.log), or "
                         f"start a new run with --init") from None
    val_loader = (loaders.build(args.data, args.val_split, args.modality, False, args.batch_size, **common)
                  if args.val_split else None)
    return forever(train_loader), train_loader, val_loader


def forever(loader):
    """Batches across epochs, without end; an epoch without a batch (all its data bad) is an error.

    A resumed run may start at an epoch's last samples: that rest of an epoch may give none.
    """
    while True:
        batches, whole = 0, loader.position()["served"] == 0
        for batch in loader:
            batches += 1
            yield batch
        if not batches and whole:
            raise SystemExit("error: a training epoch yielded no batch (every sample skipped as bad?); "
                             "see the warnings above")


def synthetic_batches(args, channels: int, classes: int, device: torch.device):
    """Random tensors made once on the device: measures the model alone."""
    images = torch.randn(args.batch_size * args.segments, channels, args.input_size, args.input_size, device=device)
    if args.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, classes, (args.batch_size,), device=device)
    while True:
        yield images, labels, None


# ---------------------------------------------------------------- training


class StopRequest:
    """SIGTERM (a scheduler's preemption, `kill`) asks the run to stop after the step under way, with a checkpoint."""

    def __init__(self):
        self.requested = False

    @contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield self
            return
        previous = signal.signal(signal.SIGTERM, self._handler)
        try:
            yield self
        finally:
            signal.signal(signal.SIGTERM, previous)

    def _handler(self, signum, frame) -> None:
        self.requested = True

    def now(self, world: int, at_line: bool) -> bool:
        """Whether to stop here: at once alone; with DDP at log lines, when any process was asked (all agree)."""
        if world == 1:
            return self.requested
        if not at_line:
            return False
        asked = torch.tensor([float(self.requested)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(asked, op=dist.ReduceOp.MAX)
        return bool(asked.item())


def diverged(args, iteration: int, why: str, at: int) -> SystemExit:
    """The error that stops a run whose numbers are no longer finite, naming the last good checkpoint."""
    saved = sorted(args.save_dir.glob("ckpt-*.pt"))
    last = (f"the last good checkpoint is {saved[-1]}; to go on from its weights with another learning rate, start "
            f"a new run with --init {saved[-1]} (--resume would keep the learning rate)" if saved
            else "no checkpoint was written before it")
    return SystemExit(f"error: {why} at iteration {iteration}; stopped at iteration {at}, nothing saved since: "
                      f"{last}. Lower the learning rate (--lr {args.lr:g} now), or check the data")


def worker_died(error: RuntimeError, iteration: int) -> str:
    """One line for a loader worker that died (the CPU loader says how and where), with what to do."""
    said = "; ".join(line for line in str(error).splitlines() if line.startswith("loader worker "))
    oom = (" (SIGKILL from nobody else is the out-of-memory killer's: dmesg says; fewer --workers or a smaller "
           "--batch-size need less memory)" if "SIGKILL" in said else "")
    return (f"error: a loader worker died at iteration {iteration + 1}: {said}{oom}; run the same command with "
            f"--resume to go on from the last checkpoint")


def save(args, run: Run, done: int, best: bool, train_loader, window: Window, world: int, main_rank: bool) -> None:
    """A checkpoint of iteration `done`, unless its weights are not finite (then the run stops). Every rank calls it.

    It holds each rank's loader position, random state and the losses since the last log
    line: a resumed run draws the batches and logs the losses an unstopped one would.
    """
    bad = nets.non_finite_tensors(run.model.state_dict())
    if bad:
        raise diverged(args, done, f"the weights hold non-finite values ({', '.join(bad[:3])})", done)
    mine = {"loader": train_loader.position() if train_loader is not None else None, "rng": random_state(),
            "unlogged": window.unlogged()}
    ranks = [mine]
    if world > 1:
        ranks = [None] * world
        dist.all_gather_object(ranks, mine)
    if main_rank:
        save_checkpoint(run.state(done, ranks), args.save_dir, args.keep, best=best)


def stop_here(args, run: Run, done: int, logger: Logger, best: bool, train_loader, window: Window,
              world: int) -> None:
    """SIGTERM: a checkpoint of the last step finished, then exit 143 (128 + SIGTERM)."""
    save(args, run, done, best, train_loader, window, world, logger.on)
    logger.line(f"stopped by SIGTERM after iteration {done}, checkpoint written: run the same command with "
                f"--resume to continue")
    raise SystemExit(128 + signal.SIGTERM)


def train(args, run: Run, step, batches, train_loader, val_loader, logger: Logger, stop: StopRequest, world: int,
          device: torch.device, dtype, val_partial: str | None = None) -> dict:
    """The loop: a batch, a step; a log line, validation and a checkpoint every so many iterations.

    val_partial: what of the val split is missing (--allow-partial), carried by every validation figure.
    """
    main_rank = logger.on
    window = Window(args.log_every, device, run.start, run.mine["unlogged"] if run.mine else [])
    totals = {"wait": 0.0, "wall": 0.0, "images": 0}  # the first window (warm-up) is left out
    scale = run.scaler.get_scale() if run.scaler.is_enabled() else None  # fp16: a skipped step lowers it
    skipped_steps = 0
    for iteration in range(run.start, args.max_iterations):
        t0 = time.perf_counter()
        try:
            images, labels, _ = next(batches)
        except RuntimeError as e:  # SIGTERM sent to the whole process group stopped the loader's workers too
            if stop.requested:
                stop_here(args, run, iteration, logger, val_loader is None, train_loader, window, world)
            if str(e).startswith("loader worker "):  # killed (the out-of-memory killer?) or failed: said, no traceback
                raise SystemExit(worker_died(e, iteration)) from None
            raise
        t1 = time.perf_counter()
        window.add(step(images, labels), images.shape[0] * world, t1 - t0)
        run.scheduler.step()
        logger.step()
        done = iteration + 1
        if scale is not None:  # fp16's own host sync already waited for this step: reading the scale is free
            skipped_steps += run.scaler.get_scale() < scale
            scale = run.scaler.get_scale()
            if scale < MIN_LOSS_SCALE:
                raise diverged(args, done, f"the fp16 loss scale fell to {scale:g} ({skipped_steps} steps skipped "
                                           f"for overflowing gradients)", done)

        at_line = done % args.log_every == 0 or done == args.max_iterations
        validate = val_loader is not None and (done % args.val_every == 0 or done == args.max_iterations)
        checkpoint = done % args.ckpt_every == 0 or done == args.max_iterations
        stopping = stop.now(world, at_line)
        if (at_line or validate or checkpoint or stopping) and scale is None:
            bad = window.first_non_finite(world)
            if bad is not None:
                raise diverged(args, bad, "the training loss is not finite", done)
        if at_line:
            elapsed = time.perf_counter() - window.started  # the loss read above waited for the device: real time
            if run.history["train"] or done == args.max_iterations:
                totals["wait"] += window.wait
                totals["wall"] += elapsed
                totals["images"] += window.images
            figures = {"loss": window.mean_loss(), "lr": run.scheduler.get_last_lr()[0],
                       "images_per_s": window.images / elapsed, "data_wait": window.wait / elapsed,
                       **({"skipped_steps": skipped_steps} if scale is not None else {})}
            run.history["train"].append((done, figures["loss"]))
            logger.train(done, figures)
            if done % args.log_every == 0:  # the end's line off the grid: its losses stay for a longer resumed run
                window.reset(done)
        is_best = False
        if validate:
            metrics = evaluate(run.model, val_loader, args.val_batches, dtype, device, world, args.segments)
            if val_partial:
                metrics["partial"] = val_partial
            if args.freeze_bn or args.partial_bn:
                set_bn_eval(run.model, but_first=args.partial_bn)
            run.history["val"].append((done, metrics))
            is_best = metrics["top1"] > run.best
            run.best = max(run.best, metrics["top1"])
            logger.val(done, metrics, is_best)
            window.started = time.perf_counter()  # validation time is not training time
        if stopping:
            stop_here(args, run, done, logger, is_best or val_loader is None, train_loader, window, world)
        if checkpoint or is_best:
            save(args, run, done, is_best or val_loader is None, train_loader, window, world, main_rank)
    return {"iterations": args.max_iterations, "best_val_top1": run.best,
            "images_per_s": totals["images"] / max(totals["wall"], 1e-9),
            "data_wait": totals["wait"] / max(totals["wall"], 1e-9), "fp16_skipped_steps": skipped_steps}


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model: nn.Module, loader, batches: int, dtype, device: torch.device, world: int, segments: int = 1) -> dict:
    """Top-1, top-3 and loss over the first `batches` batches (a fixed subset); a non-finite row counts as wrong.

    Of frames; with segments K > 1 of videos, each scored by the mean of its K frames' logits (as trained).
    """
    model.eval()
    totals = torch.zeros(5, device=device, dtype=torch.float64)  # loss sum, top1, top3, count, non-finite rows
    for i, (images, labels, _) in enumerate(loader):
        if i >= batches:
            break
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = nets.consensus(model(images), segments)
        logits = logits.float()
        finite = torch.isfinite(logits).all(1)
        top = logits.topk(min(3, logits.shape[1]), dim=1).indices
        loss = nn.functional.cross_entropy(logits, labels, reduction="none")
        totals[[0, 1, 2, 4]] += torch.stack([loss.where(finite, 0).sum(), ((top[:, 0] == labels) & finite).sum(),
                                             ((top == labels[:, None]).any(1) & finite).sum(),
                                             (~finite).sum()]).to(totals)  # no host sync
        totals[3] += labels.numel()
    if world > 1:
        dist.all_reduce(totals)
    loss, top1, top3, n, non_finite = totals.tolist()
    model.train()
    return {"loss": loss / max(n - non_finite, 1), "top1": top1 / max(n, 1), "top3": top3 / max(n, 1),
            "samples": int(n), "non_finite": int(non_finite), **({"segments": segments} if segments > 1 else {})}


def batch_words(args) -> str:
    """What a batch is, for the log: frames, or videos of K frames (--segments)."""
    if args.segments == 1:
        return f"{args.batch_size} frames"
    return f"{args.batch_size} videos x {args.segments} segments = {args.batch_size * args.segments} images"


def segments_note(args, stream) -> str:
    """The log's line on --segments K: the sampling, and the videos whose frames repeat (fewer than K samples)."""
    short = sum(n < args.segments for n in stream.video_samples)
    return (f"segments: each video seen through {args.segments} frames, one from each of {args.segments} equal "
            f"segments of its samples (validation: their centres), its {args.segments} logits averaged"
            + (f"; {short} of {len(stream.video_samples)} training videos have fewer than {args.segments} samples: "
               f"some of their frames repeat" if short else ""))


def main(args: argparse.Namespace) -> dict:
    rank, world, device = setup_distributed(args)
    # A requeued job killed before its first save resumes a save-dir without a checkpoint: that starts the run.
    first_start = args.resume and not (args.init or args.overwrite) and not checkpoints(args.save_dir)
    if first_start:
        args.resume = False  # recorded as what ran: a fresh start
    classes = check_before_work(args, world)
    lock = Lock(args.save_dir / ".train.lock").acquire(f"--save-dir {args.save_dir}") if rank == 0 else None
    logger = None
    try:
        replaced = claim_save_dir(args) if rank == 0 else None  # under the lock: no run is using it
        logger = Logger(args, rank == 0)
        if replaced:
            logger.line(replaced)
        if first_start:
            logger.line(f"--resume: no checkpoint in {args.save_dir} yet (the run was stopped before its first save, "
                        f"or this is its first start): starting the run from iteration 0")
        if rank == 0:
            remove_stale_temporaries(args.save_dir, logger.line)
        stream = open_stream(args.data, args.train_split, args.modality, args.flow_len)
        dtype = amp_dtype(args, device)
        run = Run(args, classes, stream.flow_len, rank, world, device, dtype, logger.line)
        graphed, graph_note = graph_decision(args, device, dtype, world)
        model = run.model
        if world > 1:
            model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if args.compile:
            model = torch.compile(model)
        batches, train_loader, val_loader = build_loaders(args, run, stream, rank, world, device, dtype)
        for note in run.notes:  # what a resume applies anew, now that the loaders took its position
            logger.line(note)
        logger.line(f"training {args.arch} on {args.modality} ({stream.channels} channels, {len(classes)} classes), "
                    f"{world} process(es) on {device}, amp {dtype}, batch {batch_words(args)}, "
                    f"iterations {run.start}..{args.max_iterations}")
        if args.segments > 1:
            logger.line(segments_note(args, stream))
        logger.line(f"CUDA graph {graph_note}")
        partial = incomplete_splits(args)
        for note in partial.values():
            logger.line(f"note: {note}; trained on what is there (--allow-partial): its figures are of part of the split")
        logger.line(f"arguments: {json_text(plain_args(args), indent=None)}")
        logger.start(run.start)
        run.model.train()
        if args.freeze_bn or args.partial_bn:
            set_bn_eval(run.model, but_first=args.partial_bn)
        with StopRequest().installed() as stop:
            step = TrainStep(model, run.optimizer, run.scaler, dtype, graphed, strict=args.cuda_graph == "on",
                             log=logger.line, segments=args.segments)
            summary = train(args, run, step, batches, train_loader, val_loader, logger, stop, world, device, dtype,
                            partial.get(args.val_split))
        summary["skipped_samples"] = getattr(train_loader, "skipped", 0)
        if partial:
            summary["partial"] = list(partial.values())
        if rank == 0:
            plot_curves(run.history, args.save_dir / "curves.png")
            logger.line(f"done: {json_text(summary, indent=None)}; checkpoints and curves.png in {args.save_dir}")
    except SystemExit as e:
        if logger is not None and isinstance(e.code, str):
            logger.line(e.code, echo=False)  # the reason goes into train.log too (the exit prints it)
        raise
    finally:
        if logger is not None:
            logger.close()
        if lock is not None:
            lock.release()
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    main(get_args_parser().parse_args())
