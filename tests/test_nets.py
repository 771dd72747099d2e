import pytest
import torch
import torchvision

import nets


def test_cross_modality_initialisation_from_a_local_weights_file(tmp_path):
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save(reference.state_dict(), path)
    model = nets.build("resnet18", num_classes=7, modality="flow", flow_len=5, pretrained=path)
    rgb = reference.conv1.weight
    assert model.conv1.weight.shape == (64, 15, 7, 7)
    expected = rgb.mean(dim=1, keepdim=True).expand(-1, 15, -1, -1)
    assert torch.allclose(model.conv1.weight, expected)
    assert torch.equal(model.layer1[0].conv1.weight, reference.layer1[0].conv1.weight)  # the rest is loaded as is
    assert model.fc.out_features == 7
    assert model(torch.randn(2, 15, 64, 64)).shape == (2, 7)


def test_rgb_keeps_imagenet_first_layer(tmp_path):
    reference = torchvision.models.resnet18(weights=None)
    torch.save(reference.state_dict(), tmp_path / "w.pth")
    model = nets.build("resnet18", 3, "rgb", pretrained=tmp_path / "w.pth")
    assert torch.equal(model.conv1.weight, reference.conv1.weight)


def test_inception_v3_flow_with_aux_head_and_loss():
    model = nets.build("inception_v3", num_classes=5, modality="flow", flow_len=2)
    assert model.Conv2d_1a_3x3.conv.in_channels == 6 and not model.transform_input
    model.train()
    out = model(torch.randn(2, 6, 299, 299))
    assert out.logits.shape == out.aux_logits.shape == (2, 5)
    labels = torch.tensor([0, 3])
    loss = nets.loss_fn(out, labels)
    expected = (torch.nn.functional.cross_entropy(out.logits, labels)
                + 0.4 * torch.nn.functional.cross_entropy(out.aux_logits, labels))
    assert torch.allclose(loss, expected)


def test_vgg16_bn_flow_input():
    model = nets.build("vgg16_bn", 4, "flow", flow_len=3)
    assert model.features[0].in_channels == 9 and model.classifier[6].out_features == 4


def test_errors():
    with pytest.raises(FileNotFoundError, match="not found"):
        nets.build("resnet18", 3, pretrained="/nowhere/weights.pth")
    with pytest.raises(ValueError, match="unknown arch"):
        nets.build("alexnet", 3)


@pytest.mark.parametrize("channels_last", [False, True])
def test_flow_first_layer_padded_to_8_channels_gives_the_same_output(channels_last):
    """On the GPU the flow network's first layer pads 15 channels to 16 (faster kernels): the same output, the same parameters."""
    model = nets.build("inception_v3", num_classes=5, modality="flow", flow_len=5)
    conv = model.Conv2d_1a_3x3.conv
    assert isinstance(conv, nets.PaddedInputConv2d) and conv.weight.shape == (32, 15, 3, 3)
    assert "Conv2d_1a_3x3.conv.weight" in model.state_dict()
    x = torch.randn(2, 15, 41, 37)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    assert torch.allclose(conv.padded(x), conv(x), atol=1e-5)
