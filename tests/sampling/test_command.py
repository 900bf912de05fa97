from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from PIL import Image

from synaug.data.sources import load_source
from synaug.sampling import sample
from synaug.tracking import tracking_uri

TINY = dict(embedder="test_efficientnet", pretrained=False, k=2, top_n=3, grid_n=3, batch_size=8)


def artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    """Every artifact file of a run, recursively."""
    found = set()
    for info in client.list_artifacts(run_id, path):
        found |= artifacts(client, run_id, info.path) if info.is_dir else {info.path}
    return found


def check_manifests(out: Path, source, top_n: int) -> pd.DataFrame:
    train = source.items[source.items["split"] == "train"].set_index("id")
    summary = pd.read_csv(out / "clusters.csv")
    assert len(summary) == 2 * len(source.classes)
    for _, row in summary.iterrows():
        manifest = pd.read_csv(out / row["manifest"], keep_default_na=False)
        assert {"id", "path", "class", "cluster", "rank", "similarity"} <= set(manifest.columns)
        assert set(manifest["id"]) <= set(train.index)  # ImageSource ids, from the clustered split only
        assert (train.loc[manifest["id"], "label"].map(source.classes.__getitem__) == row["class"]).all()
        assert (manifest["class"] == row["class"]).all() and (manifest["cluster"] == row["cluster"]).all()
        assert len(manifest) == min(row["size"], top_n) == row["n_selected"]
        assert manifest["rank"].tolist() == list(range(1, len(manifest) + 1))
        assert manifest["similarity"].is_monotonic_decreasing
    sizes = summary.groupby("class")["size"].sum()
    assert sizes.to_dict() == train.groupby("label").size().rename(dict(enumerate(source.classes))).to_dict()
    return summary


def test_sample_writes_manifests_and_logs_to_mlflow(groups_root, tmp_path):
    out = tmp_path / "out"
    run_id = sample(str(groups_root), str(out), copy=True, **TINY)

    source = load_source(groups_root)
    summary = check_manifests(out, source, TINY["top_n"])
    selected = pd.read_csv(out / "selected.csv")
    kept = pd.concat(
        [pd.read_csv(out / m) for m in summary.loc[summary["kept"], "manifest"]], ignore_index=True
    )
    pd.testing.assert_frame_equal(selected, kept)
    for copy, path in zip(selected["copy"], selected["path"], strict=True):
        assert Path(copy).read_bytes() == Path(path).read_bytes()
        assert Path(copy).parent.parent.parent == out

    client = MlflowClient(tracking_uri())
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["k"] == "2" and run.data.params["embedder"] == "test_efficientnet"
    assert run.data.tags["data_fingerprint"] == source.fingerprint
    assert run.data.metrics["images_selected"] == len(selected)
    logged = artifacts(client, run_id)
    assert {
        "embedding_map.png",
        "grids/a.png",
        "grids/b.png",
        "selection/clusters.csv",
        "selection/selected.csv",
    } <= logged
    assert {f"selection/{m}" for m in summary["manifest"]} <= logged
    assert client.get_experiment(run.info.experiment_id).name == "sampling"

    with pytest.raises(FileExistsError, match="not empty"):
        sample(str(groups_root), str(out), **TINY)


def test_sample_from_npz_copies_arrays_as_png(tmp_path):
    rng = np.random.default_rng(0)
    npz = tmp_path / "tiny.npz"
    arrays = {
        f"{s}_images": rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        for s, n in [("train", 16), ("val", 4), ("test", 4)]
    }
    labels = {f"{s}_labels": np.arange(len(arrays[f"{s}_images"])) % 2 for s in ("train", "val", "test")}
    np.savez(npz, **arrays, **labels)
    out = tmp_path / "out"
    sample(str(npz), str(out), copy=True, projection="tsne", threshold=-1.0, classes=["1"], **TINY)

    source = load_source(npz)
    summary = pd.read_csv(out / "clusters.csv")
    assert summary["class"].astype(str).unique().tolist() == ["1"] and summary["kept"].all()
    selected = pd.read_csv(out / "selected.csv")
    assert len(selected) == summary["n_selected"].sum()
    for item_id, copy in zip(selected["id"], selected["copy"], strict=True):
        i = source.items.index[source.items["id"] == item_id][0]
        assert source.items.at[i, "split"] == "train" and source.items.at[i, "label"] == 1
        np.testing.assert_array_equal(np.asarray(Image.open(copy)), source.arrays[i])


def test_sample_rejects_bad_options(groups_root, tmp_path):
    with pytest.raises(ValueError, match=r"unknown class\(es\) \['c'\]"):
        sample(str(groups_root), str(tmp_path / "o1"), classes=["c"], **TINY)
    with pytest.raises(ValueError, match=r"class\(es\) \['b'\]"):
        sample(str(groups_root), str(tmp_path / "o2"), **{**TINY, "k": {"a": 2}})
    with pytest.raises(ValueError, match=r"class 'a' has \d+ train images, fewer than k=12"):
        sample(str(groups_root), str(tmp_path / "o3"), **{**TINY, "k": 12})
