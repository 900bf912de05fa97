"""The basic CNN of thesis 2: 2 x [conv, ReLU, max-pool], then 2 hidden fully connected layers.

Registered with timm so that it is built by name like every other backbone (`create_model("basic_cnn")`),
and follows timm's interface: `num_classes=0` returns the last hidden layer as features.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.models import register_model


class BasicCNN(nn.Module):
    def __init__(
        self,
        num_classes: int = 1000,
        in_chans: int = 3,
        channels: tuple[int, int] = (32, 64),
        hidden: tuple[int, int] = (256, 128),
        drop_rate: float = 0.0,
    ):
        super().__init__()
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, c1, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            # Pooling to a fixed 8x8 keeps the parameter count independent of the image size.
            nn.AdaptiveAvgPool2d(8),
            nn.Flatten(),
        )
        self.hidden = nn.Sequential(
            nn.Linear(c2 * 64, hidden[0]),
            nn.ReLU(inplace=True),
            nn.Dropout(drop_rate),
            nn.Linear(hidden[0], hidden[1]),
            nn.ReLU(inplace=True),
            nn.Dropout(drop_rate),
        )
        self.num_features = hidden[1]
        self.num_classes = num_classes
        self.fc = nn.Linear(hidden[1], num_classes) if num_classes > 0 else nn.Identity()

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def get_classifier(self) -> nn.Module:
        return self.fc

    # Its head flattens the last feature map into fully connected layers, so each position has its own weights:
    # Grad-CAM's gradients averaged over space can miss (or cancel) what the model used; HiResCAM keeps the
    # gradient per position and is exact there.
    gradcam_method = "hirescam"

    def gradcam_layers(self) -> tuple[list[nn.Module], None]:
        """Grad-CAM's target (`synaug.models.gradcam`): the output of the last conv block (conv, ReLU, pool)."""
        return [[m for m in self.features if isinstance(m, nn.MaxPool2d)][-1]], None

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.hidden(self.features(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model
def basic_cnn(pretrained: bool = False, **kwargs) -> BasicCNN:
    if pretrained:
        raise ValueError("basic_cnn has no pretrained weights; set pretrained: false")
    kwargs = {
        k: v for k, v in kwargs.items() if k not in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")
    }
    return BasicCNN(**kwargs)
