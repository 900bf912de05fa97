"""Bad inputs: each one is refused with one line naming the file or key and what to do."""

import os
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from synaug.cli import main
from synaug.data.sources import DataError, load_source


def write_folder(root, counts: dict[str, int], seed: int = 0, split: str | None = None):
    rng = np.random.default_rng(seed)
    for name, n in counts.items():
        folder = root / split / name if split else root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(folder / f"{name}_{i}.png")
    return root


@pytest.fixture
def outside(tmp_path):
    return write_folder(tmp_path / "elsewhere", {"a": 3}, seed=5)


@pytest.mark.parametrize("kind", ["file", "directory", "class-directory", "inside-directory"])
def test_folder_source_refuses_symlinks_naming_link_and_target(tmp_path, outside, kind, figures):
    root = write_folder(tmp_path / "data", {"a": 4, "b": 4}, split="train")
    if kind == "file":
        link, target = root / "train" / "a" / "extra.png", next((outside / "a").iterdir())
    elif kind == "directory":
        link, target = root / "train" / "a" / "more", outside / "a"
    elif kind == "class-directory":
        link, target = root / "train" / "c", outside / "a"
    else:
        link, target = root / "train" / "b" / "again", root / "train" / "a"
    os.symlink(target, link)
    with pytest.raises(DataError) as err:
        load_source(root)
    message = str(err.value)
    assert str(link) in message and str(target.resolve()) in message
    figures("bad inputs refused", f"image folder with a {kind} symlink", message)


# ---- through the command line: one line naming the file or key, exit 2, no traceback, no empty run ----


def fit_args(root, experiment: str, *extra: str) -> list[str]:
    args = ["fit", "--model", "synaug.classifiers.ImageClassifier", "--model.backbone", "basic_cnn"]
    args += ["--data.root", str(root), "--data.image_size", "28", "--trainer.max_epochs", "1"]
    args += ["--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1"]
    args += [
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.logger.init_args.experiment_name",
        experiment,
    ]
    return [*args, *extra]


def npz(tmp_path, **arrays) -> Path:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    return path


IMAGES = np.zeros((6, 28, 28), np.uint8)
LABELS = np.array([0, 1, 0, 1, 0, 1])


@pytest.fixture(scope="module")
def synthetic(breast_npz, tmp_path_factory) -> Path:
    from synaug.generators.transform import transform_generate

    folder = tmp_path_factory.mktemp("synthetic") / "transform"
    transform_generate(str(breast_npz), str(folder), per_class={"malignant": 4}, image_size=28)
    return folder


CASES = {
    "model_kwargs typo": (
        lambda t, n, s: fit_args(n, "e1", "--model.model_kwargs", "{hiden: [8]}"),
        "'hiden'",
    ),
    "negative synthetic_ratio": (
        lambda t, n, s: fit_args(
            n, "e2", "--data.synthetic", f"[{s}]", "--data.synthetic_ratio", "{malignant: -0.5}"
        ),
        "synthetic_ratio: negative value(s) {'malignant': -0.5}",
    ),
    "npz without labels": (lambda t, n, s: fit_args(npz(t, train_images=IMAGES), "e3"), "no train_labels"),
    "npz labels but no images": (
        lambda t, n, s: fit_args(npz(t, train_labels=LABELS), "e4"),
        "no train_images",
    ),
    "npz labels shorter than images": (
        lambda t, n, s: fit_args(npz(t, train_images=IMAGES, train_labels=LABELS[:4]), "e5"),
        "6 train_images but 4 train_labels",
    ),
    "real_fraction out of range": (
        lambda t, n, s: fit_args(n, "e6", "--data.real_fraction", "1.5"),
        "real_fraction must be in (0, 1], got {'malignant': 1.5, 'normal_benign': 1.5}",
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_a_user_error_is_one_line_and_exit_2(
    case, breast_npz, synthetic, tmp_path, monkeypatch, capsys, figures
):
    monkeypatch.chdir(tmp_path)
    make, expected = CASES[case]
    args = make(tmp_path, breast_npz, synthetic)
    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and "Traceback" not in "\n".join(err)
    assert err[-1].startswith("synaug: error: ") and expected in err[-1], err[-3:]
    experiment = args[args.index("--trainer.logger.init_args.experiment_name") + 1]
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    assert exp is None or not client.search_runs([exp.experiment_id])  # no empty FAILED run
    figures("bad inputs refused", case, err[-1])


def test_debug_shows_the_traceback(breast_npz, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="no train_labels"):
        main([*fit_args(npz(tmp_path, train_images=IMAGES), "e7"), "--debug"])


@pytest.mark.parametrize("kind", ["corrupt", "not writable"])
def test_an_unusable_mlflow_store_is_named(kind, breast_npz, tmp_path, monkeypatch, capsys, figures):
    monkeypatch.chdir(tmp_path)
    store = tmp_path / "store" / "mlflow.db"
    if kind == "corrupt":
        store.parent.mkdir()
        store.write_bytes(b"this is no SQLite database\n" * 100)
    else:  # its folder cannot be created (a file has the name): what a read-only mount does, also for root
        store.parent.write_text("")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    with pytest.raises(SystemExit) as exit_:
        main(fit_args(breast_npz, "e8"))
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 2 and f"{store}: cannot open the MLflow store" in line, line
    figures("bad inputs refused", f"{kind} MLflow store", line)


def test_a_synthetic_file_missing_from_disk_is_named_or_skipped(breast_npz, synthetic, tmp_path, figures):
    from synaug.data import ClassificationData
    from synaug.data.images import BadImageError

    gone = tmp_path / "transform"
    shutil.copytree(synthetic, gone)
    victims = sorted(gone.rglob("*.png"))
    for v in victims:  # every file the manifest lists is gone: whichever the draw picks is missing
        v.unlink()
    kw = dict(root=str(breast_npz), image_size=28, synthetic=[str(gone)], synthetic_ratio={"malignant": 0.01})
    with pytest.raises(BadImageError, match="listed but not on disk") as err:
        ClassificationData(**kw).setup("fit")
    assert any(v.name in str(err.value) for v in victims)
    skipping = ClassificationData(**kw, on_bad_image="skip")
    skipping.setup("fit")  # `on_bad_image: skip` applies to missing files too
    assert skipping.skipped and all(any(v.name in str(s) for v in victims) for s in skipping.skipped)
    figures("bad inputs refused", "synthetic manifest row whose file is missing", str(err.value))


def test_a_real_manifest_row_whose_file_is_missing_is_named_or_skipped(brain_root, tmp_path, figures):
    from synaug.data import ClassificationData

    shipped = pd.read_csv(brain_root / "manifest.csv")
    rows = shipped[shipped["split"] == "train"].groupby("class").head(6)
    table = pd.DataFrame({"path": rows["path"], "label": rows["class"]})
    table.loc[len(table)] = ["train/glioma/not-there.jpg", "glioma"]
    csv = tmp_path / "manifest.csv"
    table.to_csv(csv, index=False)
    kw = dict(root=str(csv), data_root=str(brain_root), image_size=16, val_fraction=0.25, test_fraction=0.25)
    with pytest.raises(DataError, match="not-there.jpg.*on_bad_image: skip") as err:
        ClassificationData(**kw).setup("fit")
    skipping = ClassificationData(**kw, on_bad_image="skip")
    skipping.setup("fit")
    assert skipping.skipped == ["train/glioma/not-there.jpg"]
    assert len(skipping.source) == len(rows)  # every image on disk is kept
    figures("bad inputs refused", "CSV manifest row whose file is missing", str(err.value))
