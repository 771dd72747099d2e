"""Two-stream backbones: torchvision ImageNet models taking RGB or stacked-flow input.

    model = nets.build("inception_v3", num_classes=400, modality="flow", flow_len=5,
                       pretrained="inception_v3_google-0cc3c7bd.pth")
"""
from __future__ import annotations

import functools
import operator
from pathlib import Path

import torch
import torchvision
from torch import nn

ARCHS = ("inception_v3", "resnet18", "resnet50", "resnet101", "vgg16_bn")
# Where each architecture keeps its first convolution and its classifier(s).
FIRST_CONV = {"inception_v3": "Conv2d_1a_3x3.conv", "vgg16_bn": "features.0"}
CLASSIFIERS = {"inception_v3": ["fc", "AuxLogits.fc"], "vgg16_bn": ["classifier.6"]}
AUX_WEIGHT = 0.4  # InceptionV3's auxiliary head, in training
# The dropout torchvision puts before an architecture's classifier (--dropout sets it; the others have none).
DROPOUT = {"inception_v3": 0.5, "vgg16_bn": 0.5}


def _get(model: nn.Module, path: str) -> nn.Module:
    return operator.attrgetter(path)(model)


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(_get(model, parent) if parent else model, name, module)


class PaddedInputConv2d(nn.Conv2d):
    """A first convolution whose input channels are zero-padded to a multiple of 8 on the GPU.

    Tensor-core convolutions in half precision and channels-last want a channel count that
    is a multiple of 8; for 15 (flow x5) cuDNN falls back to slower kernels. The zeros are
    added on the fly to the input and the weights, so the parameters (and checkpoints) keep
    the real channel count and the output is the same.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.padded(x) if x.is_cuda and self.in_channels % 8 else super().forward(x)

    def padded(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        wide = x.new_zeros((n, -(-c // 8) * 8, h, w)).contiguous(
            memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        wide[:, :c] = x
        weight = self.weight.new_zeros((self.out_channels, wide.shape[1], *self.kernel_size))
        weight[:, :c] = self.weight
        return self._conv_forward(wide, weight, self.bias)


def cross_modality(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """A first layer for stacked flow: the RGB filters averaged over colour, repeated (as TSN does)."""
    new = PaddedInputConv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, conv.bias is not None)
    with torch.no_grad():
        new.weight.copy_(conv.weight.mean(dim=1, keepdim=True).expand(-1, in_channels, -1, -1))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    return new


def build(arch: str, num_classes: int, modality: str = "rgb", flow_len: int = 1,
          pretrained: str | Path | None = None, transform_input: bool | None = None) -> nn.Module:
    """A torchvision `arch` for `num_classes`, 3 input channels for rgb or 3 x flow_len for flow.

    pretrained: None (random init), a local torchvision ImageNet state dict (.pth), or
    "imagenet" for torchvision's weights API (downloads once, needs internet).
    transform_input (InceptionV3): whether the network maps its inputs to Google's [-1, 1]
    range; default: for RGB from ImageNet weights. A network rebuilt from a checkpoint must
    keep what it was trained with (transform_input_of), it is not among the weights.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose from {', '.join(ARCHS)}")
    kwargs = {"aux_logits": True, "init_weights": pretrained is None} if arch == "inception_v3" else {}
    if pretrained == "imagenet":
        weights = torchvision.models.get_model_weights(arch).DEFAULT
        model = torchvision.models.get_model(arch, weights=weights, **kwargs)
    else:
        model = torchvision.models.get_model(arch, weights=None, **kwargs)
        if pretrained is not None:
            path = Path(pretrained)
            if not path.is_file():
                raise FileNotFoundError(f"pretrained weights {path} not found (give a torchvision ImageNet "
                                        f".pth state dict, or 'imagenet' to download)")
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    if arch == "inception_v3":
        # Google's weights expect inputs in [-1, 1]; transform_input maps ImageNet-normalised
        # RGB there. Flow is not RGB, so it is fed as it comes.
        model.transform_input = (pretrained is not None and modality == "rgb") if transform_input is None else transform_input
    if modality == "flow":
        path = FIRST_CONV.get(arch, "conv1")
        _set(model, path, cross_modality(_get(model, path), 3 * flow_len))
    for path in CLASSIFIERS.get(arch, ["fc"]):
        old = _get(model, path)
        _set(model, path, nn.Linear(old.in_features, num_classes))
    return model


def transform_input_of(ckpt: dict) -> bool:
    """Whether a train.py checkpoint's InceptionV3 maps its inputs (see build); older checkpoints say it through their arguments."""
    if "transform_input" in ckpt:
        return ckpt["transform_input"]
    a = ckpt["args"]
    return a["arch"] == "inception_v3" and a.get("pretrained") is not None and a["modality"] == "rgb"


def non_finite_tensors(state: dict[str, torch.Tensor]) -> list[str]:
    """The names of a state dict's float tensors that hold NaN or inf (one host sync when there are none)."""
    floats = {k: v for k, v in state.items() if v.is_floating_point()}
    if torch.stack([torch.isfinite(v).all() for v in floats.values()]).all():
        return []
    return [k for k, v in floats.items() if not torch.isfinite(v).all()]


def classifier_keys(arch: str) -> list[str]:
    """The state-dict keys of an architecture's classifier layers (made anew for another class list)."""
    return [f"{path}.{p}" for path in CLASSIFIERS.get(arch, ["fc"]) for p in ("weight", "bias")]


def set_dropout(model: nn.Module, arch: str, p: float) -> None:
    """The dropout just before the classifier at probability p (TSN: 0.8 for RGB, 0.7 for flow); no weight changes.

    InceptionV3 and VGG have one there (torchvision's 0.5): its p is set. The ResNets have
    none: the classifier's input is dropped out in training (a hook, not a layer, so the
    state dict, --init and score.py are unchanged).
    """
    if arch == "inception_v3":
        model.dropout.p = p
    elif arch == "vgg16_bn":
        model.classifier[5].p = p
    elif p:
        _get(model, CLASSIFIERS.get(arch, ["fc"])[0]).register_forward_pre_hook(functools.partial(_dropout, p))


def _dropout(p: float, module: nn.Module, inputs: tuple) -> tuple:
    return (nn.functional.dropout(inputs[0], p, module.training),)


def consensus(outputs, k: int):
    """TSN's segmental consensus: the mean of each video's K logits (its rows b*K .. b*K+K-1), of InceptionV3's
    auxiliary head's likewise; k = 1: the outputs as they are."""
    if k == 1:
        return outputs
    if isinstance(outputs, torchvision.models.InceptionOutputs):
        return torchvision.models.InceptionOutputs(consensus(outputs.logits, k), consensus(outputs.aux_logits, k))
    return outputs.unflatten(0, (-1, k)).mean(1)


def loss_fn(outputs, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy; InceptionV3 in training adds its auxiliary head's at weight 0.4."""
    if isinstance(outputs, torchvision.models.InceptionOutputs):
        return (nn.functional.cross_entropy(outputs.logits, labels)
                + AUX_WEIGHT * nn.functional.cross_entropy(outputs.aux_logits, labels))
    return nn.functional.cross_entropy(outputs, labels)
