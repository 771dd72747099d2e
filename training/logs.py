"""Where a run is told: train.log, the progress bar, TensorBoard, Visdom, curves.png; the losses since the last line."""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm


class Window:
    """The steps since the last log line: their losses stay on the device (read once a line, no host sync a step)."""

    def __init__(self, size: int, device: torch.device, first: int, unlogged: list[float] = ()):
        """unlogged: a resumed run's losses since its last log line (they belong to its next one; resumed with
        another --log-every, those since the last line it would have written)."""
        unlogged = list(unlogged)[max(0, len(unlogged) - first % size):]
        self.losses = torch.zeros(size, device=device)
        self.reset(first - len(unlogged))
        self.losses[:len(unlogged)] = torch.tensor(unlogged, dtype=self.losses.dtype)
        self.steps = len(unlogged)

    def reset(self, first: int) -> None:
        self.first, self.steps, self.wait, self.images, self.started = first, 0, 0.0, 0, time.perf_counter()

    def add(self, loss: torch.Tensor, images: int, wait: float) -> None:
        self.losses[self.steps] = loss  # a copy on the device: the graph's loss is overwritten by the next step
        self.steps += 1
        self.images += images
        self.wait += wait

    def unlogged(self) -> list[float]:
        """The losses since the last log line (a host sync): a checkpoint keeps them for its resumed run's next line."""
        return self.losses[:self.steps].tolist()

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
        bad += f"; partial: {metrics['partial']}" if "partial" in metrics else ""
        what, unit = ("video", "videos") if metrics.get("segments", 1) > 1 else ("frame", "samples")  # --segments K
        self.line(f"validation at {iteration}: {what} top-1 {metrics['top1']:.3f} top-3 {metrics['top3']:.3f} "
                  f"loss {metrics['loss']:.3f} ({metrics['samples']} {unit}{bad}){' best' if is_best else ''}")
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
