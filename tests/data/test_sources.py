import numpy as np
import pandas as pd
import pytest
from PIL import Image

from synaug.data import ClassificationData, DataError, load_source


def test_brain_mri_folder_keeps_test_and_carves_val(brain_root):
    src = load_source(brain_root)
    assert src.classes == ["glioma", "meningioma", "notumor", "pituitary"]
    counts = src.items.groupby("split").size()
    assert counts["test"] == 1311 and counts["train"] + counts["val"] == 5708
    assert abs(counts["val"] - 571) <= 10  # 10% of train, whole duplicate groups at a time
    # byte-identical files never sit on both sides of the carved train/val boundary
    carved = src.items[src.items["split"].isin(["train", "val"])]
    assert (carved.groupby("sha256")["split"].nunique() == 1).all()


def test_npz_accepts_labels_shaped_n_and_n1(tmp_path, breast_npz):
    with np.load(breast_npz) as z:
        arrays = dict(z)
    official = {k: (v.reshape(-1, 1) if k.endswith("_labels") else v) for k, v in arrays.items()}
    np.savez(tmp_path / "breastmnist.npz", **official)
    a, b = load_source(breast_npz), load_source(tmp_path / "breastmnist.npz")
    assert a.classes == b.classes == ["malignant", "normal_benign"]
    assert (a.items["label"].to_numpy() == b.items["label"].to_numpy()).all()
    assert a.items.groupby(["split", "label"]).size().to_dict() == {
        ("test", 0): 42,
        ("test", 1): 114,
        ("train", 0): 147,
        ("train", 1): 399,
        ("val", 0): 21,
        ("val", 1): 57,
    }


def test_unsplit_folder_is_split_stratified_and_seeded(tmp_path, write_folder):
    write_folder(tmp_path, {"a": 50, "b": 30})
    one, two = load_source(tmp_path, seed=3), load_source(tmp_path, seed=3)
    assert (one.items["split"] == two.items["split"]).all()
    assert not (one.items["split"] == load_source(tmp_path, seed=4).items["split"]).all()
    table = one.items.groupby(["label", "split"]).size().unstack()
    assert table["test"].tolist() == [10, 6] and table["val"].tolist() == [5, 3]


def test_csv_manifest_with_and_without_split(folder, tmp_path):
    files = sorted((folder / "train").rglob("*.png"))
    rows = [(str(p.relative_to(folder)), p.parent.name) for p in files]
    pd.DataFrame(rows, columns=["path", "label"]).to_csv(folder / "m.csv", index=False)
    src = load_source(folder / "m.csv")
    assert src.classes == ["a", "b"] and set(src.items["split"]) == {"train", "val", "test"}
    outside = tmp_path / "elsewhere.csv"
    split = ["test" if i % 4 == 0 else "train" for i in range(len(rows))]
    pd.DataFrame({"path": [r[0] for r in rows], "label": [r[1] for r in rows], "split": split}).to_csv(
        outside, index=False
    )
    with pytest.raises(DataError, match="does not exist under"):
        load_source(outside)  # paths are relative to the data folder, not to where the CSV is
    with pytest.raises(DataError, match="the val split is empty"):
        load_source(outside, data_root=folder, val_fraction=0.0)
    other = load_source(outside, data_root=folder)
    assert (other.items["split"] == "test").sum() == split.count("test") and len(other) == len(rows)


def test_manifest_path_escaping_the_root_is_refused(folder):
    pd.DataFrame({"path": ["train/a/a_train_000.png", "../../etc/passwd"], "label": ["a", "b"]}).to_csv(
        folder / "evil.csv", index=False
    )
    with pytest.raises(DataError, match=r"escapes the data root .*\.\./\.\./etc/passwd"):
        load_source(folder / "evil.csv")


def test_empty_class_folder_and_single_class_are_errors(tmp_path, write_folder):
    write_folder(tmp_path / "one", {"only": 5})
    with pytest.raises(DataError, match="1 class"):
        load_source(tmp_path / "one")
    write_folder(tmp_path / "two", {"a": 5, "b": 5})
    (tmp_path / "two" / "c").mkdir()
    with pytest.raises(DataError, match=r"two/c: class folder is empty"):
        load_source(tmp_path / "two")


def test_bad_images_error_or_are_skipped_and_counted(folder):
    (folder / "train" / "a" / "broken.png").write_bytes(b"")
    (folder / "train" / "b" / "notes.jpg").write_text("not a picture")
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(folder / "train" / "b" / "alpha.png")  # valid: converted, not skipped
    strict = ClassificationData(str(folder), image_size=16, val_fraction=0.2)
    with pytest.raises(ValueError, match=r"(broken\.png: empty file|notes\.jpg: not an image)"):
        strict.setup()
    lenient = ClassificationData(str(folder), image_size=16, val_fraction=0.2, on_bad_image="skip")
    lenient.setup()
    assert sorted(s.rsplit("/", 1)[-1] for s in lenient.skipped) == ["broken.png", "notes.jpg"]
    assert len(lenient.table) == 20 + 12 + 12 + 1 - 0  # all readable images, alpha.png included
    assert not lenient.table["id"].str.contains("broken|notes").any()


def test_dataloader_path_checks_bad_files_up_front(folder):
    (folder / "train" / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    dm = ClassificationData(str(folder), image_size=16, val_fraction=0.2, loader="dataloader", num_workers=0)
    with pytest.raises(ValueError, match="broken.png"):
        dm.setup()


def _pairs_of_near_twins(root, n: int, size: int = 32):
    """n pairs of near-identical images (one pixel changed), the two of a pair in different classes."""
    rng = np.random.default_rng(0)
    for i in range(n):
        a = rng.integers(0, 255, (size, size), dtype=np.uint8)
        b = a.copy()
        b[0, 0] ^= 1
        for cls, img in (("x", a), ("y", b)) if i % 2 else (("y", a), ("x", b)):
            (root / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(root / cls / f"p{i:02d}_{cls}.png")


def test_carving_keeps_near_twins_of_any_class_on_one_side(tmp_path):
    # main grouped by sha256 within a class: near twins of different classes were split apart (13 of 30)
    _pairs_of_near_twins(tmp_path / "d", 30)
    items = load_source(tmp_path / "d", seed=1).items
    pair = items["id"].str.extract(r"p(\d+)_")[0]
    assert (items.groupby(pair)["split"].nunique() == 1).all()
    assert set(items["split"]) == {"train", "val", "test"}


def test_carving_keeps_a_subject_on_one_side(tmp_path, write_folder):
    # neighbouring slices of one patient are different images to a hash, the same patient to a clinician
    root = write_folder(tmp_path / "d", {"a": 40, "b": 40})
    files = sorted(root.rglob("*.png"))
    subject = {p: f"patient{i % 16}" for i, p in enumerate(files)}
    rows = [(str(p.relative_to(root)), p.parent.name, subject[p]) for p in files]
    pd.DataFrame(rows, columns=["path", "label", "group"]).to_csv(root / "m.csv", index=False)
    items = load_source(root / "m.csv", seed=2).items
    assert (items.groupby("group")["split"].nunique() == 1).all()
    assert set(items["split"]) == {"train", "val", "test"}
    # the same from file names, for a folder
    for p in files:
        p.rename(p.with_name(f"{subject[p]}_{p.name}"))
    items = load_source(root, seed=2, group_pattern=r"^(patient\d+)_").items
    assert (items.groupby("group")["split"].nunique() == 1).all()
    with pytest.raises(DataError, match="does not match"):
        load_source(root, group_pattern=r"^(subject\d+)_")


def test_a_class_too_small_for_validation_or_test_is_an_error(tmp_path, write_folder):
    # main gave a 2-image class 0 validation and 0 test images, silently
    write_folder(tmp_path / "d", {"a": 40, "b": 2}, size=8)
    dm = ClassificationData(str(tmp_path / "d"), image_size=8)
    with pytest.raises(DataError, match=r"fewer than 1 (val|test) image.*\{'b': 0\}.*min_eval_per_class"):
        _ = dm.items


def test_near_twins_across_splits_are_dropped_counted_and_warned(tmp_path, caplog):
    # main dropped byte-identical twins only: re-encoded copies of training images stayed in val/test
    root = tmp_path / "d"
    _pairs_of_near_twins(root / "train", 20)
    rng = np.random.default_rng(1)
    for cls in ("x", "y"):  # unrelated test images, and near copies of training images
        (root / "test" / cls).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(
                root / "test" / cls / f"t{i}.png"
            )
        for p in sorted((root / "train" / cls).glob("*.png"))[:3]:
            Image.open(p).save(root / "test" / cls / f"copy_{p.stem}.jpg", quality=95)
    near = ClassificationData(str(root), image_size=32, val_fraction=0.2)
    with caplog.at_level("WARNING"):
        _ = near.items
    assert near.near_twin_rate > 0.05 and "Supply groups" in caplog.text
    assert near.dropped_twins >= 6
    assert not near.items.loc[near.items["split"] == "test", "id"].str.contains("copy_").any()
    exact = ClassificationData(str(root), image_size=32, val_fraction=0.2, drop_test_twins="exact")
    assert exact.items.loc[exact.items["split"] == "test", "id"].str.contains("copy_").sum() == 6
