"""What a checkpoint holds and a resume restores (the run's state), and where a run starts from (--init, --pretrained)."""
from __future__ import annotations

import random
from bisect import bisect_right
from collections import Counter
from pathlib import Path

import torch
from torch import nn

import nets
from pack.annotations import class_difference
from pack.manifest import load_manifest, params_differ, split_identity

from .checkpoints import load_checkpoint, read_checkpoint


# The model's shape and what a sample is: a resumed run keeps its checkpoint's (a flag given anyway must agree).
MODEL_FLAGS = {"arch": "inception_v3", "modality": None, "input_size": 299, "flow_len": None, "no_flip": False,
               "segments": 1, "partial_bn": False, "dropout": None}
# The optimisation's: a resume keeps the run's unless given anew; then they apply from the resumed iteration on.
RUN_FLAGS = {"lr": 0.001, "momentum": 0.9, "weight_decay": 5e-4, "max_iterations": 500_000,
             "step_values": [200_000, 400_000], "gamma": 0.1}
# Flags that say nothing about the run itself (where it writes, how it was started).
NOT_RUN_FLAGS = ("resume", "overwrite", "save_dir", "device", "visdom", "allow_other_params")


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


def settle_run_flags(args, resumed: dict | None) -> dict:
    """The optimisation's flags: as given, else a resumed run's own, else the defaults.

    Returns what a resume was given anew ({name: (the run's value, the new one)}, every flag,
    not only these): each applies from the resumed iteration on, and the log says so. Refused
    here, with the reason, where it cannot apply: --pretrained (the resumed weights are the
    checkpoint's), a smaller --max-iterations than the iterations done, --seed (the data order
    and random state are the run's), and a change of --amp into or out of fp16 (its loss scale
    is the run's state); --batch-size and the world size are refused by the loader's position.
    """
    was = resumed["args"] if resumed is not None else {}
    for name, default in RUN_FLAGS.items():
        if getattr(args, name) is None:
            setattr(args, name, was.get(name, default))
    if resumed is None:
        return {}
    if args.pretrained is not None and args.pretrained != was.get("pretrained"):
        raise SystemExit(f"error: --resume: --pretrained {args.pretrained} sets the weights a new run starts from; the "
                         f"resumed run's come from its checkpoint (it started from --pretrained "
                         f"{was.get('pretrained')}): drop --pretrained, or start a new run")
    args.pretrained = was.get("pretrained")
    if args.max_iterations < resumed["iteration"]:
        raise SystemExit(f"error: --resume: --max-iterations {args.max_iterations}, but the run in {args.save_dir} is "
                         f"at iteration {resumed['iteration']} already: give a larger one")
    if args.seed != was.get("seed", args.seed):
        raise SystemExit(f"error: --resume: --seed {args.seed}, but the run was trained with --seed {was['seed']}: its "
                         f"data order and random state are the run's; drop --seed, or start a new run with --init")
    if "fp16" in {args.amp, was.get("amp", args.amp)} and args.amp != was.get("amp", args.amp):
        raise SystemExit(f"error: --resume: --amp {args.amp}, but the run was trained with --amp {was['amp']}: fp16's "
                         f"loss scale is part of its state; resume with --amp {was['amp']}, or start a new run with --init")
    return {name: (was[name], value) for name, value in plain_args(args).items()
            if name in was and was[name] != value and name not in NOT_RUN_FLAGS}


def check_same_data(args, resumed: dict, classes: list[str], data: dict) -> None:
    """A resumed run goes on with the data it started on: the same classes, the same packed split (when recorded)."""
    if resumed["classes"] != classes:
        raise SystemExit(f"error: the checkpoint has {len(resumed['classes'])} classes, {args.data} has "
                         f"{len(classes)} ({class_difference(resumed['classes'], classes, 'the checkpoint', str(args.data))})"
                         f": resume with the data it was trained on")
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
    nets.set_dropout(model, args.arch, args.dropout)
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
    return model, {"checkpoint": str(args.init), "sha256": init["file_sha256"], "iteration": init["iteration"],
                   "classes": len(init["classes"]), "classifier": "kept" if kept else "new", "data": init.get("data"),
                   "no_flip": bool(init["args"].get("no_flip")), "other_params": args.allow_other_params,
                   "from": init.get("init")}


def random_state() -> dict:
    """This process's random generators (torch's, CUDA's where used, Python's): part of a rank's state."""
    return {"torch": torch.get_rng_state(), "python": list(random.getstate()),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None}


def set_random_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_initialized():
        torch.cuda.set_rng_state(state["cuda"])
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))


def rank_state(args, resumed: dict, rank: int, world: int) -> dict | None:
    """This rank's part of a checkpoint (its loader's position, random state, unlogged losses); None if it predates them.

    The data order is planned per world size (loaders.plan): a run resumes exactly with the
    number of processes it had, and is refused with another.
    """
    ranks = resumed.get("ranks")
    if ranks is None:
        return None
    if len(ranks) != world:
        raise SystemExit(f"error: --resume: the run in {args.save_dir} was trained by {len(ranks)} process(es), this "
                         f"is {world}: its data order is planned per world size; resume with {len(ranks)} "
                         f"(torchrun --nproc-per-node {len(ranks)}), or start a new run with --init")
    mine, where = ranks[rank], ranks[rank].get("loader") if isinstance(ranks[rank], dict) else None
    readable = isinstance(mine, dict) and {"loader", "rng", "unlogged"} <= set(mine) and (
        where is None or all(isinstance(where.get(k), int) for k in ("epoch", "served")))
    if not readable:
        raise SystemExit(f"error: --resume: the latest checkpoint in {args.save_dir} holds a state of process {rank} "
                         f"that train.py does not write (damaged, or edited?): move it aside to resume from the one "
                         f"before, or start a new run with --init")
    return mine


class Run:
    """What a checkpoint holds and a resume restores: the model, optimiser, schedule, loss scale, records, and each
    rank's loader position, random state and losses not yet logged (`mine`)."""

    def __init__(self, args, classes: list[str], flow_len: int, rank: int, world: int, device: torch.device, dtype,
                 log):
        # What it is trained on: the split's identity (its plan's id) and how its inputs were made.
        self.data = split_identity(args.data, load_manifest(args.data), args.train_split)
        self.pack_params = self.data["params"]
        resumed = load_checkpoint(args.save_dir, log) if args.resume else None
        self.mine = None
        if resumed is not None:
            check_same_data(args, resumed, classes, self.data)
            self.mine = rank_state(args, resumed, rank, world)
        init = load_init(args, classes, flow_len, self.data, log) if args.init else None
        settle_model_flags(args, resumed, init)
        anew = settle_run_flags(args, resumed)
        if init is not None and args.no_flip and init["args"].get("no_flip"):
            log(f"--no-flip carried over from --init {args.init} (it was trained without mirroring)")
        if args.modality == "flow":
            args.flow_len = flow_len
        if args.dropout is None:  # the architecture's own (recorded as a number)
            args.dropout = nets.DROPOUT.get(args.arch, 0.0)
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
        self.notes: list[str] = []  # what a resume applied anew: logged once the loaders accept the run's position
        if resumed is not None:
            self.optimizer.load_state_dict(resumed["optimizer"])
            self.scheduler.load_state_dict(resumed["scheduler"])
            self.scaler.load_state_dict(resumed["scaler"])
            self.history, self.best = resumed["history"], resumed["best"]
            set_random_state(self.mine["rng"] if self.mine else resumed["rng"])
            self.notes = self.given_anew(anew, resumed["args"])
            where = self.mine and self.mine["loader"]
            log(f"resumed from iteration {self.start} (lr {self.scheduler.get_last_lr()[0]:g}), "
                + (f"the data from epoch {where['epoch']}, sample {where['served']} of its plan: the batches an "
                   f"unstopped run draws" if where else "the data order afresh (a checkpoint from before planned "
                   "data orders)" if self.mine is None else "synthetic data"))

    def given_anew(self, anew: dict, was: dict) -> list[str]:
        """A resume's new flags, applied from this iteration on, and the log lines that say so: the optimiser's
        settings and the learning-rate schedule rebuilt from --lr, --step-values and --gamma (the rate now is what
        they give here); the records of the shorter run's end dropped where --max-iterations is extended."""
        if not anew:
            return []
        a, notes = self.args, []
        if {"lr", "step_values", "gamma", "momentum", "weight_decay"} & set(anew):
            base, decay = [a.lr, 2 * a.lr, a.lr], [a.weight_decay, 0.0, 0.0]  # param_groups' order
            drops = bisect_right(sorted(a.step_values), self.start)
            for group, lr, wd in zip(self.optimizer.param_groups, base, decay):
                group.update(initial_lr=lr, lr=lr * a.gamma ** drops, momentum=a.momentum, weight_decay=wd)
            s = self.scheduler
            s.milestones, s.gamma, s.base_lrs = Counter(a.step_values), a.gamma, base
            s._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        if "max_iterations" in anew and a.max_iterations > self.start == was["max_iterations"]:
            notes += self.extended(was)
        return [f"--resume: given anew, applied from iteration {self.start} on: "
                + ", ".join(f"{cli_flag(k)} {new} (was {old})" for k, (old, new) in anew.items())
                + f"; the learning rate now {self.scheduler.get_last_lr()[0]:g}"] + notes

    def extended(self, was: dict) -> list[str]:
        """A finished run made longer: its last log line and validation, written at its end off the --log-every and
        --val-every grid, are not ones an unstopped longer run writes: they leave the records (the losses since
        the line before are in the checkpoint), so the lines from here are the longer run's."""
        dropped = []
        if self.start % was["log_every"] and self.history["train"] and self.history["train"][-1][0] == self.start:
            self.history["train"].pop()
            dropped.append("log line")
        if self.start % was["val_every"] and self.history["val"] and self.history["val"][-1][0] == self.start:
            self.history["val"].pop()
            self.best = max([m["top1"] for _, m in self.history["val"]], default=-1.0)
            dropped.append("validation")
        return [f"--max-iterations {was['max_iterations']} -> {self.args.max_iterations}: the {' and '.join(dropped)} "
                f"written at iteration {self.start} as the end of the shorter run are left out of the records, as "
                f"an unstopped run of {self.args.max_iterations} iterations writes none there"] if dropped else []

    def state(self, iteration: int, ranks: list[dict]) -> dict:
        """The checkpoint of iteration `iteration`; ranks: each rank's loader position, random state, unlogged losses."""
        return {"iteration": iteration, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "classes": self.classes,
                "args": plain_args(self.args), "pack_params": self.pack_params, "data": self.data,
                "init": self.init,
                "transform_input": bool(getattr(self.model, "transform_input", False)),
                "history": self.history, "best": self.best, "rng": ranks[0]["rng"], "ranks": ranks}
