"""Image embedders for representative sampling: a timm CNN's pooled features or OpenCLIP image features.

`create_embedder("efficientnet_b0", pretrained=True)` wraps a timm model built by `create_backbone`;
`create_embedder("open_clip:ViT-B-32", checkpoint_path="/path/open_clip_pytorch_model.bin")` wraps the image tower of
an OpenCLIP model. Either way the `Embedder` takes uint8 images as `ImageSource.decode` gives them and returns
L2-normalised features, so cosine similarity is a dot product. `embed_images` runs it over a source in batches
(on the GPU when there is one) and caches the result keyed by data fingerprint, embedder and weights.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import open_clip
import timm
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from synaug.cache import cached_tensors, file_sha256
from synaug.data.sources import ImageSource, OnBad
from synaug.evaluation.features import ImageFeatures
from synaug.models.backbones import WeightsUnavailableError, create_backbone, weights_id
from synaug.utils import pick_device

OPEN_CLIP_PREFIX = "open_clip:"
DECODE_CHUNK = 1024  # images decoded at once: bounds memory at ~150 MB of uint8 for 224 px RGB


class Embedder(ImageFeatures):
    """uint8 images (n, 1 or 3, H, W) -> L2-normalised features (n, dim), with the model's own preprocessing:
    the one feature extractor (`synaug.evaluation.features.ImageFeatures`) with unit-norm output."""

    def __init__(
        self,
        model: nn.Module,
        *,
        name: str,
        weights: str,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        interpolation: str = "bicubic",
        in_chans: int = 3,
    ):
        super().__init__(
            model,
            name,
            in_chans,
            getattr(model, "num_features", 0) or getattr(model, "output_dim", 0),
            torch.tensor(mean),
            torch.tensor(std),
            size=image_size,
            interpolation=interpolation,
            l2_normalize=True,
            weights=weights,  # changes whenever the weights change: part of the embedding cache key
        )
        self.image_size = image_size


def default_device() -> torch.device:
    return pick_device("auto")


def create_embedder(
    name: str, pretrained: bool | str = True, checkpoint_path: str | None = None, device: str | None = None
) -> Embedder:
    """An embedder by name: a timm model name, or `open_clip:<arch>` for an OpenCLIP image tower.

    Weights: `checkpoint_path`, a local weight file (timm format for timm, `open_clip_pytorch_model.bin` or
    `.safetensors` for OpenCLIP); else `pretrained`: for timm `True` (the hub weights timm knows for the name),
    for OpenCLIP a tag (e.g. `laion2b_s34b_b79k`); `False` gives random weights. Weights that cannot be had
    raise `WeightsUnavailableError` naming the model and how to pass a local file. Random weights are seeded, so
    that they, and the cached embeddings keyed by them, are reproducible.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if name.startswith(OPEN_CLIP_PREFIX):
            embedder = _open_clip_embedder(name, pretrained, checkpoint_path)
        else:
            embedder = _timm_embedder(name, pretrained, checkpoint_path)
    return embedder.to(device or default_device())


def _timm_embedder(name: str, pretrained: bool | str, checkpoint_path: str | None) -> Embedder:
    if isinstance(pretrained, str):
        raise ValueError(
            f"timm embedder '{name}': `pretrained` is true or false; pass a weight file with "
            f"`checkpoint_path: {pretrained}`"
        )
    model = create_backbone(name, pretrained=pretrained, checkpoint_path=checkpoint_path, num_classes=0)
    cfg = timm.data.resolve_model_data_config(model)
    c, h, w = cfg["input_size"]
    if h != w:
        raise ValueError(f"embedder '{name}' expects {h}x{w} inputs; only square input sizes are supported")
    return Embedder(
        model,
        name=name,
        weights=weights_id(name, pretrained, checkpoint_path),
        image_size=h,
        mean=cfg["mean"],
        std=cfg["std"],
        interpolation=cfg["interpolation"],
        in_chans=c,
    )


def _open_clip_embedder(name: str, pretrained: bool | str, checkpoint_path: str | None) -> Embedder:
    arch = name.removeprefix(OPEN_CLIP_PREFIX)
    if open_clip.get_model_config(arch) is None:
        raise ValueError(f"unknown OpenCLIP model '{arch}'; known: {', '.join(open_clip.list_models())}")
    if checkpoint_path is not None and isinstance(pretrained, str):
        raise ValueError(
            f"OpenCLIP model '{arch}': give either a tag (`pretrained: {pretrained}`) or a file "
            f"(`checkpoint_path: {checkpoint_path}`), not both"
        )
    if pretrained is True and checkpoint_path is None:
        raise ValueError(
            f"OpenCLIP model '{arch}' has no single default weights: pass a local file with "
            f"`checkpoint_path: /path/open_clip_pytorch_model.bin`, or set `pretrained` to a tag "
            f"({', '.join(open_clip.list_pretrained_tags_by_model(arch))}) or to `false` for random weights"
        )
    # open_clip takes a tag or a file in one argument.
    weights = str(Path(checkpoint_path).expanduser()) if checkpoint_path is not None else (pretrained or None)
    try:
        model = open_clip.create_model(arch, pretrained=weights)
    except RuntimeError as err:
        if weights is None:
            raise
        raise WeightsUnavailableError(_open_clip_message(arch, weights, err)) from err
    cfg = model.visual.preprocess_cfg
    h, w = (cfg["size"], cfg["size"]) if isinstance(cfg["size"], int) else cfg["size"]
    if h != w:
        raise ValueError(f"embedder '{name}' expects {h}x{w} inputs; only square input sizes are supported")
    return Embedder(
        model.visual,
        name=name,
        weights=_open_clip_weights_id(arch, weights),
        image_size=h,
        mean=cfg["mean"],
        std=cfg["std"],
        interpolation=cfg["interpolation"],
        in_chans=3,
    )


def _open_clip_message(arch: str, weights: str, err: Exception) -> str:
    hub = open_clip.get_pretrained_cfg(arch, weights).get("hf_hub", "").strip("/")
    where = (
        f"`huggingface-cli download {hub} open_clip_pytorch_model.bin`"
        if hub
        else (
            f"from the Hugging Face hub; OpenCLIP tags for '{arch}': "
            f"{', '.join(open_clip.list_pretrained_tags_by_model(arch))}"
        )
    )
    return (
        f"Pretrained weights '{weights}' for OpenCLIP model '{arch}' could not be loaded: {type(err).__name__}: "
        f"{err}. This machine cannot download them. Download the weights where you can ({where}), then pass "
        f"the file with `checkpoint_path: /path/open_clip_pytorch_model.bin`, or set `pretrained: false`."
    )


def _open_clip_weights_id(arch: str, weights: str | None) -> str:
    if weights is None:
        return f"open_clip:{arch}:random"
    if Path(weights).is_file():
        return f"open_clip:{arch}:file:{file_sha256(weights)[:16]}"
    return f"open_clip:{arch}:tag:{weights}"


def embed_images(
    embedder: Embedder,
    source: ImageSource,
    indices: Sequence[int],
    batch_size: int = 64,
    on_bad: OnBad = "error",
) -> tuple[torch.Tensor, np.ndarray]:
    """Embed the source's images at `indices`: features (n, dim) float32 on the CPU and the indices they hold.

    Cached on disk: a second call with the same data, embedder and weights reads the features back.
    """
    indices = np.asarray(indices, dtype=np.int64)

    def compute():
        features, kept = [], []
        with tqdm(total=len(indices), desc=f"embedding with {embedder.name}", unit="img") as bar:
            for start in range(0, len(indices), DECODE_CHUNK):
                images, held = source.decode(
                    indices[start : start + DECODE_CHUNK],
                    embedder.image_size,
                    embedder.in_chans,
                    on_bad=on_bad,
                )
                for b in range(0, len(images), batch_size):
                    features.append(embedder(images[b : b + batch_size]).cpu())
                bar.update(min(DECODE_CHUNK, len(indices) - start))
                kept.append(held)
        return {"features": torch.cat(features), "indices": torch.from_numpy(np.concatenate(kept))}

    key = dict(
        source=source.fingerprint,
        indices=hashlib.sha256(indices.tobytes()).hexdigest(),
        embedder=embedder.name,
        weights=embedder.weights,
        size=embedder.image_size,
        on_bad=on_bad,
    )
    out = cached_tensors("embeddings", key, compute)
    return out["features"], out["indices"].numpy()
