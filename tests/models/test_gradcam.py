"""Each model family declares its Grad-CAM target layer; explain asks, and knows no model class."""

import pytest
import torch.nn as nn

from synaug.models.backbones import create_backbone
from synaug.models.gradcam import _FAMILIES, gradcam_method, register_gradcam, target_layers


class TwoConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
        self.head = nn.Linear(4, 2)


def test_a_new_family_registers_its_layer_and_subclasses_inherit_it():
    with pytest.raises(TypeError, match="No Grad-CAM target layer known for TwoConvs"):
        target_layers(TwoConvs())
    register_gradcam(TwoConvs)(lambda m: ([m.body[-1]], None))
    try:

        class Deeper(TwoConvs):
            pass

        model = Deeper()
        assert target_layers(model) == ([model.body[-1]], None)
        assert gradcam_method(model) == "gradcam"
    finally:
        del _FAMILIES[TwoConvs]


def test_the_basic_cnn_declares_its_own_layer_and_method():
    cnn = create_backbone("basic_cnn", num_classes=2, in_chans=1)
    (layer,), reshape = target_layers(cnn)
    assert (
        isinstance(layer, nn.MaxPool2d)
        and layer is [m for m in cnn.features if isinstance(m, nn.MaxPool2d)][-1]
    )
    assert reshape is None and gradcam_method(cnn) == "hirescam"
    assert gradcam_method(create_backbone("resnet18", num_classes=2)) == "gradcam"
