"""The generator contract: a new learned kind needs only new files; the registry; the one metadata schema."""

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from helpers import mean_image  # noqa: F401  (registers the `mean-image` kind)
from helpers.toy import image_folder  # tests/ is on sys.path (pytest rootdir-less import)
from PIL import Image

from synaug.cli import main
from synaug.data.synthetic import image_seed, read_synthetic
from synaug.generators import registry
from synaug.generators.base import checkpoint_kind, read_export

CLASSES = ["glioma", "meningioma"]


def test_a_new_learned_generator_trains_with_fit_and_samples_with_generate(tmp_path):
    real = image_folder(tmp_path / "real", CLASSES)
    # No test_after_fit, no limit_val_batches: the CLI knows a generator from a classifier.
    config = tmp_path / "mean_image.yaml"
    config.write_text(
        f"""
model:
  class_path: helpers.mean_image.MeanImage
  init_args: {{noise: 0.05, sample_every: 10}}
data:
  root: {real}
  image_size: 16
  channels: 1
  batch_size: 6
  num_workers: 0
trainer:
  max_steps: 30
  accelerator: cpu
  enable_progress_bar: false
  default_root_dir: {tmp_path / "outputs"}
  logger:
    class_path: synaug.tracking.MLFlowLogger
    init_args: {{experiment_name: contract-test}}
"""
    )
    main(["fit", "-c", str(config)])
    (info,) = (tmp_path / "outputs").rglob("generator.json")
    export = info.parent
    meta = read_export(export)
    assert (meta.kind, meta.class_names, meta.image_size, meta.channels) == ("mean-image", CLASSES, 16, 1)
    assert sorted(meta.train_ids) == sorted(f"train/{c}/{i}.png" for c in CLASSES for i in range(3))
    client = mlflow.MlflowClient()
    grids = [f.path for f in client.list_artifacts(meta.run_id, "samples")]
    assert grids == ["samples/step_0000010.png", "samples/step_0000020.png", "samples/step_0000030.png"]
    assert "test/acc" not in client.get_run(meta.run_id).data.metrics  # no test pass after a generator's fit

    out = tmp_path / "syn"
    args = [
        "generate",
        str(export),
        str(out),
        "--per_class",
        "3",
        "--sampler",
        "{noise: 0.0}",
        "--device",
        "cpu",
    ]
    main(args)
    items = read_synthetic(out, CLASSES).items
    assert sorted(items["path"]) == [f"{c}/{k:06d}.png" for c in CLASSES for k in range(3)]
    assert set(items["generator"]) == {"mean-image"} and set(items["run_id"]) == {meta.run_id}
    assert [int(s) for s in items.sort_values("path")["seed"]] == [
        image_seed(0, c, k) for c in CLASSES for k in range(3)
    ]
    for c in CLASSES:  # it learned: without noise each image is its class's mean training image
        mean = np.mean(
            [np.array(Image.open(real / "train" / c / f"{i}.png"), float) for i in range(3)], axis=0
        )
        made = np.array(Image.open(out / c / "000000.png"), float)
        assert np.abs(made - mean).max() <= 2, c

    # Killed after writing an image but before its row: the rerun makes exactly that image.
    manifest = pd.read_csv(out / "manifest.csv", dtype=str, keep_default_na=False)
    manifest[manifest["path"] != "glioma/000001.png"].to_csv(out / "manifest.csv", index=False)
    (out / "glioma/000001.png").unlink()
    main(args)
    assert sorted(pd.read_csv(out / "manifest.csv")["path"]) == sorted(items["path"])
    # other settings, same folder: a user error (one line, exit 2; `--debug` for the ValueError)
    with pytest.raises(ValueError, match="holds images generated with"):
        main(
            [
                "--debug",
                "generate",
                str(export),
                str(out),
                "--per_class",
                "3",
                "--sampler",
                "{noise: 0.5}",
                "--device",
                "cpu",
            ]
        )
    with pytest.raises(ValueError, match=r"takes the sampling options \['noise'\]; unknown: \['steps'\]"):
        main(
            [
                "--debug",
                "generate",
                str(export),
                str(tmp_path / "other"),
                "--sampler",
                "{steps: 2}",
                "--device",
                "cpu",
            ]
        )


def test_every_builtin_kind_is_registered_once_with_how_to_train_and_load_it():
    kinds = registry.kinds()
    assert set(registry.BUILTIN) <= set(kinds)
    for name in ("diffusion", "pggan", "dreambooth"):  # learned: a LightningModule and a loader
        assert kinds[name].module is not None and kinds[name].load is not None, name
    for name in ("sd-img2img", "transform", "import"):  # training-free: a command writing a folder
        assert kinds[name].module is None and kinds[name].command is not None, name
    with pytest.raises(ValueError, match="already registered"):
        registry.register("diffusion", "again", command=print)
    with pytest.raises(KeyError, match="unknown generator kind 'nope'"):
        registry.get("nope")


def test_an_export_names_its_kind_and_a_folder_without_one_is_refused(tmp_path):
    (tmp_path / "generator.json").write_text('{"kind": "pggan"}')
    assert checkpoint_kind(tmp_path) == "pggan"
    with pytest.raises(FileNotFoundError, match="expected a generator export folder or a Lightning .ckpt"):
        checkpoint_kind(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="not a generator export"):
        checkpoint_kind(empty)


def test_checkpoints_name_their_kind_and_older_ones_still_resolve(tmp_path):
    for state, kind in [
        ({"generator": {"kind": "mean-image"}}, "mean-image"),
        ({"pggan": {"iteration": 0}, "generator": {}}, "pggan"),  # written before `kind`
        ({"ema": {}, "generator": {"train_ids": []}}, "diffusion"),  # written before `kind`
    ]:
        torch.save({"state_dict": {}, **state}, tmp_path / "g.ckpt")
        assert checkpoint_kind(tmp_path / "g.ckpt") == kind
    torch.save({"state_dict": {}}, tmp_path / "classifier.ckpt")
    with pytest.raises(ValueError, match="not a generator checkpoint"):
        checkpoint_kind(tmp_path / "classifier.ckpt")
