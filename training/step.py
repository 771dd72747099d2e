"""One training step, eager or as a CUDA graph replayed, and whether to graph it."""
from __future__ import annotations

import torch
from torch import nn

import nets


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
    segments K > 1: a batch is B videos of K images each (B x K rows, B labels); the loss is
    taken on the consensus, the mean of each video's K logits (nets.consensus), in both modes.
    A capture that raises, or a first replay whose loss is not finite where the eager
    warm-up steps' were, falls back to eager steps (the state before that replay restored, the
    step redone), with one log line; with strict (--cuda-graph on) either is an error.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                 dtype: torch.dtype | None, graphed: bool, warmup: int = 3, strict: bool = False, log=print,
                 segments: int = 1):
        self.model, self.optimizer, self.scaler, self.dtype, self.segments = model, optimizer, scaler, dtype, segments
        self.graphed, self.warmup, self.steps, self.strict, self.log = graphed, warmup, 0, strict, log
        self.graph = self.side = None  # the graph, and the side stream it is captured on
        self.warmup_losses = []

    def eager(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # No autocast cache: a graph must cast the weights in each replay, not reuse the capture's casts.
        with torch.autocast(images.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None,
                            cache_enabled=False):
            loss = nets.loss_fn(nets.consensus(self.model(images), self.segments), labels)
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


def set_bn_eval(model: nn.Module, but_first: bool = False) -> None:
    """Batch-norm layers in eval mode (statistics frozen): all (--freeze-bn), or all but the first (--partial-bn, TSN)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms[1 if but_first else 0:]:
        m.eval()
