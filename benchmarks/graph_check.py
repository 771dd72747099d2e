"""Check on a GPU that train.py's graphed step computes what its eager step does.

    python benchmarks/graph_check.py [--steps 20]

Trains the same ResNet-18 (flow x5 input, bf16, channels-last) from the same weights on the
same batches twice, eagerly and as one CUDA graph replayed, across a learning-rate step
(at half the steps, x0.1), and prints how far apart the losses and the weights end up.
Without a GPU both runs are eager: it only checks that the script runs.
"""
from __future__ import annotations

import argparse
import copy

import torch

import nets
from training.run import param_groups
from training.step import TrainStep


def run(model: torch.nn.Module, graphed: bool, steps: int, device: torch.device) -> tuple[list[float], torch.nn.Module]:
    model = copy.deepcopy(model)
    args = argparse.Namespace(lr=0.01, weight_decay=5e-4)
    optimizer = torch.optim.SGD(param_groups(model, args), lr=args.lr, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [steps // 2], 0.1)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    step = TrainStep(model, optimizer, scaler, torch.bfloat16, graphed)
    batches = torch.Generator(device=device).manual_seed(1)
    losses = []
    for _ in range(steps):
        images = torch.randn(16, 15, 112, 112, device=device, generator=batches).contiguous(memory_format=torch.channels_last)
        labels = torch.randint(0, 10, (16,), device=device, generator=batches)
        losses.append(step(images, labels).item())
        scheduler.step()
    return losses, model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="training steps (the learning rate drops at half)")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.deterministic = True
    torch.manual_seed(0)
    model = nets.build("resnet18", 10, "flow", 5).to(device).to(memory_format=torch.channels_last).train()
    eager_losses, eager = run(model, False, args.steps, device)
    graph_losses, graphed = run(model, device.type == "cuda", args.steps, device)
    loss_gap = max(abs(a - b) / abs(a) for a, b in zip(eager_losses, graph_losses))
    weight_gap = max(((a.float() - b.float()).norm() / a.float().norm().clamp_min(1e-12)).item()
                     for a, b in zip(eager.state_dict().values(), graphed.state_dict().values()) if a.is_floating_point())
    start = [p.detach().clone() for p in model.parameters()]
    moved = sum((p.detach() - s).norm().item() for p, s in zip(graphed.parameters(), start))
    print(f"device {device}; graphed: {device.type == 'cuda'}; {args.steps} steps, lr x0.1 at {args.steps // 2}")
    print(f"losses eager {eager_losses[0]:.4f} .. {eager_losses[-1]:.4f}, graphed {graph_losses[0]:.4f} .. {graph_losses[-1]:.4f}")
    print(f"largest relative difference: loss {loss_gap:.2e}, weights {weight_gap:.2e} (weights moved {moved:.3f} in all)")
    print("graph check: " + ("PASS" if loss_gap < 2e-2 and weight_gap < 2e-2 and moved > 0 else "FAIL"))


if __name__ == "__main__":
    main()
