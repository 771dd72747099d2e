"""Train one stream (RGB or flow) of the two-stream network from the packed shards.

    python train.py --data DATA --modality rgb --save-dir runs/rgb
    python train.py --data ucf101-1 --modality rgb --init runs/rgb/best.pt --save-dir runs/ucf101-rgb
    torchrun --nproc-per-node 8 train.py --data DATA --modality flow --save-dir runs/flow

Kill it at any moment and run the same command with --resume: it continues from the latest
good checkpoint (weights, optimiser, learning-rate schedule, loss scale, random state) and
ends at the same iteration. SIGTERM (a scheduler's preemption) stops it after the step under
way, with a checkpoint. A loss that is not finite stops it with an error: no checkpoint of
non-finite weights is ever written.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pickle
import random
import shutil
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

import loaders
import nets
from loaders.common import check_fills_a_batch, open_stream
from pack.files import Lock, check_output_dir, file_sha256, json_text
from pack.manifest import load_manifest, params_differ, split_identity

# The model's shape: a resumed run keeps its checkpoint's (a flag given anyway must agree).
MODEL_FLAGS = {"arch": "inception_v3", "modality": None, "input_size": 299, "flow_len": None, "no_flip": False}
# fp16: a loss scale below this means even the unscaled gradients overflow: the run has diverged.
MIN_LOSS_SCALE = 1.0


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
    g = p.add_argument_group("optimisation (SGD as the original: biases at 2x lr, no decay)")
    g.add_argument("--batch-size", type=int, default=64, help="samples per iteration on each GPU")
    g.add_argument("--lr", type=float, default=0.001, help="base learning rate")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--weight-decay", type=float, default=5e-4, help="weight decay (not on biases or norms)")
    g.add_argument("--max-iterations", type=int, default=500_000, help="iterations to train")
    g.add_argument("--step-values", type=int, nargs="*", default=[200_000, 400_000], help="iterations where lr drops")
    g.add_argument("--gamma", type=float, default=0.1, help="lr factor at each step value")
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
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def amp_dtype(args, device: torch.device) -> torch.dtype | None:
    if args.amp == "off" or (args.amp == "auto" and device.type != "cuda"):
        return None
    if args.amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]


def param_groups(model: nn.Module, args) -> list[dict]:
    """The original's Caffe habit: biases at 2x lr without decay; norm layers without decay."""
    weights, biases, norms = [], [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if isinstance(module, nn.modules.batchnorm._NormBase):
                norms.append(param)
            elif name == "bias":
                biases.append(param)
            else:
                weights.append(param)
    return [{"params": weights, "lr": args.lr, "weight_decay": args.weight_decay},
            {"params": biases, "lr": 2 * args.lr, "weight_decay": 0.0},
            {"params": norms, "lr": args.lr, "weight_decay": 0.0}]


def plain_args(args) -> dict:
    """The arguments as JSON and weights_only checkpoints can hold them (paths as strings)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


def cli_flag(name: str) -> str:
    """An argument's command-line spelling: input_size -> --input-size."""
    return "--" + name.replace("_", "-")


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
    try:
        stream = open_stream(args.data, args.train_split, args.modality, args.flow_len)
        streams = [stream] + ([open_stream(args.data, args.val_split, args.modality, args.flow_len)] if args.val_split else [])
        if not args.synthetic_data:
            check_fills_a_batch(stream, args.batch_size, world)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {args.data}/{args.train_split}: {e}") from None
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
    if args.resume and not checkpoints(args.save_dir):
        raise SystemExit(f"error: --resume: no checkpoint in {args.save_dir} to resume from")
    check_output_dir(args.save_dir, "--save-dir")
    return stream.classes


def settle_model_flags(args, resumed: dict | None, init: dict | None) -> None:
    """The model's flags: a resumed run's own (a flag given must agree), else as given, --init's arch, or the defaults."""
    for name, default in MODEL_FLAGS.items():
        given = getattr(args, name)
        if resumed is not None:
            kept = resumed["args"].get(name, default)
            if given is not None and given != kept:
                raise SystemExit(f"error: --resume: {cli_flag(name)} {given}, but the run in {args.save_dir} was trained "
                                 f"with {kept}; drop {cli_flag(name)}, or start a new run in another --save-dir")
            setattr(args, name, kept)
        elif given is None:  # --init's architecture and mirroring carry over (a --no-flip stream stays one)
            carried = name in ("arch", "no_flip") and init is not None
            setattr(args, name, init["args"].get(name, default) if carried else default)


CHECKPOINT_KEYS = ("model", "args", "classes", "iteration")  # what every train.py checkpoint holds


def read_checkpoint(path: Path, flag: str) -> dict:
    """A train.py checkpoint, loaded safely (weights_only), or one line saying what the file is instead."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise SystemExit(f"error: {flag} {path} holds Python objects beyond tensors (a pickle, not a train.py "
                         f"checkpoint): it is not loaded, as it could run code ({str(e).splitlines()[0][:120]})") from None
    except Exception as e:  # cut short, damaged, not a torch file at all
        raise SystemExit(f"error: {flag} {path} does not load ({type(e).__name__}: {str(e)[:160]}): cut short or "
                         f"damaged? copy it again, or take another checkpoint of its run") from None
    if not isinstance(ckpt, dict) or not all(k in ckpt for k in CHECKPOINT_KEYS):
        plain = isinstance(ckpt, dict) and all(isinstance(v, torch.Tensor) for v in ckpt.values())
        what = "a plain state_dict (weights without the run's arguments and classes)" if plain else "not one"
        raise SystemExit(f"error: {flag} {path} is not a train.py checkpoint ({what}); ImageNet weights of a "
                         f"torchvision .pth file go to --pretrained")
    return ckpt


def check_same_data(args, resumed: dict, classes: list[str], data: dict) -> None:
    """A resumed run goes on with the data it started on: the same classes, the same packed split (when recorded)."""
    if resumed["classes"] != classes:
        raise SystemExit(f"error: the checkpoint has {len(resumed['classes'])} classes, {args.data} has "
                         f"{len(classes)}: resume with the data it was trained on")
    was = resumed.get("data")  # checkpoints before provenance do not say
    if was and (was["split"], was["plan"]) != (data["split"], data["plan"]):
        raise SystemExit(f"error: --resume: the run in {args.save_dir} was trained on {was['data']}/{was['split']} "
                         f"(plan {was['plan']}), {args.data}/{args.train_split} is another packed split (plan "
                         f"{data['plan']}): resume with the data it was trained on, or start a new run with --init")


def load_init(args, classes: list[str], flow_len: int, data: dict, log) -> dict:
    """--init's checkpoint, checked against this run: the same architecture, modality and flow length, finite weights."""
    init = read_checkpoint(args.init, "--init")
    a = init["args"]
    bad = nets.non_finite_tensors(init["model"])
    if bad:
        raise SystemExit(f"error: --init {args.init} holds non-finite weights ({', '.join(bad[:3])}): its run "
                         f"diverged; start from an earlier checkpoint of it")
    for name, mine in (("arch", args.arch), ("modality", args.modality)):
        if mine is not None and a[name] != mine:  # no --arch: --init's (settle_model_flags)
            raise SystemExit(f"error: --init {args.init} is a {a[name]} network, this run's {cli_flag(name)} is {mine}")
    if args.modality == "flow" and a["flow_len"] != flow_len:
        raise SystemExit(f"error: --init {args.init} stacks {a['flow_len']} flow images, this run {flow_len} "
                         f"(--flow-len, or the data's)")
    differ = params_differ(init.get("pack_params") or {}, data["params"], args.modality)
    if differ:
        say = (f"--init {args.init} was trained on inputs packed with other parameters than {args.data}'s "
               f"({'; '.join(differ)})")
        if not args.allow_other_params:
            raise SystemExit(f"error: {say}: re-pack the data with the stream's parameters, or give "
                             f"--allow-other-params to fine-tune anyway")
        log(f"note: {say}; going on (--allow-other-params)")
    return init


def build_model(args, classes: list[str], flow_len: int, resumed: dict | None, init: dict | None,
                log) -> tuple[nn.Module, dict | None]:
    """The network: a resumed run's, --init's weights with this run's classifier, or from --pretrained (or scratch).

    Returns it and what it started from (recorded in every checkpoint: --init's checkpoint and its classifier).
    """
    source = resumed or init
    model = nets.build(args.arch, len(classes), args.modality, flow_len, None if source else args.pretrained,
                       transform_input=nets.transform_input_of(source) if source else None)
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        return model, resumed.get("init")
    if init is None:
        return model, None
    weights = dict(init["model"])
    kept = init["classes"] == classes
    if not kept:
        for key in nets.classifier_keys(args.arch):
            del weights[key]
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or set(missing) != (set() if kept else set(nets.classifier_keys(args.arch))):
        raise SystemExit(f"error: --init {args.init}: its weights do not fit this network (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    log(f"initialised from {args.init} (iteration {init['iteration']}, {len(init['classes'])} classes): "
        + (f"all weights, the classifier kept (the same {len(classes)} classes)" if kept else
           f"the backbone; the classifier made anew for the {len(classes)} classes here"))
    return model, {"checkpoint": str(args.init), "sha256": file_sha256(args.init), "iteration": init["iteration"],
                   "classes": len(init["classes"]), "classifier": "kept" if kept else "new", "data": init.get("data"),
                   "no_flip": bool(init["args"].get("no_flip")), "other_params": args.allow_other_params,
                   "from": init.get("init")}


class Run:
    """What a checkpoint holds and a resume restores: the model, optimiser, schedule, loss scale, records."""

    def __init__(self, args, classes: list[str], flow_len: int, rank: int, device: torch.device, dtype, log):
        # What it is trained on: the split's identity (its plan's id) and how its inputs were made.
        self.data = split_identity(args.data, load_manifest(args.data), args.train_split)
        self.pack_params = self.data["params"]
        resumed = load_checkpoint(args.save_dir, log) if args.resume else None
        if resumed is not None:
            check_same_data(args, resumed, classes, self.data)
        init = load_init(args, classes, flow_len, self.data, log) if args.init else None
        settle_model_flags(args, resumed, init)
        if init is not None and args.no_flip and init["args"].get("no_flip"):
            log(f"--no-flip carried over from --init {args.init} (it was trained without mirroring)")
        if args.modality == "flow":
            args.flow_len = flow_len
        self.args, self.classes, self.start = args, classes, resumed["iteration"] if resumed else 0
        torch.manual_seed(args.seed + self.start + rank)  # DDP: rank 0's initial weights are broadcast
        random.seed(args.seed + self.start + rank)
        model, self.init = build_model(args, classes, flow_len, resumed, init, log)
        self.model = model.to(device)
        if args.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.SGD(param_groups(self.model, args), lr=args.lr, momentum=args.momentum)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, args.step_values, args.gamma)
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        self.history, self.best = {"train": [], "val": []}, -1.0
        if resumed is not None:
            self.optimizer.load_state_dict(resumed["optimizer"])
            self.scheduler.load_state_dict(resumed["scheduler"])
            self.scaler.load_state_dict(resumed["scaler"])
            self.history, self.best = resumed["history"], resumed["best"]
            torch.set_rng_state(resumed["rng"]["torch"])
            python = resumed["rng"]["python"]
            random.setstate((python[0], tuple(python[1]), python[2]))
            log(f"resumed from iteration {self.start} (lr {self.scheduler.get_last_lr()[0]:g})")

    def state(self, iteration: int) -> dict:
        return {"iteration": iteration, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "classes": self.classes,
                "args": plain_args(self.args), "pack_params": self.pack_params, "data": self.data,
                "init": self.init,
                "transform_input": bool(getattr(self.model, "transform_input", False)),
                "history": self.history, "best": self.best,
                "rng": {"torch": torch.get_rng_state(), "python": list(random.getstate())}}


def build_loaders(args, run: Run, stream, rank: int, world: int, device: torch.device, dtype):
    """(training batches without end, the training loader or None, the validation loader or None)."""
    if args.synthetic_data:
        return synthetic_batches(args, stream.channels, len(run.classes), device), None, None
    common = dict(crop=args.input_size, backend=args.backend, device=device, flow_len=stream.flow_len, rank=rank,
                  world_size=world, workers=args.workers, fp16=dtype == torch.float16, channels_last=args.channels_last)
    # Seeded by the start iteration: a resumed run draws fresh, reproducible batches.
    train_loader = loaders.build(args.data, args.train_split, args.modality, True, args.batch_size,
                                 scale_jitter=tuple(args.scale_jitter) if args.scale_jitter else None,
                                 flip=not args.no_flip, seed=args.seed + run.start, **common)
    val_loader = (loaders.build(args.data, args.val_split, args.modality, False, args.batch_size, **common)
                  if args.val_split else None)
    return forever(train_loader), train_loader, val_loader


# ---------------------------------------------------------------- checkpoints


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
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


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
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated or corrupt file: say so, fall back
            log(f"checkpoint {path} does not load ({type(e).__name__}: {e}); trying the previous one")
    raise SystemExit(f"error: no checkpoint in {save_dir} loads")


# ---------------------------------------------------------------- training and evaluation


def forever(loader):
    """Batches across epochs, without end; an epoch without a batch (all its data bad) is an error."""
    while True:
        batches = 0
        for batch in loader:
            batches += 1
            yield batch
        if not batches:
            raise SystemExit("error: a training epoch yielded no batch (every sample skipped as bad?); "
                             "see the warnings above")


def synthetic_batches(args, channels: int, classes: int, device: torch.device):
    """Random tensors made once on the device: measures the model alone."""
    images = torch.randn(args.batch_size, channels, args.input_size, args.input_size, device=device)
    if args.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, classes, (args.batch_size,), device=device)
    while True:
        yield images, labels, None


def graph_decision(args, device: torch.device, dtype, world: int) -> tuple[bool, str]:
    """Whether to capture the training step as one CUDA graph, and why (said in the log)."""
    if args.cuda_graph == "off":
        return False, "off (--cuda-graph off)"
    if device.type != "cuda":
        why_not = "it needs a CUDA device"
    elif dtype == torch.float16:
        why_not = "fp16's dynamic loss scale decides on the host whether to skip a step: use --amp bf16"
    elif args.compile:
        why_not = "--compile and a captured step are not combined"
    elif world > 1:
        why_not = "it is not combined with DDP (several processes): each steps eagerly"
    else:
        return True, "on: each step is one CUDA graph replay"
    if args.cuda_graph == "on":
        raise SystemExit(f"error: --cuda-graph on: {why_not}; use --cuda-graph auto or off")
    return False, f"off: {why_not}"


class TrainStep:
    """One training step (forward, loss, backward, SGD step): eager, or one CUDA graph replayed.

    A CUDA graph replays the kernels of the step recorded once, on the same memory, with one
    launch instead of hundreds: each batch is copied into the graph's static input first.
    The first `warmup` steps run eagerly (on a side stream, as capture needs) so that cuDNN's
    autotuning and the momentum buffers are done before the capture. The SGD step in the
    graph is the fused kernel reading each group's learning rate from device memory,
    refreshed from the optimiser's before each replay: the schedule works as in eager mode.
    The loss returned is the graph's own output, overwritten by the next step.
    A capture that raises, or a first replay whose loss is not finite where the eager
    warm-up steps' were, falls back to eager steps (the state before that replay restored, the
    step redone), with one log line; with strict (--cuda-graph on) either is an error.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                 dtype: torch.dtype | None, graphed: bool, warmup: int = 3, strict: bool = False, log=print):
        self.model, self.optimizer, self.scaler, self.dtype = model, optimizer, scaler, dtype
        self.graphed, self.warmup, self.steps, self.strict, self.log = graphed, warmup, 0, strict, log
        self.graph = self.side = None  # the graph, and the side stream it is captured on
        self.warmup_losses = []

    def eager(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # No autocast cache: a graph must cast the weights in each replay, not reuse the capture's casts.
        with torch.autocast(images.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None,
                            cache_enabled=False):
            loss = nets.loss_fn(self.model(images), labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach()

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.steps += 1
        if not self.graphed:
            return self.eager(images, labels)
        if self.steps <= self.warmup:  # on the stream the capture will use: its library handles are made now
            self.side = self.side or torch.cuda.Stream()
            self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side):
                loss = self.eager(images, labels)
            torch.cuda.current_stream().wait_stream(self.side)
            self.warmup_losses.append(loss)
            return loss
        if self.graph is None:
            return self.first_replay(images, labels)
        return self.replay(images, labels)

    def replay(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.images.copy_(images, non_blocking=True)
        self.labels.copy_(labels, non_blocking=True)
        for lr, group in zip(self.lrs, self.optimizer.param_groups):
            lr.fill_(group["lr"])
        self.graph.replay()
        return self.loss

    def first_replay(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Capture, then replay once and check it (one host sync, once), keeping the state before it to undo it."""
        before = [t.detach().clone() for t in self.state()]
        try:
            self.capture(images, labels)
        except Exception as e:  # whatever the capture raised is said, and the run goes on eagerly
            return self.fall_back(f"the capture failed ({type(e).__name__}: {str(e)[:200]})", images, labels, before)
        loss = self.replay(images, labels)
        if not torch.isfinite(loss) and torch.isfinite(torch.stack(self.warmup_losses)).all():
            return self.fall_back("the first replay's loss is not finite, the eager warm-up steps' were", images,
                                  labels, before)
        return loss

    def fall_back(self, why: str, images: torch.Tensor, labels: torch.Tensor, before: list) -> torch.Tensor:
        if self.strict:
            raise SystemExit(f"error: --cuda-graph on: {why}; use --cuda-graph auto (it falls back to eager steps) or off")
        for tensor, saved in zip(self.state(), before):
            tensor.copy_(saved)
        self.graphed = False
        self.graph = self.images = self.labels = self.loss = self.lrs = None  # the graph's memory goes with them
        self.log(f"CUDA graph off from step {self.steps}: {why}; the step redone eagerly, and every step after it")
        return self.eager(images, labels)

    def state(self) -> list[torch.Tensor]:
        """What a step changes: the weights and buffers (batch-norm statistics), the momentum buffers."""
        return list(self.model.state_dict().values()) + [s["momentum_buffer"] for s in self.optimizer.state.values()
                                                          if s.get("momentum_buffer") is not None]

    def capture(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Record one step on static copies of the batch; nothing runs until the first replay."""
        self.images, self.labels = torch.empty_like(images), torch.empty_like(labels)
        groups = self.optimizer.param_groups
        self.lrs = torch.zeros(len(groups), device=images.device)
        saved = [(group["lr"], group["fused"]) for group in groups]
        for group, lr in zip(groups, self.lrs):  # the fused SGD kernel reads a tensor lr at replay time
            group["lr"], group["fused"] = lr, True
        self.optimizer.zero_grad(set_to_none=True)  # the graph's backward allocates the gradients in its pool
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph, stream=self.side):
                self.loss = self.eager(self.images, self.labels)
        finally:
            for group, (lr, fused) in zip(groups, saved):  # the schedule and checkpoints see plain numbers
                group["lr"], group["fused"] = lr, fused


def set_bn_eval(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


@torch.no_grad()
def evaluate(model: nn.Module, loader, batches: int, dtype, device: torch.device, world: int) -> dict:
    """Frame top-1, top-3 and loss over the first `batches` batches (a fixed subset); a non-finite row counts as wrong."""
    model.eval()
    totals = torch.zeros(5, device=device, dtype=torch.float64)  # loss sum, top1, top3, count, non-finite rows
    for i, (images, labels, _) in enumerate(loader):
        if i >= batches:
            break
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model(images)
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
            "samples": int(n), "non_finite": int(non_finite)}


class Window:
    """The steps since the last log line: their losses stay on the device (read once a line, no host sync a step)."""

    def __init__(self, size: int, device: torch.device, first: int):
        self.losses = torch.zeros(size, device=device)
        self.reset(first)

    def reset(self, first: int) -> None:
        self.first, self.steps, self.wait, self.images, self.started = first, 0, 0.0, 0, time.perf_counter()

    def add(self, loss: torch.Tensor, images: int, wait: float) -> None:
        self.losses[self.steps] = loss  # a copy on the device: the graph's loss is overwritten by the next step
        self.steps += 1
        self.images += images
        self.wait += wait

    def first_non_finite(self, world: int) -> int | None:
        """The iteration of the window's first non-finite loss, on any process (a host sync; DDP: all agree)."""
        bad = (~torch.isfinite(self.losses[:self.steps])).nonzero()
        first = torch.tensor([self.first + int(bad[0]) + 1 if len(bad) else 2**62], device=self.losses.device)
        if world > 1:
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        return None if first.item() == 2**62 else first.item()

    def mean_loss(self) -> float:
        finite = self.losses[:self.steps][torch.isfinite(self.losses[:self.steps])]  # fp16's skipped steps left out
        return finite.mean().item() if len(finite) else float("nan")


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


class Logger:
    """Where the run is told, on rank 0: train.log, the progress bar, TensorBoard and, if asked, Visdom."""

    def __init__(self, args, main_rank: bool):
        self.on, self.args = main_rank, args
        self.file = open(args.save_dir / "train.log", "a") if main_rank else None
        self.writer = self.visdom = self.bar = None

    def line(self, text: str, echo: bool = True) -> None:
        if self.on:
            if echo:
                tqdm.write(text)
            self.file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")
            self.file.flush()

    def start(self, first: int) -> None:
        """The progress bar and the plotting sinks, once the run is set up."""
        if not self.on:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(self.args.save_dir / "tensorboard", purge_step=first)
        if self.args.visdom:
            import visdom

            self.visdom = visdom.Visdom(env=f"train-{self.args.modality}")
        self.bar = tqdm(initial=first, total=self.args.max_iterations, unit="it", dynamic_ncols=True)

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update()

    def train(self, iteration: int, figures: dict) -> None:
        if not self.on:
            return
        f = figures
        self.bar.set_postfix(loss=f"{f['loss']:.3f}", lr=f"{f['lr']:.2g}", img_s=f"{f['images_per_s']:.0f}",
                             data_wait=f"{100 * f['data_wait']:.0f}%")
        skipped = f" fp16-skipped-steps {f['skipped_steps']}" if "skipped_steps" in f else ""
        self.file.write(f"it {iteration} loss {f['loss']:.4f} lr {f['lr']:.3g} images/s {f['images_per_s']:.1f} "
                        f"data-wait {100 * f['data_wait']:.1f}%{skipped}\n")
        self.file.flush()  # for tail -f
        for name, value in f.items():
            self.writer.add_scalar(f"train/{name}", value, iteration)
        if self.visdom:
            self.visdom.line([f["loss"]], [iteration], win="loss", update="append", opts={"title": "train loss"})

    def val(self, iteration: int, metrics: dict, is_best: bool) -> None:
        bad = f", {metrics['non_finite']} not finite, counted wrong" if metrics["non_finite"] else ""
        self.line(f"validation at {iteration}: frame top-1 {metrics['top1']:.3f} top-3 {metrics['top3']:.3f} "
                  f"loss {metrics['loss']:.3f} ({metrics['samples']} samples{bad}){' best' if is_best else ''}")
        if self.on:
            for k in ("loss", "top1", "top3"):
                self.writer.add_scalar(f"val/{k}", metrics[k], iteration)

    def close(self) -> None:
        if self.on:
            for sink in (self.bar, self.writer):
                if sink is not None:
                    sink.close()
            self.file.close()


def plot_curves(history: dict, path: Path) -> None:
    """Loss and validation accuracy against iterations, as a PNG next to the checkpoints."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    if history["train"]:
        it, loss = zip(*history["train"])
        ax1.plot(it, loss, label="train loss")
    if history["val"]:
        it, vals = zip(*[(h[0], h[1]) for h in history["val"]])
        ax1.plot(it, [v["loss"] for v in vals], "o-", label="val loss")
        ax2.plot(it, [v["top1"] for v in vals], "o-", label="val frame top-1")
        ax2.plot(it, [v["top3"] for v in vals], "s--", label="val frame top-3")
    ax1.set(xlabel="iteration", ylabel="loss", title="loss")
    ax2.set(xlabel="iteration", ylabel="accuracy", title="validation accuracy", ylim=(0, 1))
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def diverged(args, iteration: int, why: str, at: int) -> SystemExit:
    """The error that stops a run whose numbers are no longer finite, naming the last good checkpoint."""
    saved = sorted(args.save_dir.glob("ckpt-*.pt"))
    last = (f"the last good checkpoint is {saved[-1]}; to go on from its weights with another learning rate, start "
            f"a new run with --init {saved[-1]} (--resume would keep the learning rate)" if saved
            else "no checkpoint was written before it")
    return SystemExit(f"error: {why} at iteration {iteration}; stopped at iteration {at}, nothing saved since: "
                      f"{last}. Lower the learning rate (--lr {args.lr:g} now), or check the data")


def save(args, run: Run, done: int, best: bool) -> None:
    """A checkpoint of iteration `done`, unless its weights are not finite (then the run stops)."""
    bad = nets.non_finite_tensors(run.model.state_dict())
    if bad:
        raise diverged(args, done, f"the weights hold non-finite values ({', '.join(bad[:3])})", done)
    save_checkpoint(run.state(done), args.save_dir, args.keep, best=best)


def stop_here(args, run: Run, done: int, logger: Logger, best: bool) -> None:
    """SIGTERM: a checkpoint of the last step finished, then exit 143 (128 + SIGTERM)."""
    if logger.on:
        save(args, run, done, best)
    logger.line(f"stopped by SIGTERM after iteration {done}, checkpoint written: run the same command with "
                f"--resume to continue")
    raise SystemExit(128 + signal.SIGTERM)


def train(args, run: Run, step, batches, val_loader, logger: Logger, stop: StopRequest, world: int,
          device: torch.device, dtype) -> dict:
    """The loop: a batch, a step; a log line, validation and a checkpoint every so many iterations."""
    main_rank = logger.on
    window = Window(args.log_every, device, run.start)
    totals = {"wait": 0.0, "wall": 0.0, "images": 0}  # the first window (warm-up) is left out
    scale = run.scaler.get_scale() if run.scaler.is_enabled() else None  # fp16: a skipped step lowers it
    skipped_steps = 0
    for iteration in range(run.start, args.max_iterations):
        t0 = time.perf_counter()
        try:
            images, labels, _ = next(batches)
        except RuntimeError:  # SIGTERM sent to the whole process group stopped the loader's workers too
            if not stop.requested:
                raise
            stop_here(args, run, iteration, logger, val_loader is None)
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
            window.reset(done)
        is_best = False
        if validate:
            metrics = evaluate(run.model, val_loader, args.val_batches, dtype, device, world)
            if args.freeze_bn:
                set_bn_eval(run.model)
            run.history["val"].append((done, metrics))
            is_best = metrics["top1"] > run.best
            run.best = max(run.best, metrics["top1"])
            logger.val(done, metrics, is_best)
            window.started = time.perf_counter()  # validation time is not training time
        if stopping:
            stop_here(args, run, done, logger, is_best or val_loader is None)
        if main_rank and (checkpoint or is_best):
            save(args, run, done, is_best or val_loader is None)
    return {"iterations": args.max_iterations, "best_val_top1": run.best,
            "images_per_s": totals["images"] / max(totals["wall"], 1e-9),
            "data_wait": totals["wait"] / max(totals["wall"], 1e-9), "fp16_skipped_steps": skipped_steps}


def main(args: argparse.Namespace) -> dict:
    rank, world, device = setup_distributed(args)
    classes = check_before_work(args, world)
    lock = Lock(args.save_dir / ".train.lock").acquire(f"--save-dir {args.save_dir}") if rank == 0 else None
    logger = None
    try:
        replaced = claim_save_dir(args) if rank == 0 else None  # under the lock: no run is using it
        logger = Logger(args, rank == 0)
        if replaced:
            logger.line(replaced)
        if rank == 0:
            remove_stale_temporaries(args.save_dir, logger.line)
        stream = open_stream(args.data, args.train_split, args.modality, args.flow_len)
        dtype = amp_dtype(args, device)
        run = Run(args, classes, stream.flow_len, rank, device, dtype, logger.line)
        graphed, graph_note = graph_decision(args, device, dtype, world)
        model = run.model
        if world > 1:
            model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if args.compile:
            model = torch.compile(model)
        batches, train_loader, val_loader = build_loaders(args, run, stream, rank, world, device, dtype)
        logger.line(f"training {args.arch} on {args.modality} ({stream.channels} channels, {len(classes)} classes), "
                    f"{world} process(es) on {device}, amp {dtype}, batch {args.batch_size}, "
                    f"iterations {run.start}..{args.max_iterations}")
        logger.line(f"CUDA graph {graph_note}")
        logger.line(f"arguments: {json_text(plain_args(args), indent=None)}")
        logger.start(run.start)
        run.model.train()
        if args.freeze_bn:
            set_bn_eval(run.model)
        with StopRequest().installed() as stop:
            step = TrainStep(model, run.optimizer, run.scaler, dtype, graphed, strict=args.cuda_graph == "on",
                             log=logger.line)
            summary = train(args, run, step, batches, val_loader, logger, stop, world, device, dtype)
        summary["skipped_samples"] = getattr(train_loader, "skipped", 0)
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
