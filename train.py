"""Train one stream (RGB or flow) of the two-stream network from the packed shards.

    python train.py --data DATA --modality rgb --save-dir runs/rgb
    torchrun --nproc-per-node 8 train.py --data DATA --modality flow --save-dir runs/flow

Kill it at any moment and run the same command with --resume: it continues from the
latest good checkpoint with the same learning-rate schedule and ends at the same iteration.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

import loaders
import nets
from loaders.common import check_fills_a_batch, open_stream
from pack.manifest import load_manifest


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
    g.add_argument("--synthetic-data", action="store_true", help="random tensors on the device instead of data: the model-only ceiling")
    g = p.add_argument_group("model")
    g.add_argument("--arch", default="inception_v3", choices=nets.ARCHS, help="backbone")
    g.add_argument("--input-size", type=int, default=299, help="crop size fed to the network")
    g.add_argument("--pretrained", help="ImageNet weights: a torchvision .pth file, or 'imagenet' to download")
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
    g.add_argument("--log-every", type=int, default=20, help="log a line every N iterations")
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


def check_before_work(args, world: int) -> list[str]:
    """Fail fast, before any model or loader is built, on what the user must fix."""
    try:
        stream = open_stream(args.data, args.train_split, args.modality, args.flow_len)
        if args.val_split:
            open_stream(args.data, args.val_split, args.modality, args.flow_len)
        if not args.synthetic_data:
            check_fills_a_batch(stream, args.batch_size, world)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {args.data}/{args.train_split}: {e}") from None
    if not stream.classes:
        raise SystemExit(f"error: {args.data} has no class list (was the training split packed from a labelled CSV?)")
    if args.pretrained and args.pretrained != "imagenet" and not Path(args.pretrained).is_file():
        raise SystemExit(f"error: --pretrained {args.pretrained}: no such file")
    if args.visdom and importlib.util.find_spec("visdom") is None:
        raise SystemExit("error: --visdom needs the visdom package (pip install visdom) and a running "
                         "server (python -m visdom.server)")
    if args.resume and not checkpoints(args.save_dir):
        raise SystemExit(f"error: --resume: no checkpoint in {args.save_dir} to resume from")
    return stream.classes


# ---------------------------------------------------------------- checkpoints


def checkpoints(save_dir: Path) -> list[Path]:
    """Resume candidates, best first: latest, then the numbered ones newest first."""
    numbered = sorted(save_dir.glob("ckpt-*.pt"), reverse=True)
    latest = save_dir / "latest.pt"
    return ([latest] if latest.exists() else []) + numbered


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
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                 dtype: torch.dtype | None, graphed: bool, warmup: int = 3):
        self.model, self.optimizer, self.scaler, self.dtype = model, optimizer, scaler, dtype
        self.graphed, self.warmup, self.steps = graphed, warmup, 0
        self.graph = self.side = None  # the graph, and the side stream it is captured on

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
            return loss
        if self.graph is None:
            self.capture(images, labels)
        self.images.copy_(images, non_blocking=True)
        self.labels.copy_(labels, non_blocking=True)
        for lr, group in zip(self.lrs, self.optimizer.param_groups):
            lr.fill_(group["lr"])
        self.graph.replay()
        return self.loss

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
    """Frame top-1, top-3 and loss over the first `batches` batches (a fixed subset)."""
    model.eval()
    totals = torch.zeros(4, device=device, dtype=torch.float64)  # loss sum, top1, top3, count
    for i, (images, labels, _) in enumerate(loader):
        if i >= batches:
            break
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model(images)
        logits = logits.float()
        top = logits.topk(min(3, logits.shape[1]), dim=1).indices
        totals[:3] += torch.stack([nn.functional.cross_entropy(logits, labels, reduction="sum"),  # no host sync
                                   (top[:, 0] == labels).sum(), (top == labels[:, None]).any(1).sum()]).to(totals)
        totals[3] += labels.numel()
    if world > 1:
        dist.all_reduce(totals)
    loss, top1, top3, n = totals.tolist()
    model.train()
    return {"loss": loss / max(n, 1), "top1": top1 / max(n, 1), "top3": top3 / max(n, 1), "samples": int(n)}


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


def main(args: argparse.Namespace) -> dict:
    rank, world, device = setup_distributed(args)
    main_rank = rank == 0
    args.save_dir.mkdir(parents=True, exist_ok=True)
    log_file = open(args.save_dir / "train.log", "a") if main_rank else None

    def log(line: str) -> None:
        if main_rank:
            tqdm.write(line)
            log_file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")
            log_file.flush()

    classes = check_before_work(args, world)
    resumed = load_checkpoint(args.save_dir, log) if args.resume else None
    if resumed is not None:
        if resumed["classes"] != classes:
            raise SystemExit(f"error: the checkpoint has {len(resumed['classes'])} classes, {args.data} has "
                             f"{len(classes)}: resume with the data it was trained on")
        for flag in ("arch", "modality", "input_size", "flow_len"):  # these must not change mid-run
            setattr(args, flag, resumed["args"][flag])
    start = resumed["iteration"] if resumed else 0

    torch.manual_seed(args.seed + start + rank)
    random.seed(args.seed + start + rank)
    stream = open_stream(args.data, args.train_split, args.modality, args.flow_len)
    args.flow_len = stream.flow_len if args.modality == "flow" else None
    model = nets.build(args.arch, len(classes), args.modality, stream.flow_len,
                       None if resumed else args.pretrained).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(param_groups(model, args), lr=args.lr, momentum=args.momentum)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, args.step_values, args.gamma)
    dtype = amp_dtype(args, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    graphed, graph_note = graph_decision(args, device, dtype, world)
    history = {"train": [], "val": []}
    best = -1.0
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        scaler.load_state_dict(resumed["scaler"])
        history, best = resumed["history"], resumed["best"]
        torch.set_rng_state(resumed["rng"]["torch"])
        random.setstate((resumed["rng"]["python"][0], tuple(resumed["rng"]["python"][1]), resumed["rng"]["python"][2]))
        log(f"resumed from iteration {start} (lr {scheduler.get_last_lr()[0]:g})")
    train_model = model
    if world > 1:
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        train_model = torch.compile(train_model)

    fp16_io = dtype == torch.float16
    loader_args = dict(crop=args.input_size, backend=args.backend, device=device, flow_len=stream.flow_len,
                       rank=rank, world_size=world, workers=args.workers, fp16=fp16_io, channels_last=args.channels_last)
    if args.synthetic_data:
        batches = synthetic_batches(args, stream.channels, len(classes), device)
        train_loader = None
    else:
        # Seeded by the start iteration: a resumed run draws fresh, reproducible batches.
        train_loader = loaders.build(args.data, args.train_split, args.modality, True, args.batch_size,
                                     scale_jitter=tuple(args.scale_jitter) if args.scale_jitter else None,
                                     seed=args.seed + start, **loader_args)
        batches = forever(train_loader)
    val_loader = (loaders.build(args.data, args.val_split, args.modality, False, args.batch_size, **loader_args)
                  if args.val_split and not args.synthetic_data else None)

    writer = visdom = None
    if main_rank:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(args.save_dir / "tensorboard", purge_step=start)
        if args.visdom:
            import visdom as visdom_module

            visdom = visdom_module.Visdom(env=f"train-{args.modality}")
        log(f"training {args.arch} on {args.modality} ({stream.channels} channels, {len(classes)} classes), "
            f"{world} process(es) on {device}, amp {dtype}, batch {args.batch_size}, iterations {start}..{args.max_iterations}")
        log(f"CUDA graph {graph_note}")
        log(f"arguments: {json.dumps(plain_args(args))}")

    pack_params = load_manifest(args.data)["splits"][args.train_split]["params"]  # how the inputs were made

    def state(iteration: int) -> dict:
        return {"iteration": iteration, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "classes": classes,
                "args": plain_args(args), "pack_params": pack_params,
                "history": history, "best": best,
                "rng": {"torch": torch.get_rng_state(), "python": list(random.getstate())}}

    model.train()
    if args.freeze_bn:
        set_bn_eval(model)
    train_step = TrainStep(train_model, optimizer, scaler, dtype, graphed)
    bar = tqdm(range(start, args.max_iterations), initial=start, total=args.max_iterations, disable=not main_rank,
               unit="it", dynamic_ncols=True)
    wait = 0.0  # seconds blocked on data since the last log line
    images_seen, window_start = 0, time.perf_counter()
    loss_sum, steps = torch.zeros((), device=device), 0
    totals = {"wait": 0.0, "wall": 0.0, "images": 0}
    for iteration in bar:
        t0 = time.perf_counter()
        images, labels, _ = next(batches)
        t1 = time.perf_counter()
        loss_sum += train_step(images, labels)
        scheduler.step()
        steps += 1
        images_seen += images.shape[0] * world
        wait += t1 - t0
        done = iteration + 1

        if done % args.log_every == 0 or done == args.max_iterations:
            mean_loss = loss_sum.item() / steps  # .item() waits for the device: the timing below is real
            elapsed = time.perf_counter() - window_start
            if history["train"] or done == args.max_iterations:  # the first window (warm-up) is left out
                totals["wait"] += wait
                totals["wall"] += elapsed
                totals["images"] += images_seen
            lr = scheduler.get_last_lr()[0]
            speed, waiting = images_seen / elapsed, wait / elapsed
            history["train"].append((done, mean_loss))
            if main_rank:
                bar.set_postfix(loss=f"{mean_loss:.3f}", lr=f"{lr:.2g}", img_s=f"{speed:.0f}", data_wait=f"{100 * waiting:.0f}%")
                log_file.write(f"it {done} loss {mean_loss:.4f} lr {lr:.3g} images/s {speed:.1f} data-wait {100 * waiting:.1f}%\n")
                writer.add_scalar("train/loss", mean_loss, done)
                writer.add_scalar("train/lr", lr, done)
                writer.add_scalar("train/images_per_s", speed, done)
                writer.add_scalar("train/data_wait", waiting, done)
                if visdom:
                    visdom.line([mean_loss], [done], win="loss", update="append", opts={"title": "train loss"})
            loss_sum.zero_()
            steps, wait, images_seen, window_start = 0, 0.0, 0, time.perf_counter()

        is_best = False
        if val_loader is not None and (done % args.val_every == 0 or done == args.max_iterations):
            metrics = evaluate(model, val_loader, args.val_batches, dtype, device, world)
            if args.freeze_bn:
                set_bn_eval(model)
            history["val"].append((done, metrics))
            is_best = metrics["top1"] > best
            best = max(best, metrics["top1"])
            log(f"validation at {done}: frame top-1 {metrics['top1']:.3f} top-3 {metrics['top3']:.3f} "
                f"loss {metrics['loss']:.3f} ({metrics['samples']} samples){' best' if is_best else ''}")
            if main_rank:
                for k in ("loss", "top1", "top3"):
                    writer.add_scalar(f"val/{k}", metrics[k], done)
            window_start = time.perf_counter()  # validation time is not training time
        if main_rank and (done % args.ckpt_every == 0 or done == args.max_iterations or is_best):
            save_checkpoint(state(done), args.save_dir, args.keep, best=is_best or val_loader is None)
    bar.close()

    summary = {"iterations": args.max_iterations, "best_val_top1": best,
               "images_per_s": totals["images"] / max(totals["wall"], 1e-9),
               "data_wait": totals["wait"] / max(totals["wall"], 1e-9),
               "skipped_samples": getattr(train_loader, "skipped", 0)}
    if main_rank:
        plot_curves(history, args.save_dir / "curves.png")
        writer.close()
        log(f"done: {json.dumps(summary)}; checkpoints and curves.png in {args.save_dir}")
        log_file.close()
    if world > 1:
        dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    main(get_args_parser().parse_args())
