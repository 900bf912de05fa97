"""synaug.evaluation.quality on tiny tensors: a fixed random projection or a tiny random timm backbone as features."""

import math
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
from helpers.images import blobs, tiny_backbone_file  # tests/ is on sys.path
from PIL import Image
from torchmetrics.image.fid import FrechetInceptionDistance

from synaug import tracking
from synaug.data.images import load_image
from synaug.data.sources import load_source
from synaug.data.synthetic import SyntheticWriter
from synaug.evaluation import features as feat
from synaug.evaluation import quality as q


class Projection(nn.Module):
    """A fixed random projection of the pixels: features that move predictably with the pixels."""

    def __init__(self, pixels: int, dim: int = 16, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("w", torch.randn(pixels, dim, generator=g, dtype=torch.float64) / pixels**0.5)
        self.num_features = dim
        self.name = "projection"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).double() / 255 @ self.w


def noisy(x: torch.Tensor, sigma: float, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (x.float() + sigma * torch.randn(x.shape, generator=g)).clamp(0, 255).round().to(torch.uint8)


def test_fid_is_zero_against_itself_and_grows_with_noise():
    feature = Projection(16 * 16)
    real = feat.extract(feature, blobs(64, seed=0))
    fids = [q.frechet_distance(real, feat.extract(feature, noisy(blobs(64, seed=0), s))) for s in (8, 32, 96)]
    assert abs(q.frechet_distance(real, real)) < 1e-6 * fids[0]
    assert fids[0] < fids[1] < fids[2]


@pytest.mark.parametrize("n,m", [(40, 25), (200, 250)])  # below the feature dimension: the low-rank route
def test_fid_equals_torchmetrics_on_small_and_large_sets(n, m):
    g = torch.Generator().manual_seed(0)
    real = torch.randn(n, 256, generator=g) * 2 + 1
    fake = torch.randn(m, 256, generator=g).exp()
    fid = FrechetInceptionDistance(feature=q._Given(256))
    fid.update(real, real=True)
    fid.update(fake, real=False)
    assert q.frechet_distance(real, fake) == pytest.approx(float(fid.compute()), rel=1e-5)


def test_report_with_classes_smaller_than_the_kid_subset_and_a_planted_leak():
    feature = Projection(16 * 16)
    real = {"a": blobs(9, seed=1), "b": blobs(8, seed=2, level=30)}
    train = {"a": blobs(20, seed=3), "b": blobs(20, seed=4, level=30)}
    heldout = {"a": torch.cat([real["a"], blobs(3, seed=5)]), "b": real["b"]}
    far = blobs(6, seed=6, level=-60)  # a darker distribution than class b's real images
    leak = heldout["a"][4:5]  # a synthetic 'b' image copying an 'a' test image still leaks
    synthetic = {"a": blobs(7, seed=7), "b": torch.cat([far, leak])}
    table = q.quality_report(real, train, heldout, synthetic, feature, leak_threshold=0.9999)

    assert list(table.index) == ["a", "b"]
    assert table["kid_subset_size"].tolist() == [7, 7]  # min(1000, n_real, n_synthetic)
    assert table[["fid", "kid_mean", "kid_std", "precision", "recall"]].notna().all().all()
    assert table.loc["b", "kid_mean"] > table.loc["a", "kid_mean"]  # the far set is further than a like one
    assert table["leaked"].tolist() == [0, 1]
    assert table["n_real"].tolist() == [9, 8] and table["n_synthetic"].tolist() == [7, 7]
    assert set(table["extractor"]) == {"projection"}


def test_report_refuses_classes_too_small_for_the_neighbourhoods():
    feature = Projection(16 * 16)
    real, train = {"a": blobs(3, seed=1)}, {"a": blobs(5, seed=2)}
    with pytest.raises(ValueError, match="class 'a': 3 reference"):
        q.quality_report(real, train, real, {"a": blobs(5, seed=3)}, feature, k=3)


def test_knn_precision_recall_identical_sets():
    x = torch.randn(100, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert q.knn_precision_recall(x, x.clone(), k=3) == (1.0, 1.0)


def test_knn_precision_recall_by_hand():
    # k=1 radii: real 1 each; fake 9.5 (0.5 to 10), then 1. Only fake 0.5 is within 1 of a real point; every
    # real point is within 9.5 of fake 0.5. A swap of real and fake would give (1.0, 0.25).
    real, fake = torch.tensor([[0.0], [1.0], [2.0], [3.0]]), torch.tensor([[0.5], [10.0], [11.0], [12.0]])
    assert q.knn_precision_recall(real, fake, k=1) == pytest.approx((0.25, 1.0))
    with pytest.raises(ValueError, match="k=4 need more than 4 samples"):
        q.knn_precision_recall(real, fake, k=4)


def test_knn_precision_recall_one_mode_of_two():
    g = torch.Generator().manual_seed(0)
    left, right = (
        torch.tensor([-6.0, 0.0], dtype=torch.float64),
        torch.tensor([6.0, 0.0], dtype=torch.float64),
    )
    real = torch.cat(
        [
            left + torch.randn(200, 2, generator=g, dtype=torch.float64),
            right + torch.randn(200, 2, generator=g, dtype=torch.float64),
        ]
    )
    fake = left + torch.randn(200, 2, generator=g, dtype=torch.float64)
    precision, recall = q.knn_precision_recall(real, fake, k=3)
    assert precision > 0.9
    assert 0.35 < recall < 0.6  # the left mode only: about half of the real samples


def test_memorization_flags_planted_copies_of_training_images():
    g = torch.Generator().manual_seed(0)
    train = torch.randn(200, 32, generator=g, dtype=torch.float64)
    fresh = torch.randn(200, 32, generator=g, dtype=torch.float64)
    planted = train[[3, 50, 170]]
    mem = q.memorization(train, torch.cat([planted, fresh]), percentile=5.0)

    assert mem.memorized[:3].all()
    assert mem.nearest[:3].tolist() == [3, 50, 170]
    assert torch.allclose(mem.similarity[:3], torch.ones(3, dtype=torch.float64))
    # Fresh samples of the training distribution are flagged at about the percentile rate, by definition.
    assert mem.memorized[3:].double().mean() < 0.12
    assert mem.share == pytest.approx(mem.memorized.double().mean().item())


@pytest.mark.parametrize("cls", ["notumor", "glioma"])
def test_memorization_sees_copies_in_a_real_class_with_duplicated_training_images(brain_root, cls):
    """Brain MRI's notumor training images hold byte-identical twins (329 of 1,591). Without leaving duplicates
    out of the threshold it is 0, and exact copies of training images scored memorized share 0.18."""
    files = sorted((brain_root / "train" / cls).iterdir())
    images = torch.from_numpy(np.stack([load_image(f, 32, 1) for f in files]))
    features = Projection(32 * 32, dim=64)(images)
    if cls == "notumor":  # the case: over `percentile`% of the class has a twin
        assert len(files) - len(set(q.pixel_hashes(images))) > 0.05 * len(files)
    copies = features[torch.randperm(len(features), generator=torch.Generator().manual_seed(0))[:60]]
    mem = q.memorization(features, copies, percentile=5.0)
    assert mem.threshold > 0
    assert mem.share == 1.0


def test_leakage_flags_a_planted_copy_of_a_test_image():
    g = torch.Generator().manual_seed(0)
    heldout = torch.randn(30, 16, generator=g, dtype=torch.float64)
    fake = torch.cat([heldout[7:8], torch.randn(20, 16, generator=g, dtype=torch.float64)])
    names = [f"h{i}" for i in range(30)]
    leak = q.leakage(heldout, fake, names, [f"f{i}" for i in range(21)], threshold=0.98)
    assert leak.leaked.tolist() == [True] + [False] * 20
    assert int(leak.nearest[0]) == 7

    # A pixel-identical image leaks through its hash even where the features would not tell.
    exact = q.leakage(heldout, fake, names, ["h2"] + [f"f{i}" for i in range(20)], threshold=1.01)
    assert exact.leaked.tolist() == [True] + [False] * 20 and exact.exact[0]


def test_quality_command_logs_to_mlflow(tmp_path, capsys):
    data = tmp_path / "data"
    for c, level in (("a", 0), ("b", 50)):
        (data / c).mkdir(parents=True)
        for i, x in enumerate(blobs(40, seed=10 + level, size=32, level=level)):
            Image.fromarray(x[0].numpy()).save(data / c / f"{i:02d}.png")
    source = load_source(data)
    n_val = (source.items["split"] == "val").groupby(source.items["label"]).sum()
    test_a = source.items[(source.items["split"] == "test") & (source.items["label"] == 0)].iloc[0]
    writer = SyntheticWriter(tmp_path / "synthetic", generator="test", run_id="r0")
    for c, level in (("a", 0), ("b", 50)):
        for i, x in enumerate(blobs(6, seed=100 + level, size=32, level=level)):
            writer.write(x.numpy(), c, i, seed=i)
    planted = writer.write(load_image(test_a["path"], 32, 1), "a", 6, seed=6)

    # A random backbone's features cannot tell near-duplicates (cosines of distinct images reach 0.9999), so
    # only pixel-identical copies count as leaks here: the cosine path is tested on controlled features above.
    table = q.quality(
        str(data),
        str(tmp_path / "synthetic"),
        feature="test_resnet",
        image_size=32,
        checkpoint_path=str(tiny_backbone_file(tmp_path / "tiny.safetensors")),
        in_chans=1,
        kid_subsets=10,
        experiment="quality-test",
        leak_threshold=1.0,
    )

    out = capsys.readouterr().out
    assert "fid" in out and "test_resnet:file:" in out and f"LEAK: a/{planted.name}" in out
    # The reference is the validation split unless the test split is asked for; at a handful of images FID is
    # flagged as not meaningful and the report says to read KID.
    assert "against the 'val' split" in out and table["n_real"].tolist() == n_val.tolist()
    assert not table["fid_meaningful"].any() and "FID for 'a' is not meaningful at n=" in out
    assert list(table.columns[:5]) == ["n_real", "n_synthetic", "kid_mean", "kid_std", "kid_subset_size"]
    assert table.loc["a", "leaked"] == 1 and table.loc["b", "leaked"] == 0
    client = mlflow.MlflowClient(tracking.tracking_uri())
    run = client.search_runs([client.get_experiment_by_name("quality-test").experiment_id])[0]
    metrics = run.data.metrics
    assert {
        f"quality/{m}/{c}"
        for m in ("fid", "kid_mean", "precision", "recall", "memorized_share", "leaked")
        for c in "ab"
    } <= metrics.keys()
    assert metrics["quality/leaked/a"] == 1 and math.isclose(metrics["quality/fid/b"], table.loc["b", "fid"])
    assert run.data.params["extractor"] == table.loc["a", "extractor"]
    assert run.data.params["reference_split"] == "val"
    files = {Path(f.path).name for f in client.list_artifacts(run.info.run_id, "quality")}
    assert {"report.csv", "memorization.csv", "leakage.csv", "closest_pairs.png"} <= files
    leaks = pd.read_csv(client.download_artifacts(run.info.run_id, "quality/leakage.csv", str(tmp_path)))
    assert leaks["synthetic"].tolist() == [f"a/{planted.name}"] and leaks["exact"].tolist() == [True]
    assert leaks["nearest_heldout"].tolist() == [test_a["id"]]
    assert np.isfinite(table[["fid", "kid_mean", "precision", "recall"]].to_numpy(dtype=float)).all()
