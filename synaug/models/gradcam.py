"""Which layer Grad-CAM explains, declared by each model family: a family of ours says so itself (a
`gradcam_layers()` method, as `BasicCNN` has), a timm family is registered here with `register_gradcam`.
`synaug.evaluation.explain` asks `target_layers(model)` and knows no model class.

There is no generic fallback, because a wrong layer (e.g. the patch-embedding conv of a transformer) gives maps
that look plausible and mean nothing: an unknown family is an error naming it.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn as nn
from timm.models.resnet import ResNet
from timm.models.vision_transformer import VisionTransformer

Reshape = Callable[[torch.Tensor], torch.Tensor] | None
_FAMILIES: dict[type, Callable[[nn.Module], tuple[list[nn.Module], Reshape]]] = {}


def register_gradcam(family: type):
    """Decorator: `fn(model) -> (target layers, reshape transform or None)` for models of class `family`."""

    def add(fn):
        _FAMILIES[family] = fn
        return fn

    return add


def target_layers(model: nn.Module) -> tuple[list[nn.Module], Reshape]:
    """The Grad-CAM target layers of `model` and the reshape transform its activations need."""
    if hasattr(model, "gradcam_layers"):
        return model.gradcam_layers()
    for cls in type(model).__mro__:
        if cls in _FAMILIES:
            return _FAMILIES[cls](model)
    raise TypeError(
        f"No Grad-CAM target layer known for {type(model).__name__}; supported: "
        f"{', '.join(sorted(['BasicCNN', *(c.__name__ for c in _FAMILIES)]))} (see synaug.models.gradcam)"
    )


def gradcam_method(model: nn.Module) -> str:
    """The CAM method a family's maps are right with: its `gradcam_method` attribute, else Grad-CAM."""
    return getattr(model, "gradcam_method", "gradcam")


@register_gradcam(ResNet)
def _resnet(model: ResNet) -> tuple[list[nn.Module], Reshape]:
    # Any depth (resnet10t, SE/ResNeXt variants): the last block of `layer4`, the highest-level features
    # that still have a spatial grid.
    return [model.layer4[-1]], None


@register_gradcam(VisionTransformer)
def _vit(model: VisionTransformer) -> tuple[list[nn.Module], Reshape]:
    # With a class-token head the last block's output patch tokens never reach the logits, so their gradients
    # are zero; the input of the last attention (norm1) is where patch tokens still matter. The transform drops
    # the prefix (class, register, distillation) tokens and lays the patch tokens out on the patch grid.
    reshape = partial(
        tokens_to_grid,
        num_prefix_tokens=model.num_prefix_tokens,
        grid_size=tuple(model.patch_embed.grid_size),
    )
    return [model.blocks[-1].norm1], reshape


def tokens_to_grid(tokens: torch.Tensor, num_prefix_tokens: int, grid_size: tuple[int, int]) -> torch.Tensor:
    """(N, prefix + H*W, C) tokens to the (N, C, H, W) layout Grad-CAM expects from a CNN."""
    h, w = grid_size
    patches = tokens[:, num_prefix_tokens:]
    if patches.shape[1] != h * w:
        raise ValueError(
            f"ViT gave {patches.shape[1]} patch tokens but its patch grid is {h}x{w}: Grad-CAM needs inputs "
            "of the size the model was built for (img_size)"
        )
    return patches.reshape(tokens.shape[0], h, w, tokens.shape[2]).permute(0, 3, 1, 2)
