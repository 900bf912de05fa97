"""Grad-CAM on real vs synthetic images: does the classifier look at the same regions in both?

Thesis 2 checked that a classifier attends to the same anatomy (atrophy, ventricles) in real and in
synthetic images of a class. This module computes Grad-CAM maps with pytorch-grad-cam, averages them per
class and set, scores how alike the two mean maps are, and draws and logs the figures:

    result = compare_real_synthetic(model, real_images, synthetic_images, class_index=2)
    result["similarity"]  # {"pearson": ..., "cosine": ..., "ssim": ...}
    log_explanations(client, run_id, [result], class_names)

Models are plain nn.Modules (a timm ResNet or ViT, or the basic CNN); images are float tensors (N, C, H, W)
normalised as the model expects. For the basic CNN pass `method="hirescam"` (see `gradcam`).

`synaug explain -c configs/explain/example.yaml` does it for a trained `ImageClassifier` checkpoint: n real
images of each class from a real split against n synthetic images of the class from synthetic folders, logged
to MLflow (`explain`); `explain_checkpoint` is the same without the logging, for notebooks.

Over 400 lines, on purpose: the maps, their similarity, the figures and the command are one workflow; the
model-family knowledge (which layer, which method) lives in `synaug.models.gradcam`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import mlflow
import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, XGradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torchmetrics.functional.image import structural_similarity_index_measure

from synaug import tracking
from synaug.classifiers.finetune import load_classifier
from synaug.data import ClassificationData
from synaug.data.images import load_image
from synaug.data.sources import SPLITS
from synaug.data.synthetic import read_synthetic
from synaug.evaluation.features import of_classifier
from synaug.models.gradcam import gradcam_method, target_layers
from synaug.tracking import log_figure
from synaug.utils import pick_device

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
    - ssim: structural similarity with a Gaussian window (sigma 1.5, Wang et al. 2004, data range 1; torchmetrics'
      `structural_similarity_index_measure`), averaged over the map; local rather than global agreement.
    """
    if a.shape != b.shape:
        raise ValueError(f"Heat maps differ in shape: {a.shape} vs {b.shape}")
    a, b = a.astype(np.float64), b.astype(np.float64)
    x, y = a.ravel(), b.ravel()
    # torchmetrics' Gaussian window is 11 x 11 for sigma 1.5 (3.5 sigma each side), K1 = 0.01 and K2 = 0.03; the
    # maps are padded by reflection, so the mean is over every pixel
    ssim = structural_similarity_index_measure(
        torch.from_numpy(a)[None, None], torch.from_numpy(b)[None, None], sigma=1.5, data_range=1.0
    )
    return {
        "pearson": float(np.corrcoef(x, y)[0, 1]),
        "cosine": float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y))),
        "ssim": float(ssim),
    }


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


# --- the command --------------------------------------------------------------------------------------------


def resolve_method(net: nn.Module, method: str) -> str:
    """`auto` is the method the model family declares (HiResCAM for the basic CNN, whose flattening head
    Grad-CAM's spatially averaged gradients do not fit; Grad-CAM for a timm ResNet, which global-average-pools
    its last block, where the two give the same maps, and for the rest); other names pass through."""
    return gradcam_method(net) if method == "auto" else method


def _pick(items: Sequence, n: int, rng: np.random.Generator) -> list:
    """Up to `n` of `items`, drawn without replacement, in their original order."""
    return [items[i] for i in sorted(rng.choice(len(items), min(n, len(items)), replace=False))]


def explain_checkpoint(
    checkpoint: str | Path,
    data: dict | str,
    synthetic: list[str] | None = None,
    classes: list[str] | None = None,
    n: int = 16,
    method: str = "auto",
    score: str = "log_odds",
    split: str = "test",
    seed: int = 0,
    batch_size: int = 32,
    device: str | None = None,
) -> tuple[list[dict], list[str]]:
    """`compare_real_synthetic` for each class of a trained classifier: returns the results and the class names.

    Arguments as in `explain`. Each result also holds `real_ids` / `synthetic_files` (the images explained) and
    `real_acc` / `synthetic_acc`, the share of those images the classifier assigns to the class: maps of images
    the model does not recognise as the class say less about what it looks for in that class.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got '{split}'")
    model = load_classifier(checkpoint)
    hp = model.hparams
    # The images as the model was trained on them: its size and channels, unless the data says otherwise.
    args = {"image_size": hp.image_size, "channels": hp.in_chans} | (
        {"root": data} if isinstance(data, str) else dict(data)
    )
    if args["channels"] != hp.in_chans:
        raise ValueError(f"data has {args['channels']} channel(s) but {checkpoint} takes {hp.in_chans}")
    folders = synthetic or args.get("synthetic")
    if not folders:
        raise ValueError("no synthetic folders: pass `synthetic` (or `synthetic` in `data`)")
    dm = ClassificationData(**args)
    dm.setup()
    names = dm.class_names
    if hp.class_names and list(hp.class_names) != names:
        raise ValueError(f"{checkpoint} was trained on classes {list(hp.class_names)}, the data has {names}")
    pooled = pd.concat([read_synthetic(f, names).items for f in folders], ignore_index=True)
    classes = classes or [c for c in names if c in set(pooled["class"])]
    unknown = sorted(set(classes) - set(names))
    if unknown:
        raise ValueError(f"classes {unknown} are not among the data's classes {names}")

    model.to(pick_device(device))
    inputs = of_classifier(model, str(checkpoint), resize=False)  # at the data's size, as given
    rng = np.random.default_rng(seed)
    table = dm.table
    results = []
    for c in classes:
        label = names.index(c)
        rows = np.flatnonzero((table["split"] == split) & (table["label"] == label) & ~table["synthetic"])
        files = pooled.loc[pooled["class"] == c, "file"].tolist()
        if len(rows) == 0 or not files:
            raise ValueError(
                f"class '{c}': {len(rows)} real '{split}' image(s) and {len(files)} synthetic; need both"
            )
        rows, files = _pick(rows.tolist(), n, rng), _pick(files, n, rng)
        real = torch.from_numpy(np.stack([dm.load_row(r) for r in rows]))
        fake = torch.from_numpy(
            np.stack([load_image(f, args["image_size"], args["channels"]) for f in files])
        )
        # Prepared exactly as ImageClassifier.forward prepares them, so that model.net sees what it was trained on.
        real, fake = (inputs.preprocess(x) for x in (real, fake))
        result = compare_real_synthetic(
            model.net, real, fake, label, resolve_method(model.net, method), score, batch_size
        )
        with torch.no_grad():
            real_acc, synthetic_acc = (
                (model.net(x).argmax(1) == label).float().mean().item() for x in (real, fake)
            )
        result |= {
            "real_ids": table["id"].iloc[rows].tolist(),
            "synthetic_files": files,
            "real_acc": real_acc,
            "synthetic_acc": synthetic_acc,
        }
        results.append(result)
    return results, names


def similarity_table(results: Sequence[dict], class_names: Sequence[str]) -> pd.DataFrame:
    """One row per class: images explained, how many the model assigns to the class, and the map similarity."""
    return pd.DataFrame(
        [
            {
                "class": class_names[r["class_index"]],
                "method": r["method"],
                "n_real": len(r["real_maps"]),
                "n_synthetic": len(r["synthetic_maps"]),
                "real_acc": r["real_acc"],
                "synthetic_acc": r["synthetic_acc"],
                **r["similarity"],
            }
            for r in results
        ]
    ).set_index("class")


def explain(
    checkpoint: str,
    data: dict | str,
    synthetic: list[str] | None = None,
    classes: list[str] | None = None,
    n: int = 16,
    method: str = "auto",
    score: str = "log_odds",
    split: str = "test",
    seed: int = 0,
    batch_size: int = 32,
    device: str | None = None,
    experiment: str = "explain",
    run_name: str | None = None,
    tracking_uri: str | None = None,
) -> pd.DataFrame:
    """Grad-CAM of a trained classifier on real vs synthetic images of each class, printed and logged to MLflow.

    Args:
        checkpoint: a Lightning checkpoint of an `ImageClassifier` (`synaug fit`), loaded without unpickling
            code (`synaug.classifiers.finetune.load_classifier`).
        data: the real data: `ClassificationData` arguments (a mapping, as under `data:` in a training config)
            or just its root. Image size and channels default to the classifier's.
        synthetic: synthetic folders with their manifest.csv (default: `synthetic` in `data`).
        classes: the classes to explain (default: every class with synthetic images).
        n: real and synthetic images per class (fewer where a class has fewer), drawn with `seed`.
        method: `auto` (HiResCAM for the basic CNN, whose flattening head Grad-CAM does not fit; Grad-CAM
            otherwise: see `resolve_method`) or a pytorch-grad-cam method (`gradcam`, `hirescam`, ...).
        score: what the maps explain: `log_odds` of the class (default) or its raw `logit` (see `gradcam`).
        split: the real split the real images come from.
        seed: seed of the image draw.
        batch_size: images per Grad-CAM batch.
        device: where to run (default: CUDA when present).
        experiment: MLflow experiment name.
        run_name: MLflow run name.
        tracking_uri: MLflow tracking URI (default: `synaug.tracking.tracking_uri()`).

    Logs per class `explain/<class>/overlays.png` and `explain/<class>/mean_maps.png`, metrics
    `explain/{similarity,cosine,ssim,real_acc,synthetic_acc}/<class>` and the table `explain/similarity.csv`.
    Returns the table (one row per class).
    """
    results, names = explain_checkpoint(
        checkpoint, data, synthetic, classes, n, method, score, split, seed, batch_size, device
    )
    table = similarity_table(results, names)
    print(f"Grad-CAM of {checkpoint} on '{split}' real vs synthetic images (mean maps; {score}):")
    print(table.to_string(float_format="{:.3f}".format))

    client, run_id = tracking.command_run(experiment, run_name, tracking_uri, {"synaug.command": "explain"})
    params = dict(
        checkpoint=checkpoint,
        data=data,
        synthetic=synthetic,
        classes=list(table.index),
        n=n,
        method=table["method"].iloc[0],
        score=score,
        split=split,
        seed=seed,
    )
    for key, value in params.items():
        client.log_param(run_id, key, value)
    log_explanations(client, run_id, results, names)
    for c, row in table.iterrows():
        client.log_metric(run_id, f"explain/real_acc/{c}", row["real_acc"])
        client.log_metric(run_id, f"explain/synthetic_acc/{c}", row["synthetic_acc"])
    client.log_text(run_id, table.to_csv(), "explain/similarity.csv")
    client.log_table(run_id, table.reset_index(), "explain/similarity.json")  # the UI shows it as a table
    client.set_terminated(run_id)
    return table
