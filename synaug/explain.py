"""Grad-CAM on real vs synthetic images: does the classifier look at the same regions in both?

Thesis 2 checked that a classifier attends to the same anatomy (atrophy, ventricles) in real and in
synthetic images of a class. This module computes Grad-CAM maps with pytorch-grad-cam, averages them per
class and set, scores how alike the two mean maps are, and draws and logs the figures:

    result = compare_real_synthetic(model, real_images, synthetic_images, class_index=2)
    result["similarity"]  # {"pearson": ..., "cosine": ..., "ssim": ...}
    log_explanations(client, run_id, [result], class_names)

Models are plain nn.Modules (a timm ResNet or ViT, or the basic CNN); images are float tensors (N, C, H, W)
normalised as the model expects. For the basic CNN pass `method="hirescam"` (see `gradcam`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import matplotlib.pyplot as plt
import mlflow
import numpy as np
import torch
import torch.nn as nn
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, XGradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from scipy.ndimage import gaussian_filter
from timm.models.resnet import ResNet
from timm.models.vision_transformer import VisionTransformer

from synaug.models.basic_cnn import BasicCNN
from synaug.tracking import log_figure

METHODS = {
    "gradcam": GradCAM,
    "gradcam++": GradCAMPlusPlus,
    "hirescam": HiResCAM,
    "xgradcam": XGradCAM,
    "layercam": LayerCAM,
}


class LogOddsTarget:
    """A pytorch-grad-cam target: the log-odds of `category`, log p_c - log(1 - p_c) = y_c - logsumexp(y_j≠c)."""

    def __init__(self, category: int):
        self.category = category

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if logits.shape[-1] < 2:
            raise ValueError("log_odds needs a softmax head with 2 or more classes; use score='logit'")
        others = torch.cat([logits[..., : self.category], logits[..., self.category + 1 :]], dim=-1)
        return logits[..., self.category] - torch.logsumexp(others, dim=-1)


SCORES = {"log_odds": LogOddsTarget, "logit": ClassifierOutputTarget}


def target_layers(model: nn.Module) -> tuple[list[nn.Module], Callable[[torch.Tensor], torch.Tensor] | None]:
    """The Grad-CAM target layers of `model` and the reshape transform its activations need.

    - timm ResNet (any depth, resnet10t, SE/ResNeXt variants): the last block of `layer4`, the
      highest-level features that still have a spatial grid.
    - BasicCNN: the output of its last conv block (conv, ReLU, max-pool).
    - timm VisionTransformer: the last block's `norm1`, with a transform that drops the prefix (class,
      register, distillation) tokens and lays the patch tokens out on the patch grid.

    Anything else raises a TypeError naming the model's class: there is no generic fallback, because a
    wrong layer (e.g. the patch-embedding conv of a transformer) gives maps that look plausible and mean
    nothing.
    """
    if isinstance(model, ResNet):
        return [model.layer4[-1]], None
    if isinstance(model, BasicCNN):
        pools = [m for m in model.features if isinstance(m, nn.MaxPool2d)]
        return [pools[-1]], None
    if isinstance(model, VisionTransformer):
        # With a class-token head the last block's output patch tokens never reach the logits, so their
        # gradients are zero; the input of the last attention (norm1) is where patch tokens still matter.
        reshape = partial(
            _tokens_to_grid,
            num_prefix_tokens=model.num_prefix_tokens,
            grid_size=tuple(model.patch_embed.grid_size),
        )
        return [model.blocks[-1].norm1], reshape
    raise TypeError(
        f"No Grad-CAM target layer known for {type(model).__name__}; supported: timm ResNet, BasicCNN, "
        "timm VisionTransformer"
    )


def _tokens_to_grid(tokens: torch.Tensor, num_prefix_tokens: int, grid_size: tuple[int, int]) -> torch.Tensor:
    """(N, prefix + H*W, C) tokens to the (N, C, H, W) layout Grad-CAM expects from a CNN."""
    h, w = grid_size
    patches = tokens[:, num_prefix_tokens:]
    if patches.shape[1] != h * w:
        raise ValueError(
            f"ViT gave {patches.shape[1]} patch tokens but its patch grid is {h}x{w}: Grad-CAM needs inputs "
            "of the size the model was built for (img_size)"
        )
    return patches.reshape(tokens.shape[0], h, w, tokens.shape[2]).permute(0, 3, 1, 2)


def gradcam(
    model: nn.Module,
    images: torch.Tensor,
    targets: Sequence[int] | torch.Tensor,
    method: str = "gradcam",
    score: str = "log_odds",
    batch_size: int = 32,
) -> np.ndarray:
    """Heat maps (N, H, W) in [0, 1], one per image, for the class in `targets`, at the input's size.

    `method` is a pytorch-grad-cam method (see METHODS). Grad-CAM weights each channel by its gradient
    averaged over space, which is exact when the head global-average-pools the target layer (timm ResNets:
    there "gradcam" and "hirescam" give the same maps) but not when it flattens it: the basic CNN's
    fully connected head uses each position separately, and its Grad-CAM maps can miss what it looked at,
    or come out empty. "hirescam" (gradient times activation per position, Draelos & Carin 2020) is exact
    for such heads; use it for the basic CNN.

    `score` is what the map explains: "log_odds" (default), the log-odds of the class against all others,
    y_c - logsumexp(y_others); or "logit", the raw logit y_c of Selvaraju et al. and pytorch-grad-cam's
    default. A softmax only sees differences of logits, and a raw logit can be explained away by the other
    classes: a two-class model may say "class 1" only by pushing class 0 down, and then the class 1 logit's
    map is empty. The log-odds is what the prediction depends on.

    Each map is min-max scaled on its own (pytorch-grad-cam's convention): it says where the evidence for
    the class is within an image, not how strong it is across images. Runs on the model's device.
    """
    if method not in METHODS:
        raise ValueError(f"Unknown CAM method '{method}'; choose from {sorted(METHODS)}")
    if score not in SCORES:
        raise ValueError(f"Unknown score '{score}'; choose from {sorted(SCORES)}")
    targets = [int(t) for t in targets]
    if len(targets) != len(images):
        raise ValueError(f"Got {len(images)} images but {len(targets)} targets")
    layers, reshape = target_layers(model)
    was_training = model.training
    cam = METHODS[method](model, layers, reshape_transform=reshape)
    try:
        # Inputs that require grad: a frozen backbone (requires_grad=False) would otherwise give no gradients
        # at the target layer.
        maps = [
            cam(batch.detach().requires_grad_(), [SCORES[score](t) for t in batch_targets])
            for batch, batch_targets in zip(
                images.split(batch_size), _chunks(targets, batch_size), strict=True
            )
        ]
    finally:
        # Not `with cam:`: its __exit__ swallows IndexErrors. BaseCAM also leaves the model in eval mode
        # with gradients on its parameters; hand it back as it came.
        cam.activations_and_grads.release()
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    return np.concatenate(maps)


def _chunks(items: list[int], size: int) -> list[list[int]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def map_similarity(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """How alike two heat maps (H, W) in [0, 1] are; 1 for identical maps.

    - pearson: correlation of the pixel values; insensitive to the maps' overall level and contrast, so it
      asks only "are the same regions hot?". The headline score. nan if either map is constant.
    - cosine: cosine of the pixel vectors; like pearson but without centring, so a shared background level
      counts as agreement.
    - ssim: structural similarity with a Gaussian window (sigma 1.5, Wang et al. 2004, data range 1),
      averaged over the map; local rather than global agreement.
    """
    if a.shape != b.shape:
        raise ValueError(f"Heat maps differ in shape: {a.shape} vs {b.shape}")
    a, b = a.astype(np.float64), b.astype(np.float64)
    x, y = a.ravel(), b.ravel()
    return {
        "pearson": float(np.corrcoef(x, y)[0, 1]),
        "cosine": float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y))),
        "ssim": _ssim(a, b),
    }


def _ssim(a: np.ndarray, b: np.ndarray, sigma: float = 1.5) -> float:
    c1, c2 = 0.01**2, 0.03**2  # Wang et al.'s K1, K2 for data range 1
    blur = partial(gaussian_filter, sigma=sigma, truncate=3.5)
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    ssim = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(ssim.mean())


def compare_real_synthetic(
    model: nn.Module,
    real_images: torch.Tensor,
    synthetic_images: torch.Tensor,
    class_index: int,
    method: str = "gradcam",
    score: str = "log_odds",
    batch_size: int = 32,
) -> dict:
    """Grad-CAM of real and synthetic images of one class, their mean maps, and how alike the means are.

    Both sets are explained for `class_index` itself, not for the model's prediction, so the maps answer
    "what makes this image look like the class?" in both. `method` and `score` as in `gradcam`. Returns a
    dict with `class_index`, `method`, `score`, the images, `real_maps` / `synthetic_maps` (N, H, W),
    `real_mean` / `synthetic_mean` (H, W) and `similarity` (`map_similarity` of the two means).
    """
    if real_images.shape[1:] != synthetic_images.shape[1:]:
        raise ValueError(
            f"Real and synthetic images differ in shape: {tuple(real_images.shape[1:])} vs "
            f"{tuple(synthetic_images.shape[1:])}"
        )
    real_maps, synthetic_maps = (
        gradcam(model, images, [class_index] * len(images), method=method, score=score, batch_size=batch_size)
        for images in (real_images, synthetic_images)
    )
    real_mean, synthetic_mean = real_maps.mean(0), synthetic_maps.mean(0)
    return {
        "class_index": class_index,
        "method": method,
        "score": score,
        "real_images": real_images,
        "synthetic_images": synthetic_images,
        "real_maps": real_maps,
        "synthetic_maps": synthetic_maps,
        "real_mean": real_mean,
        "synthetic_mean": synthetic_mean,
        "similarity": map_similarity(real_mean, synthetic_mean),
    }


def _display(image: torch.Tensor) -> np.ndarray:
    """A normalised (C, H, W) image as something imshow shows: RGB for 3 channels, else grey.

    Per-image min-max rather than undoing the model's normalisation, which this module does not know.
    """
    image = image.detach().float().cpu()
    image = image if image.shape[0] == 3 else image.mean(0, keepdim=True)
    image = (image - image.min()) / (image.max() - image.min() + 1e-8)
    return image.permute(1, 2, 0).squeeze(-1).numpy()


def _show(ax: plt.Axes, image: torch.Tensor, heat_map: np.ndarray | None = None) -> None:
    ax.imshow(_display(image), cmap="gray")
    if heat_map is not None:
        ax.imshow(heat_map, cmap="jet", alpha=0.5, vmin=0, vmax=1)
    ax.set_axis_off()


def overlay_figure(result: dict, class_name: str, n: int = 4) -> plt.Figure:
    """Up to `n` rows of: real image, its Grad-CAM overlay, synthetic image, its Grad-CAM overlay."""
    rows = min(n, len(result["real_images"]), len(result["synthetic_images"]))
    fig, axes = plt.subplots(rows, 4, figsize=(8, 2 * rows + 0.6), squeeze=False)
    for i in range(rows):
        _show(axes[i, 0], result["real_images"][i])
        _show(axes[i, 1], result["real_images"][i], result["real_maps"][i])
        _show(axes[i, 2], result["synthetic_images"][i])
        _show(axes[i, 3], result["synthetic_images"][i], result["synthetic_maps"][i])
    method = result["method"]
    for ax, title in zip(
        axes[0], ["real", f"real {method}", "synthetic", f"synthetic {method}"], strict=True
    ):
        ax.set_title(title, fontsize=9)
    fig.suptitle(f"{class_name}: {method} of the {result['score']} of '{class_name}'")
    fig.tight_layout()
    return fig


def mean_maps_figure(result: dict, class_name: str) -> plt.Figure:
    """The mean real and synthetic heat maps, their difference, and the similarity scores in the title."""
    real, synthetic = result["real_mean"], result["synthetic_mean"]
    diff = synthetic - real
    bound = float(np.abs(diff).max()) or 1.0
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.6))
    panels = [
        (real, f"real mean (n={len(result['real_maps'])})", "jet", 0, 1),
        (synthetic, f"synthetic mean (n={len(result['synthetic_maps'])})", "jet", 0, 1),
        (diff, "synthetic - real", "RdBu_r", -bound, bound),
    ]
    for ax, (heat_map, title, cmap, vmin, vmax) in zip(axes, panels, strict=True):
        fig.colorbar(ax.imshow(heat_map, cmap=cmap, vmin=vmin, vmax=vmax), ax=ax, fraction=0.046)
        ax.set_title(title, fontsize=9)
        ax.set_axis_off()
    s = result["similarity"]
    fig.suptitle(
        f"{class_name} ({result['method']}): Pearson r = {s['pearson']:.3f}, cosine = {s['cosine']:.3f}, "
        f"SSIM = {s['ssim']:.3f}"
    )
    fig.tight_layout()
    return fig


def log_explanations(
    client: mlflow.MlflowClient, run_id: str, results: Sequence[dict], class_names: Sequence[str]
) -> None:
    """Log each class's figures under `explain/<class>/` and its similarity scores as metrics.

    Metrics: `explain/similarity/<class>` (Pearson r of the mean maps, the headline), `explain/cosine/<class>`
    and `explain/ssim/<class>`.
    """
    for result in results:
        name = class_names[result["class_index"]]
        log_figure(client, run_id, overlay_figure(result, name), f"explain/{name}/overlays.png")
        log_figure(client, run_id, mean_maps_figure(result, name), f"explain/{name}/mean_maps.png")
        s = result["similarity"]
        client.log_metric(run_id, f"explain/similarity/{name}", s["pearson"])
        client.log_metric(run_id, f"explain/cosine/{name}", s["cosine"])
        client.log_metric(run_id, f"explain/ssim/{name}", s["ssim"])
