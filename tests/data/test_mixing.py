import numpy as np
import pandas as pd
import pytest
from PIL import Image

from synaug.data import ClassificationData, DataError
from synaug.data.mixing import epoch_order, plan
from synaug.data.synthetic import SyntheticWriter, read_synthetic

CLASSES = ["glioma", "meningioma", "notumor"]


def _real(n=(40, 20, 10), val=5, test=5):
    rows = []
    for c, k in enumerate(n):
        rows += [(f"train/{c}/{i}", c, "train") for i in range(k)]
        rows += [(f"val/{c}/{i}", c, "val") for i in range(val)]
        rows += [(f"test/{c}/{i}", c, "test") for i in range(test)]
    return pd.DataFrame(rows, columns=["id", "label", "split"])


def _synthetic(tmp_path, per_class=30, sources=None, train_ids=None, name="syn"):
    w = SyntheticWriter(tmp_path / name, "test-gen", "run0", train_ids=train_ids)
    for c, cls in enumerate(CLASSES):
        for i in range(per_class):
            src = sources(c, i) if sources else ()
            w.write(np.full((1, 4, 4), i, np.uint8), cls, i, seed=i, source=src)
    return read_synthetic(tmp_path / name, CLASSES)


def test_counts_equal_the_requested_ratios_exactly(tmp_path):
    real, syn = _real(), _synthetic(tmp_path)
    ts = plan(
        real,
        CLASSES,
        syn,
        real_fraction={"glioma": 0.5},
        synthetic_ratio={"notumor": 1.0, "meningioma": 0.25},
    )
    c = ts.counts
    assert c["real_kept"].tolist() == [20, 20, 10]
    assert c["synthetic"].tolist() == [0, 5, 10]
    labels = syn.items["label"].to_numpy()[ts.synthetic]
    assert np.bincount(labels, minlength=3).tolist() == [0, 5, 10]
    assert set(real["split"].to_numpy()[ts.real]) == {"train"}


def test_augment_classes_and_real_count(tmp_path):
    ts = plan(
        _real(),
        CLASSES,
        _synthetic(tmp_path),
        real_count={"glioma": 4},
        synthetic_ratio=1.0,
        augment_classes=["glioma"],
    )
    assert ts.counts["real_kept"].tolist() == [4, 20, 10] and ts.counts["synthetic"].tolist() == [4, 0, 0]


def test_seeds_subset_seed_and_determinism(tmp_path):
    real, syn = _real(), _synthetic(tmp_path)
    kw = dict(real_fraction=0.5, synthetic_ratio=0.5)
    a, b = plan(real, CLASSES, syn, seed=1, **kw), plan(real, CLASSES, syn, seed=1, **kw)
    assert (a.real == b.real).all() and (a.synthetic == b.synthetic).all()
    c = plan(real, CLASSES, syn, seed=2, **kw)
    assert not (a.real == c.real).all()
    # classifier seeds that share a subset seed share the real subset, not the synthetic draw
    d, e = (
        plan(real, CLASSES, syn, seed=1, subset_seed=9, **kw),
        plan(real, CLASSES, syn, seed=2, subset_seed=9, **kw),
    )
    assert (d.real == e.real).all() and not (d.synthetic == e.synthetic).all()


def test_errors_name_the_problem(tmp_path):
    real, syn = _real(), _synthetic(tmp_path, per_class=3)
    with pytest.raises(DataError, match="class 'glioma'.*asks for 40 synthetic.*3 usable"):
        plan(real, CLASSES, syn, synthetic_ratio={"glioma": 1.0})
    with pytest.raises(DataError, match=r"unknown class\(es\) \['gliomaa'\]"):
        plan(real, CLASSES, syn, synthetic_ratio={"gliomaa": 1.0})
    with pytest.raises(DataError, match="needs at least one synthetic source"):
        plan(real, CLASSES, None, synthetic_ratio=0.5)


def test_leakage_guard_refuses_images_derived_from_test(tmp_path):
    syn = _synthetic(
        tmp_path, sources=lambda c, i: [f"test/{c}/0"] if (c, i) == (1, 7) else [f"train/{c}/{i}"]
    )
    with pytest.raises(DataError, match=r"meningioma/000007\.png is derived from test image test/1/0"):
        plan(_real(), CLASSES, syn, synthetic_ratio=0.1)


def test_generator_trained_outside_the_subset_is_refused(tmp_path):
    all_train = [f"train/{c}/{i}" for c, k in enumerate((40, 20, 10)) for i in range(k)]
    syn = _synthetic(tmp_path, train_ids=all_train)
    plan(_real(), CLASSES, syn, synthetic_ratio=0.5)  # full real set: fine
    with pytest.raises(DataError, match="outside this run's training set"):
        plan(_real(), CLASSES, syn, real_fraction=0.5, synthetic_ratio=0.5)
    with pytest.raises(DataError, match="learned from 1 validation/test"):
        plan(_real(), CLASSES, _synthetic(tmp_path, train_ids=["val/0/0"], name="s2"), synthetic_ratio=0.1)


def test_replace_prob_swaps_real_images_for_their_variants(tmp_path):
    real = _real()
    syn = _synthetic(tmp_path, per_class=10, sources=lambda c, i: [f"train/{c}/{i}"])
    ts = plan(real, CLASSES, syn, replace_prob=0.5, real_fraction=1.0)
    # variants only of kept real images, each pointing at its own source
    for i, v in ts.variants.items():
        assert all(syn.sources(j) == [real.at[i, "id"]] for j in v)
    train = np.arange(100)
    variants = {i: np.array([1000 + i]) for i in range(50)}
    orders = [epoch_order(train, variants, 0.5, seed=0, epoch=e) for e in range(20)]
    swapped = np.mean([(o >= 1000).sum() / 50 for o in orders])
    assert 0.4 < swapped < 0.6
    assert all(len(o) == 100 for o in orders)
    assert (epoch_order(train, variants, 0.5, 0, 3) == orders[3]).all()


def test_validation_and_test_stay_real_in_the_datamodule(tmp_path, breast_npz):
    w = SyntheticWriter(tmp_path / "syn", "test-gen", "run0")
    for cls in ("malignant", "normal_benign"):
        for i in range(100):
            w.write(Image.fromarray(np.full((28, 28), i, np.uint8)), cls, i, seed=i)
    dm = ClassificationData(
        str(breast_npz), image_size=28, synthetic=[str(tmp_path / "syn")], synthetic_ratio={"malignant": 0.5}
    )
    dm.setup()
    t = dm.table
    assert not t.loc[t["split"].isin(["val", "test"]), "synthetic"].any()
    assert t.loc[dm.train_rows, "synthetic"].sum() == round(0.5 * 147)
    assert dm.counts.loc["malignant", "synthetic"] == 74 and dm.counts.loc["normal_benign", "synthetic"] == 0
    rows = np.concatenate(
        [b[2].numpy() for b in dm.val_dataloader()] + [b[2].numpy() for b in dm.test_dataloader()]
    )
    assert not t.loc[rows, "synthetic"].any()


def test_the_training_grid_shows_half_synthetic_images_captioned_in_red(tmp_path, breast_npz):
    w = SyntheticWriter(tmp_path / "syn", "test-gen", "run0")
    for i in range(40):
        w.write(Image.fromarray(np.full((28, 28), 255, np.uint8)), "malignant", i, seed=i)  # white: findable
    dm = ClassificationData(
        str(breast_npz), image_size=28, synthetic=[str(tmp_path / "syn")], synthetic_ratio={"malignant": 0.2}
    )
    dm.setup()
    a = np.asarray(dm.preview_image(n=16, cell=28)).astype(int)
    pad, caption, cell = 6, 28, 28
    tiles = [
        a[pad + y * (cell + caption + pad) :, pad + x * (cell + pad) :][: cell + caption, :cell]
        for y in range(2)
        for x in range(8)
    ]
    red = [((t[:caption, :, 0] - t[:caption, :, 1]) > 100).any() for t in tiles]
    white = [(t[caption:] == 255).all() for t in tiles]
    assert red == white == [False] * 8 + [True] * 8  # real first, then as many synthetic, each captioned so


def test_the_medical_policy_never_inverts_an_image():
    # ImageNet AutoAugment inverts, solarises and posterises: brains came out inverted. `medical` keeps the
    # intensities' meaning: every output correlates positively with its input.
    import torch

    from synaug.data.transforms import policy_transform

    y, x = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    image = ((((x - 32) ** 2 + (y - 32) ** 2) < 400) * 200 + 20).to(torch.uint8)[None]
    medical, imagenet = policy_transform("medical"), policy_transform("autoaugment")
    corr = lambda a: torch.corrcoef(torch.stack([a.float().ravel(), image.float().ravel()]))[0, 1]  # noqa: E731
    torch.manual_seed(0)
    assert min(corr(medical(image)) for _ in range(200)) > 0.5
    assert min(corr(imagenet(image)) for _ in range(200)) < 0  # the ImageNet policy does invert


def test_real_subsets_are_nested_and_per_class():
    # main drew every class from one stream: changing one class's fraction redrew the others, and the 0.2
    # and 0.4 subsets shared 46 of 109 images
    real = _real(n=(100, 60, 40))
    labels = real["label"].to_numpy()

    def kept(**kw):
        return plan(real, CLASSES, subset_seed=3, **kw).real

    small, large = set(kept(real_fraction=0.2)), set(kept(real_fraction=0.4))
    assert small < large
    a, b = kept(real_fraction=0.5), kept(real_fraction={"glioma": 0.2, "meningioma": 0.5, "notumor": 0.5})
    assert (a[labels[a] != 0] == b[labels[b] != 0]).all()  # glioma's fraction leaves the others' images alone
    assert set(kept(real_fraction=0.5)) != set(plan(real, CLASSES, subset_seed=4, real_fraction=0.5).real)


def test_a_learned_export_that_records_no_training_set_is_refused(tmp_path):
    w = SyntheticWriter(tmp_path / "syn", "diffusion", "run0", checkpoint="ab" * 32)  # no train_ids
    for cls in CLASSES:
        for i in range(10):
            w.write(np.full((1, 4, 4), i, np.uint8), cls, i, seed=i)
    syn = read_synthetic(tmp_path / "syn", CLASSES)
    with pytest.raises(DataError, match="learned generator 'diffusion'.*record no training set"):
        plan(_real(), CLASSES, syn, synthetic_ratio=0.1)
    ts = plan(_real(), CLASSES, syn, synthetic_ratio=0.1, allow_unrecorded_train_set=True)
    assert len(ts.synthetic) == 4 + 2 + 1


def test_pixel_copies_of_test_images_are_refused_whatever_the_manifest_says(tmp_path, breast_npz):
    # main accepted a folder with empty provenance holding pixel copies of test images
    dm = ClassificationData(str(breast_npz), image_size=28, drop_test_twins="none")
    test = np.flatnonzero(dm.items["split"] == "test")
    w = SyntheticWriter(tmp_path / "syn", "import", "x")
    for k, i in enumerate(test[:60]):
        cls = dm.class_names[dm.items.at[i, "label"]]
        w.write(dm.source.load(int(i), 28, 1), cls, k, seed=k)
    dm = ClassificationData(
        str(breast_npz), image_size=28, synthetic=[str(tmp_path / "syn")], synthetic_ratio=0.05
    )
    with pytest.raises(DataError, match=r"matches test image test/\d+ \(pixel-identical\)"):
        dm.setup()
    assert dm.table is None  # nothing half set up
