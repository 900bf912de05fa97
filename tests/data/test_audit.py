import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from synaug.cli import main
from synaug.data import ClassificationData
from synaug.data.audit import audit


def test_brain_mri_cross_split_duplicates_are_found(brain_root, tmp_path):
    """The shared copy has 300 groups of byte-identical files, 189 spanning train and test (216 test images
    with an exact twin in train): the audit must find exactly those, and the clean manifest drop them."""
    clean = tmp_path / "clean.csv"
    f = audit(str(brain_root), write_clean=str(clean))
    exact = f["exact_duplicates"]
    assert (exact["groups"], exact["cross_split_groups"], exact["test_with_train_twin"]) == (300, 189, 216)
    assert f["images"] == 7019 and f["unreadable"] == []
    assert f["counts"]["train"] == {"glioma": 1321, "meningioma": 1339, "notumor": 1591, "pituitary": 1457}
    m = pd.read_csv(clean)
    assert len(m) == 7019 - 216 and (m["split"] == "test").sum() == 1311 - 216
    # the clean manifest is a source: no test image left with a train twin
    dm = ClassificationData(str(clean), data_root=str(brain_root), drop_test_twins="none", image_size=32)
    items = dm.source.items
    train = set(items.loc[items["split"].isin(["train", "val"]), "sha256"])
    assert not items.loc[items["split"] == "test", "sha256"].isin(train).any()


def test_near_duplicates_label_conflicts_and_unreadable(tmp_path, write_folder):
    root = write_folder(tmp_path / "d", {"a": 8, "b": 8}, size=64, split="train")
    write_folder(root, {"a": 4, "b": 4}, size=64, split="test", seed=5)
    src = root / "train" / "a" / "a_train_000.png"
    img = Image.open(src)
    # a re-encoded copy in test (near, not exact) and a byte-identical copy with another label
    img.convert("RGB").save(root / "test" / "a" / "copy.jpg", quality=90)
    shutil.copy(src, root / "train" / "b" / "mislabelled.png")
    (root / "test" / "b" / "broken.png").write_bytes(b"")
    f = audit(str(root), strict=False)
    assert f["exact_duplicates"]["label_conflict_groups"] == 1
    assert f["exact_duplicates"]["cross_split_groups"] == 0
    assert f["near_duplicates"]["test_with_train_twin"] == 1
    assert len(f["unreadable"]) == 1 and "broken.png: empty file" in f["unreadable"][0]
    assert np.isclose(f["imbalance_ratio"], 9 / 8)


def test_audit_exits_non_zero_on_unreadable_files_or_a_class_missing_from_a_split(tmp_path, write_folder):
    # so that a pipeline can gate on `synaug data audit`; main exited 0 whatever it found
    root = write_folder(tmp_path / "d", {"a": 6, "b": 6}, split="train")
    write_folder(root, {"a": 3}, split="test", seed=1)  # class b has no test image
    with pytest.raises(SystemExit) as exit_:
        main(["data", "audit", str(root)])
    assert exit_.value.code == 1
    assert audit(str(root), strict=False)["absent_classes"] == {"test": ["b"]}
    write_folder(root, {"b": 3}, split="test", seed=2)
    assert audit(str(root))["absent_classes"] == {}  # nothing wrong: returns
    (root / "test" / "b" / "broken.png").write_bytes(b"")
    with pytest.raises(SystemExit):
        main(["data", "audit", str(root)])


def test_near_duplicate_groups_do_not_chain(tmp_path):
    # neighbouring slices: each image a small shift of the last, near its neighbours, far from the far end.
    # Main's connected components put the whole series (both classes) in one group.
    from scipy.ndimage import gaussian_filter

    noise = gaussian_filter(np.random.default_rng(0).normal(size=(64, 256)), 4)
    strip = ((noise - noise.min()) / (noise.max() - noise.min()) * 255).astype(np.uint8)
    for i in range(40):
        folder = tmp_path / "d" / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(strip[:, 2 * i : 2 * i + 64]).save(folder / f"s{i:02d}.png")
    # 62 bits: every neighbour pair is within it, so the threshold graph is one connected chain of 40
    near = audit(str(tmp_path / "d"), near_threshold=62)["near_duplicates"]
    assert near["groups"] >= 10 and near["files_in_groups"] <= 4 * near["groups"]
