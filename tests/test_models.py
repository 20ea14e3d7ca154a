"""Model registry: every family builds, adapts to the data, and fails clearly on bad names."""

from __future__ import annotations

import pytest
import torch

from raycls.models import build_model, list_models


@pytest.mark.parametrize("size,channels", [(8, 1), (28, 1), (32, 3)])
def test_resnet_small_fits_every_dataset_shape(size, channels):
    model = build_model("resnet_small", 10, channels, size, width=8)
    assert model(torch.randn(3, channels, size, size)).shape == (3, 10)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_torchvision_models_adapt_to_grey_small_images(name):
    model = build_model(name, 7, 1, 28).eval()
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 7)


def test_resnet18_gets_a_small_image_stem():
    model = build_model("resnet18", 10, 3, 32)
    assert model.net.conv1.stride == (1, 1) and isinstance(model.net.maxpool, torch.nn.Identity)


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match="unknown model 'resnet_big'; valid models: resnet_small"):
        build_model("resnet_big", 10, 3, 32)
    assert "resnet_small" in list_models() and "vgg11_bn" in list_models()


def test_pretrained_weights_file_replaces_the_head(tmp_path):
    import torchvision

    donor = torchvision.models.get_model("mobilenet_v3_small", weights=None)
    torch.nn.init.constant_(donor.features[0][0].weight, 0.125)
    weights = tmp_path / "mobilenet_v3_small.pth"
    torch.save(donor.state_dict(), weights)
    model = build_model("mobilenet_v3_small", 5, 3, 32, pretrained=str(weights))
    assert torch.all(model.net.features[0][0].weight == 0.125)  # the file's weights are used
    assert model.net.classifier[-1].out_features == 5  # with a fresh head for our classes
    with pytest.raises(ValueError, match="--pretrained 'missing.pth': no such file"):
        build_model("mobilenet_v3_small", 5, 3, 32, pretrained="missing.pth")
    with pytest.raises(ValueError, match="torchvision models only"):
        build_model("resnet_small", 5, 3, 32, pretrained=str(weights))
