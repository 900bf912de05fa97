"""Per-class quality of a synthetic folder against real images: FID, KID, k-NN precision/recall, memorization
of training images and leakage of held-out images, all computed on one set of features.

The feature extractor (`synaug.evaluation.features`) is named in every row of the report:
- `"inception"`: the Inception-v3 FID network (torchmetrics over torch-fidelity, 2048-d pool features), from a
  local `inception_weights` file or the torch hub cache. When neither has it and it cannot be downloaded,
  `WeightsUnavailableError` names the model and how to pass the file.
- `"classifier"`: the backbone of the project's own fine-tuned classifier (`ImageClassifier`), read from its
  Lightning checkpoint `checkpoint_path`, with the classifier's input size and normalisation.
- a timm model name: `create_backbone(name, num_classes=0)` with the timm-format weights in `checkpoint_path`,
  or without one the hub weights timm knows for the name.
- `"auto"`: Inception when it can be had, else `backbone` (`"classifier"` or a timm name) with `checkpoint_path`.
- in the function API, any `nn.Module` mapping uint8 images (N, C, H, W) to features (N, d).

Features are extracted once per image set and handed to torchmetrics' FID and KID through a pass-through
module, so every metric in a row sees exactly the same features.

Over 400 lines, on purpose: the metrics and the command that reports them per class share the feature cache
and the per-class bookkeeping; the feature extractors themselves live in `synaug.evaluation.features`.
"""

from __future__ import annotations

import hashlib
import logging
import time
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from mlflow.entities import Metric, Param
from torch_fidelity.metric_prc import prc_features_to_metric
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from synaug import tracking
from synaug.data.images import load_image
from synaug.data.sources import SPLITS, load_source
from synaug.data.synthetic import read_synthetic
from synaug.evaluation.features import extract, feature_extractor
from synaug.tracking import plt  # with the headless backend tracking selects

log = logging.getLogger(__name__)

KID_SUBSET_SIZE = 1000  # torchmetrics' default


def pixel_hashes(images: torch.Tensor) -> list[str]:
    """sha256 of each image's pixels: equal for byte-identical decoded images whatever their file format."""
    return [hashlib.sha256(x.contiguous().numpy().tobytes()).hexdigest() for x in images.cpu()]


# --- metrics on features ------------------------------------------------------------------------------------


class _Given(nn.Module):
    """Pass-through 'extractor': torchmetrics gets the features already computed once for all metrics."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID between two feature sets (N, d); each needs at least 2 samples.

    Sets smaller than the feature dimension (every class of a low-data study: 15-400 images against 1,280
    EfficientNet or 2,048 Inception features) take an exact low-rank route: with the centred sets scaled as
    A (n x d) and B (m x d), Sigma_r = A'A and Sigma_f = B'B, and tr sqrt(Sigma_r Sigma_f) is the sum of the singular
    values of A B' (n x m), 0.01 s instead of torchmetrics' 2 s eigen-decomposition of a d x d product (equal to
    float precision; `tests/evaluation/test_quality.py`). Larger sets go to torchmetrics."""
    if max(len(real), len(fake)) >= real.shape[1]:
        fid = FrechetInceptionDistance(feature=_Given(real.shape[1]))
        fid.update(real, real=True)
        fid.update(fake, real=False)
        return float(fid.compute())
    r, f = real.double(), fake.double()
    a = (r - r.mean(0)) / (len(r) - 1) ** 0.5
    b = (f - f.mean(0)) / (len(f) - 1) ** 0.5
    mean = (r.mean(0) - f.mean(0)).square().sum()
    return float(mean + a.square().sum() + b.square().sum() - 2 * torch.linalg.svdvals(a @ b.T).sum())


def kernel_distance(
    real: torch.Tensor,
    fake: torch.Tensor,
    subset_size: int = KID_SUBSET_SIZE,
    subsets: int = 100,
    seed: int = 0,
) -> tuple[float, float, int]:
    """KID mean and std over `subsets` random subsets, and the subset size used.

    torchmetrics refuses sets smaller than the subset size, which small medical classes always are: the size
    used is min(`subset_size`, len(real), len(fake)). When both sets are no larger than it, every subset is a
    whole set, so the std is 0 and the mean is the unbiased MMD of the full sets.
    """
    size = min(subset_size, len(real), len(fake))
    with warnings.catch_warnings():  # its warning that it keeps all features: so do we, by design
        warnings.filterwarnings("ignore", message="Metric `Kernel Inception Distance` will save")
        kid = KernelInceptionDistance(feature=_Given(real.shape[1]), subsets=subsets, subset_size=size)
    kid.update(real, real=True)
    kid.update(fake, real=False)
    with torch.random.fork_rng(devices=[]):  # torchmetrics draws the subsets from the global generator
        torch.manual_seed(seed)
        mean, std = kid.compute()
    return float(mean), float(std), size


def knn_precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) on features (N, d), Euclidean distance.

    Each sample's ball has the radius of the distance to its k-th nearest neighbour in its own set; the
    union of a set's balls estimates its manifold. Precision: the share of fake samples inside the real
    manifold (how realistic the generated images are). Recall: the share of real samples inside the fake
    manifold (how much of the real variety the generator covers). Computed by torch-fidelity (the step of its
    `calculate_metrics(prc=True)` that takes features); torchmetrics (1.9) has no such metric.
    """
    for x in (real, fake):
        if len(x) <= k:
            raise ValueError(f"k-NN radii with k={k} need more than {k} samples, got {len(x)}")
    out = prc_features_to_metric(fake, real, prc_neighborhood=k, verbose=False)  # generated first, then real
    return out["precision"], out["recall"]


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.normalize(a, dim=1) @ F.normalize(b, dim=1).T


@dataclass
class Memorization:
    nearest: torch.Tensor  # (n_fake,) index of each synthetic image's nearest training image
    similarity: torch.Tensor  # (n_fake,) cosine similarity to it
    threshold: float  # cosine distance below which a synthetic image counts as memorized
    memorized: torch.Tensor  # (n_fake,) bool

    @property
    def share(self) -> float:
        return float(self.memorized.double().mean())


def memorization(
    train: torch.Tensor, fake: torch.Tensor, percentile: float = 5.0, duplicate_tol: float = 1e-6
) -> Memorization:
    """Each synthetic image's nearest training image by cosine similarity of features, and whether it is memorized.

    With d(a, b) = 1 - cos(a, b), let t_i = min_j d(train_i, train_j) over the training images j that are not
    duplicates of i (d > `duplicate_tol`), and tau the `percentile`-th percentile of the t_i. A synthetic image
    s is memorized when min_i d(s, train_i) < tau: it sits closer to a training image than (100 - percentile)%
    of the training images sit to their own nearest distinct neighbour. Fresh samples from the training
    distribution are therefore flagged at about `percentile`%; a share well above that signals copying.

    Duplicates are left out of the t_i because real training sets hold them (brain MRI: 329 of 1,591 notumor
    training images have a byte-identical twin): with twins, t_i = 0 for over `percentile`% of the images, tau
    becomes 0 and not even an exact copy counts as memorized. Needs at least 2 distinct training images.
    """
    within = _cosine(train, train)
    distinct = (1 - within) > duplicate_tol  # the diagonal too
    if distinct.any(dim=1).sum() < 2:
        raise ValueError(f"memorization needs at least 2 distinct training images, got {len(train)} images")
    nearest_distinct = 1 - within.masked_fill(~distinct, -torch.inf).max(dim=1).values
    # an image whose every other training image is its duplicate has no distinct neighbour (inf): left out
    threshold = float(torch.quantile(nearest_distinct[nearest_distinct.isfinite()], percentile / 100))
    similarity, nearest = _cosine(fake, train).max(dim=1)
    return Memorization(nearest, similarity, threshold, (1 - similarity) < threshold)


@dataclass
class Leakage:
    nearest: torch.Tensor  # (n_fake,) index of each synthetic image's nearest held-out image (cosine)
    similarity: torch.Tensor  # (n_fake,) cosine similarity to it
    exact: torch.Tensor  # (n_fake,) bool: pixel-identical to some held-out image
    leaked: torch.Tensor  # (n_fake,) bool: exact, or similarity above the threshold


def leakage(
    heldout: torch.Tensor,
    fake: torch.Tensor,
    heldout_hashes: list[str],
    fake_hashes: list[str],
    threshold: float = 0.98,
) -> Leakage:
    """Synthetic images that are near-duplicates of held-out (validation/test) images.

    A synthetic image leaks when its features have cosine similarity above `threshold` with a held-out
    image's, or its hash equals one (`pixel_hashes` of images decoded alike, or file hashes).
    """
    similarity, nearest = _cosine(fake, heldout).max(dim=1)
    held = set(heldout_hashes)
    exact = torch.tensor([h in held for h in fake_hashes], dtype=torch.bool)
    return Leakage(nearest, similarity, exact, exact | (similarity > threshold))


# --- the report ---------------------------------------------------------------------------------------------


@dataclass
class ClassQuality:
    row: dict[str, float | int | str]  # one row of the report table
    memorization: Memorization  # indices into the class's training images
    leakage: Leakage  # indices into the held-out images of all classes, concatenated in dict order


def quality_details(
    real: dict[str, torch.Tensor],
    train: dict[str, torch.Tensor],
    heldout: dict[str, torch.Tensor],
    synthetic: dict[str, torch.Tensor],
    feature: nn.Module | str,
    *,
    k: int = 3,
    percentile: float = 5.0,
    leak_threshold: float = 0.98,
    kid_subset_size: int = KID_SUBSET_SIZE,
    kid_subsets: int = 100,
    batch_size: int = 64,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> dict[str, ClassQuality]:
    """`quality_report` with, per class, the memorization and leakage of every synthetic image."""
    extractor = feature_extractor(feature) if isinstance(feature, str) else feature
    name = getattr(extractor, "name", type(extractor).__name__)
    for c, fake in synthetic.items():
        n_real, n_train, n_fake = len(real.get(c, ())), len(train.get(c, ())), len(fake)
        if n_real <= k or n_fake <= k or n_train < 2:
            raise ValueError(
                f"class '{c}': {n_real} reference, {n_train} training and {n_fake} synthetic images; the report "
                f"needs more than k={k} reference and synthetic images and at least 2 training images"
            )

    def feats(images: torch.Tensor) -> torch.Tensor:
        return extract(extractor, images, batch_size, device)

    # Leakage is checked against every held-out image: a copy of a test image leaks whatever its class.
    held_images = torch.cat(list(heldout.values()))
    held, held_hashes = feats(held_images), pixel_hashes(held_images)
    out = {}
    for c, fake_images in synthetic.items():
        r, t, f = feats(real[c]), feats(train[c]), feats(fake_images)
        kid_mean, kid_std, size = kernel_distance(r, f, kid_subset_size, kid_subsets, seed)
        precision, recall = knn_precision_recall(r, f, k)
        mem = memorization(t, f, percentile)
        leak = leakage(held, f, held_hashes, pixel_hashes(fake_images), leak_threshold)
        row = dict(
            n_real=len(r),
            n_synthetic=len(f),
            kid_mean=kid_mean,
            kid_std=kid_std,
            kid_subset_size=size,
            fid=frechet_distance(r, f),
            # FID's covariance estimate is rank-deficient below d samples: it is biased upward and not comparable
            # across sample sizes there (two samples of one distribution: FID 414 at n=20, 16 at n=2,000, d=256)
            fid_meaningful=min(len(r), len(f)) >= r.shape[1],
            precision=precision,
            recall=recall,
            memorized_share=mem.share,
            leaked=int(leak.leaked.sum()),
            extractor=name,
        )
        out[c] = ClassQuality(row, mem, leak)
    return out


def report_table(details: dict[str, ClassQuality]) -> pd.DataFrame:
    return pd.DataFrame.from_dict({c: q.row for c, q in details.items()}, orient="index").rename_axis("class")


def quality_report(
    real: dict[str, torch.Tensor],
    train: dict[str, torch.Tensor],
    heldout: dict[str, torch.Tensor],
    synthetic: dict[str, torch.Tensor],
    feature: nn.Module | str,
    **kwargs,
) -> pd.DataFrame:
    """Per-class quality of synthetic images against real ones: one row per class of `synthetic`.

    Args:
        real: uint8 images (N, C, H, W) per class of the reference split (FID, KID, precision, recall).
        train: uint8 images per class the generator learned from (memorization).
        heldout: uint8 images per class of the validation and test splits (leakage, checked across classes).
        synthetic: uint8 images per class, decoded like the real ones (same size and channels).
        feature: an extractor module (uint8 images -> (N, d)) or a name for `feature_extractor`.
        **kwargs: `k`, `percentile`, `leak_threshold`, `kid_subset_size`, ... of `quality_details`.

    Columns: n_real, n_synthetic, fid, kid_mean, kid_std, kid_subset_size (smaller than asked when a set is),
    precision, recall (k-NN, `knn_precision_recall`), memorized_share (`memorization`), leaked (count,
    `leakage`), extractor (the features' name).
    """
    return report_table(quality_details(real, train, heldout, synthetic, feature, **kwargs))


def closest_pairs_figure(
    details: dict[str, ClassQuality],
    synthetic: dict[str, torch.Tensor],
    train: dict[str, torch.Tensor],
    n: int = 8,
):
    """The `n` synthetic images most similar to their nearest training image (top row) above that image."""
    pairs = sorted(
        (
            (float(q.memorization.similarity[i]), c, i)
            for c, q in details.items()
            for i in range(len(synthetic[c]))
        ),
        reverse=True,
    )[:n]
    fig, axes = plt.subplots(2, len(pairs), figsize=(1.8 * len(pairs), 4.2), squeeze=False)
    for j, (sim, c, i) in enumerate(pairs):
        mem = details[c].memorization
        for row, image in enumerate((synthetic[c][i], train[c][int(mem.nearest[i])])):
            ax = axes[row, j]
            ax.imshow(
                image[0] if image.shape[0] == 1 else image.permute(1, 2, 0), cmap="gray", vmin=0, vmax=255
            )
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0, j].set_title(f"{c}\ncos {sim:.4f}" + ("\nmemorized" if mem.memorized[i] else ""), fontsize=8)
    axes[0, 0].set_ylabel("synthetic")
    axes[1, 0].set_ylabel("nearest train")
    fig.tight_layout()
    return fig


# --- the command --------------------------------------------------------------------------------------------


def quality(
    data: str,
    synthetic: str,
    reference_split: str = "val",
    feature: str = "auto",
    checkpoint_path: str | None = None,
    image_size: int = 128,
    backbone: str | None = "efficientnet_lite0",
    inception_weights: str | None = None,
    in_chans: int = 3,
    k: int = 3,
    percentile: float = 5.0,
    leak_threshold: float = 0.98,
    kid_subset_size: int = KID_SUBSET_SIZE,
    kid_subsets: int = 100,
    pairs: int = 8,
    batch_size: int = 64,
    seed: int = 0,
    experiment: str = "quality",
    run_name: str | None = None,
    tracking_uri: str | None = None,
) -> pd.DataFrame:
    """Per-class quality report of a synthetic folder against the real images, printed and logged to MLflow.

    Args:
        data: the real source (folder, MedMNIST .npz or CSV manifest; see `load_source`).
        synthetic: a synthetic folder with its manifest.csv (see `synaug.data.synthetic`).
        reference_split: the real split the synthetic images are compared with (FID, KID, precision, recall):
            `val` by default, `train` for the images the generator learned from; `test` only when asked for,
            since choosing a generator by its test-split score reads the test set. Memorization is always
            against `train`, leakage against `val` and `test`.
        feature: `inception`, `classifier`, `auto` (Inception, else `backbone`) or a timm model name.
        checkpoint_path: for `classifier`, the classifier's Lightning checkpoint; for a timm name, local
            timm-format weights (without it the hub weights; offline, from the local hub cache only).
        image_size: real and synthetic images are decoded at this square size.
        backbone: what `feature: auto` falls back to: `classifier` or a timm model name; by default ImageNet
            EfficientNet-Lite0, whose weights ship in a package (a pretrained space on any machine).
        inception_weights: local Inception-v3 FID weights file (torch-fidelity's weights-inception-*.pth).
        in_chans: input channels of the backbone (1 for a classifier trained on grey images).
        k: neighbours for the k-NN precision/recall radii.
        percentile: memorization threshold, a percentile of train-to-nearest-train distances (`memorization`).
        leak_threshold: cosine similarity above which a synthetic image duplicates a held-out one.
        kid_subset_size: KID subset size, reduced to the smaller set of a class where needed (reported).
        kid_subsets: number of KID subsets.
        pairs: closest synthetic/training pairs shown in the figure.
        batch_size: images per feature-extraction batch.
        seed: seed of the KID subsets.
        experiment: MLflow experiment name.
        run_name: MLflow run name.
        tracking_uri: MLflow tracking URI (default: `synaug.tracking.tracking_uri()`).

    Logs metrics `quality/<metric>/<class>`, the table (`quality/report.csv`), per-image memorization and
    leakage tables (`quality/memorization.csv`, `quality/leakage.csv`) and the closest-pairs grid
    (`quality/closest_pairs.png`). Returns the table.
    """
    if reference_split not in SPLITS:
        raise ValueError(f"reference_split must be one of {SPLITS}, got '{reference_split}'")
    if reference_split == "test":
        log.warning("quality against the test split: choosing a generator by this score reads the test set")
    source = load_source(data)
    synth = read_synthetic(synthetic, source.classes)
    extractor = feature_extractor(feature, checkpoint_path, in_chans, backbone, inception_weights)
    channels = extractor.in_chans

    def by_class(splits: tuple[str, ...]) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
        images, ids = {}, {}
        for label, c in enumerate(source.classes):
            rows = np.flatnonzero(
                source.items["split"].isin(splits).to_numpy() & (source.items["label"] == label)
            )
            images[c], kept = source.decode(rows, image_size, channels)
            ids[c] = source.items["id"].to_numpy()[kept].tolist()
        return images, ids

    real, _ = by_class((reference_split,))
    train, train_ids = by_class(("train",))
    heldout, heldout_ids = by_class(("val", "test"))
    fake, fake_names = {}, {}
    for c in source.classes:
        rows = synth.items[synth.items["class"] == c]
        if len(rows):
            fake[c] = torch.from_numpy(np.stack([load_image(f, image_size, channels) for f in rows["file"]]))
            fake_names[c] = rows["path"].tolist()

    details = quality_details(
        real,
        train,
        heldout,
        fake,
        extractor,
        k=k,
        percentile=percentile,
        leak_threshold=leak_threshold,
        kid_subset_size=kid_subset_size,
        kid_subsets=kid_subsets,
        batch_size=batch_size,
        seed=seed,
    )
    table = report_table(details)
    held_ids = [i for c in heldout_ids for i in heldout_ids[c]]
    memo = pd.DataFrame(
        [
            {
                "class": c,
                "synthetic": fake_names[c][i],
                "nearest_train": train_ids[c][int(q.memorization.nearest[i])],
                "similarity": float(q.memorization.similarity[i]),
                "memorized": bool(q.memorization.memorized[i]),
            }
            for c, q in details.items()
            for i in range(len(fake_names[c]))
        ]
    )
    leaks = pd.DataFrame(
        [
            {
                "class": c,
                "synthetic": fake_names[c][i],
                "nearest_heldout": held_ids[int(q.leakage.nearest[i])],
                "similarity": float(q.leakage.similarity[i]),
                "exact": bool(q.leakage.exact[i]),
            }
            for c, q in details.items()
            for i in np.flatnonzero(q.leakage.leaked.numpy())
        ],
        columns=["class", "synthetic", "nearest_heldout", "similarity", "exact"],
    )

    print(
        f"Quality of {synthetic} against the '{reference_split}' split of {data}; features: {extractor.name}"
    )
    print(table.to_string(float_format="{:.4g}".format))
    for c, row in table[~table["fid_meaningful"].astype(bool)].iterrows():
        print(
            f"FID for '{c}' is not meaningful at n={min(row.n_real, row.n_synthetic)} (fewer images than the "
            f"{extractor.num_features} feature dimensions): read KID, which is unbiased at any n"
        )
    for c, size in table["kid_subset_size"].items():
        if size < kid_subset_size:
            print(f"KID subset size for '{c}': {size}, the smaller set (asked for {kid_subset_size})")
    for row in leaks.itertuples(index=False):
        print(
            f"LEAK: {row.synthetic} duplicates held-out {row.nearest_heldout} "
            f"({'pixel-identical' if row.exact else f'cosine {row.similarity:.4f}'})"
        )

    client, run_id = tracking.command_run(experiment, run_name, tracking_uri, {"synaug.command": "quality"})
    params = dict(
        data=data,
        synthetic=synthetic,
        reference_split=reference_split,
        feature=feature,
        extractor=extractor.name,
        checkpoint_path=checkpoint_path,
        image_size=image_size,
        k=k,
        percentile=percentile,
        leak_threshold=leak_threshold,
        kid_subset_size=kid_subset_size,
        kid_subsets=kid_subsets,
        seed=seed,
    )
    now = int(time.time() * 1000)
    metrics = [
        Metric(f"quality/{m}/{c}", float(v), now, 0)
        for c, row in table.iterrows()
        for m, v in row.items()
        if m != "extractor"
    ]
    client.log_batch(run_id, metrics=metrics, params=[Param(p, str(v)) for p, v in params.items()])
    client.log_text(run_id, table.to_csv(), "quality/report.csv")
    client.log_table(run_id, table.reset_index(), "quality/report.json")  # the UI shows it as a table
    client.log_text(run_id, memo.to_csv(index=False), "quality/memorization.csv")
    client.log_text(run_id, leaks.to_csv(index=False), "quality/leakage.csv")
    tracking.log_figure(
        client, run_id, closest_pairs_figure(details, fake, train, pairs), "quality/closest_pairs.png"
    )
    client.set_terminated(run_id)
    return table
