"""The one feature extractor: uint8 images -> features, with the model's own preprocessing and a name that
says which model and weights made them. Used by `quality` (FID, KID, precision/recall, memorization, leakage),
by the representative-sampling embedder (`synaug.sampling.embed`) and by `explain` (a classifier's inputs).

- `inception_features`: the Inception-v3 FID network (torchmetrics over torch-fidelity, 2048-d pool features),
  from a local weights file or the torch hub cache; `WeightsUnavailableError` names the file to fetch otherwise.
- `backbone_features`: a timm backbone's pooled features at its input size and statistics.
- `classifier_features`: the backbone of the project's own fine-tuned `ImageClassifier`, from its checkpoint.
- `feature_extractor`: one of those by name (`"inception"`, `"classifier"`, `"auto"`, a timm model name).
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchmetrics.image.fid import NoTrainInceptionV3

from synaug.cache import file_sha256
from synaug.classifiers.finetune import ImageClassifier, load_classifier
from synaug.models.backbones import WeightsUnavailableError, create_backbone, normalization, weights_id
from synaug.utils import pick_device

log = logging.getLogger(__name__)

INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"


class ImageFeatures(nn.Module):
    """uint8 images (N, C, H, W) -> features (N, d) of `model`, with the model's name.

    Grey images are repeated to `in_chans` (the same intensity in R, G and B, as PIL's L->RGB conversion does).
    With `mean`/`std` the images become floats in [0, 1], resized to `size` when given and not already that size
    (a plain resize, not a resize + centre crop: the images are square, and a crop would drop anatomy at the
    borders), then normalised (`preprocess`); without them the model takes the uint8 images as they are (the
    Inception FID network resizes and scales them itself). `l2_normalize` returns unit-norm features, so cosine
    similarity is a dot product. `weights` names the weights (a cache key, see `models.backbones.weights_id`).
    """

    def __init__(
        self,
        model: nn.Module,
        name: str,
        in_chans: int,
        num_features: int,
        mean: torch.Tensor | None = None,
        std: torch.Tensor | None = None,
        size: int | None = None,
        interpolation: str = "bilinear",
        l2_normalize: bool = False,
        weights: str | None = None,
    ):
        super().__init__()
        self.model = model.eval()
        self.name = name
        self.in_chans = in_chans
        self.num_features = num_features
        self.size = size
        self.interpolation = interpolation
        self.l2_normalize = l2_normalize
        self.weights = weights or name
        self.normalize = mean is not None
        if self.normalize:
            self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
            self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    @property
    def device(self) -> torch.device:
        return next(itertools.chain(self.buffers(), self.parameters())).device

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images (N, C, H, W) as the model takes them, on its device."""
        if x.dtype != torch.uint8:
            raise TypeError(f"{self.name}: expects uint8 images (N, C, H, W), got {x.dtype}")
        x = x.to(self.device)
        if x.shape[1] != self.in_chans:
            if x.shape[1] != 1:
                raise ValueError(
                    f"{self.name}: takes {self.in_chans}-channel (or grey) images, got {x.shape[1]}"
                )
            x = x.expand(-1, self.in_chans, -1, -1)
        if not self.normalize:
            return x
        x = x.float() / 255
        if self.size is not None and x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(
                x, size=(self.size, self.size), mode=self.interpolation, antialias=True, align_corners=False
            )
        return (x - self.mean) / self.std

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.model(self.preprocess(x))
        return F.normalize(features.float(), dim=-1) if self.l2_normalize else features


def inception_features(weights: str | Path | None = None) -> ImageFeatures:
    """The Inception-v3 FID network (2048-d pool features) from `weights`, else the torch hub cache or a download."""
    if weights is not None and not Path(weights).expanduser().is_file():
        raise WeightsUnavailableError(f"Inception-v3 FID weights not found: {weights}")
    try:
        model = NoTrainInceptionV3(
            name="inception-v3-compat",
            features_list=["2048"],
            feature_extractor_weights_path=None if weights is None else str(Path(weights).expanduser()),
        )
    except OSError as err:  # URLError: not in the torch hub cache and no network to download it
        raise WeightsUnavailableError(
            f"Inception-v3 FID weights (torch-fidelity 'inception-v3-compat', {Path(INCEPTION_URL).name}) could "
            f"not be loaded: {type(err).__name__}: {err}. This machine cannot download them. Download "
            f"{INCEPTION_URL} where you can, then pass the file with `inception_weights: /path/to/"
            f"{Path(INCEPTION_URL).name}` (or put it in {torch.hub.get_dir()}/checkpoints/), or use "
            f"`feature: <timm model name>` with `checkpoint_path`, or `feature: auto` with `backbone` to fall "
            f"back to a backbone when Inception is unavailable."
        ) from err
    if weights is None:
        name = "inception-v3-compat:fid-2015-12-05"
    else:
        name = f"inception-v3-compat:file:{file_sha256(weights)[:16]}"
    return ImageFeatures(model, name, in_chans=3, num_features=2048)


def backbone_features(
    name: str, checkpoint_path: str | Path | None = None, in_chans: int = 3
) -> ImageFeatures:
    """A timm backbone's pooled features, weights from `checkpoint_path` (timm format) or, without one, the hub.

    Images are resized to the model's input size and normalised with its statistics (timm's data config)."""
    pretrained = checkpoint_path is None
    model = create_backbone(
        name, pretrained=pretrained, checkpoint_path=checkpoint_path, num_classes=0, in_chans=in_chans
    )
    cfg = timm.data.resolve_model_data_config(model)
    mean, std = normalization(model, True, in_chans)
    # The weights (hub or their local copy) were trained at the model's input size and statistics; the
    # project's own classifiers, trained at their own size, go through `classifier_features`.
    size = cfg["input_size"][-1]
    return ImageFeatures(
        model, weights_id(name, pretrained, checkpoint_path), in_chans, model.num_features, mean, std, size
    )


def classifier_features(checkpoint_path: str | Path) -> ImageFeatures:
    """The pooled backbone features of a fine-tuned `ImageClassifier` from its Lightning checkpoint, loaded
    without unpickling code (`load_classifier`: a crafted checkpoint cannot run anything).

    The images are resized to the classifier's `image_size` and normalised as `ImageClassifier` does: with the
    backbone's pretrained statistics when it started from pretrained weights, else with mean = std = 0.5.
    """
    path = Path(checkpoint_path).expanduser()
    if not path.is_file():
        raise WeightsUnavailableError(f"Classifier checkpoint not found: {path}")
    clf = load_classifier(path)
    clf.net.reset_classifier(0)  # the pooled features, without the classifier head
    return of_classifier(clf, f"classifier:{clf.hparams.backbone}:file:{file_sha256(path)[:16]}")


def of_classifier(clf: ImageClassifier, name: str, resize: bool = True) -> ImageFeatures:
    """`clf.net` on images prepared as `ImageClassifier.forward` prepares them: normalised with its statistics
    and (with `resize`) resized to its image size; `preprocess` alone is what Grad-CAM feeds the network."""
    hp = clf.hparams
    size = hp.image_size if resize else None
    return ImageFeatures(clf.net, name, hp.in_chans, clf.net.num_features, clf.mean, clf.std, size=size)


def feature_extractor(
    feature: str,
    checkpoint_path: str | Path | None = None,
    in_chans: int = 3,
    backbone: str | None = None,
    inception_weights: str | Path | None = None,
) -> ImageFeatures:
    """`"inception"`, `"classifier"`, `"auto"` (Inception, else `backbone`) or a timm model name; see the
    module docstring."""
    if feature == "inception":
        return inception_features(inception_weights)
    if feature == "auto":
        if backbone is None:
            raise ValueError(
                "feature='auto' needs `backbone`: the extractor to use when Inception is unavailable"
            )
        try:
            return inception_features(inception_weights)
        except (WeightsUnavailableError, ModuleNotFoundError) as err:
            log.warning("feature=auto: Inception unavailable, using %s instead. %s", backbone, err)
            feature = backbone
    if feature == "classifier":
        if checkpoint_path is None:
            raise ValueError(
                "feature 'classifier' needs `checkpoint_path`: the classifier's Lightning checkpoint"
            )
        return classifier_features(checkpoint_path)
    return backbone_features(feature, checkpoint_path, in_chans)


@torch.no_grad()
def extract(
    feature: nn.Module, images: torch.Tensor, batch_size: int = 64, device: str | torch.device | None = None
) -> torch.Tensor:
    """Features (N, d) as float64 on the CPU, computed in batches on `device` (CUDA when present)."""
    device = pick_device(device)
    feature.to(device)
    return torch.cat(
        [
            feature(images[i : i + batch_size].to(device)).double().cpu()
            for i in range(0, len(images), batch_size)
        ]
    )
