"""`generate`: images per class with provenance, exact resume after a kill, one set of settings per folder."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import synaug.generators.diffusion.module as diffusion_module
from synaug.data.synthetic import image_seed, read_synthetic, train_set_fingerprint
from synaug.generators.diffusion.module import ClassConditionalDiffusion, load_diffusion
from synaug.generators.diffusion.network import sample
from synaug.generators.generate import generate

CLASSES = ["glioma", "meningioma"]
TRAIN_IDS = ["train/glioma/1.png", "train/glioma/2.png", "train/meningioma/1.png"]
SETTINGS = dict(sampler=dict(steps=2), batch_size=4, device="cpu")


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """An untrained tiny generator, exported as training would leave it, with its provenance."""
    torch.manual_seed(0)
    model = ClassConditionalDiffusion(
        num_classes=2, in_chans=1, image_size=16, class_names=CLASSES, preset="tiny"
    )
    model.train_ids, model.run_id = TRAIN_IDS, "run-123"
    return model.save_pretrained(tmp_path_factory.mktemp("gen") / "export")


def pixels(path):
    return torch.from_numpy(np.array(Image.open(path))).int()


def test_generate_writes_per_class_images_with_provenance(export, tmp_path):
    out = generate(str(export), str(tmp_path / "syn"), per_class=3, **SETTINGS)
    syn = read_synthetic(out, CLASSES)
    items = syn.items
    assert sorted(items["path"]) == [f"{c}/{k:06d}.png" for c in CLASSES for k in range(3)]
    assert set(items["generator"]) == {"diffusion"} and set(items["run_id"]) == {"run-123"}
    assert set(items["checkpoint"]) == {load_diffusion(export)[1].checkpoint}
    assert items["checkpoint"][0] and len(items["checkpoint"][0]) == 64
    assert set(items["train_set"]) == {train_set_fingerprint(TRAIN_IDS)}
    assert syn.train_ids(items["train_set"][0]) == sorted(TRAIN_IDS)
    for _, row in items.iterrows():
        c, k = row["class"], int(row["path"][-10:-4])
        assert int(row["seed"]) == image_seed(0, c, k)
        assert Image.open(row["file"]).size == (16, 16) and Image.open(row["file"]).mode == "L"

    # The recorded seed remakes the image on its own, out of its batch.
    unet, meta = load_diffusion(export)
    row = items.iloc[4]
    again = sample(
        unet,
        [CLASSES.index(row["class"])],
        [int(row["seed"])],
        steps=2,
        guidance_scale=2.0,
        train_schedule=meta.info["noise_schedule"],
    )
    assert (again[0, 0].int() - pixels(row["file"])).abs().max() <= 1

    assert generate(str(export), str(out), per_class={"meningioma": 4}, **SETTINGS) == out  # adds index 3
    assert len(pd.read_csv(out / "manifest.csv")) == 7


def test_resume_after_kill_makes_exactly_the_missing_images(export, tmp_path, monkeypatch):
    out = tmp_path / "syn"
    generate(str(export), str(out), per_class=5, **SETTINGS)
    manifest = pd.read_csv(out / "manifest.csv", dtype=str, keep_default_na=False)
    before = {p: pixels(out / p) for p in manifest["path"]}
    mtimes = {p: (out / p).stat().st_mtime_ns for p in manifest["path"]}

    # A kill leaves an image without its row (killed between the two writes) or neither (killed in sampling).
    lost = ["glioma/000003.png", "meningioma/000004.png"]
    manifest[~manifest["path"].isin(lost)].to_csv(out / "manifest.csv", index=False)
    (out / lost[1]).unlink()

    made = []

    def counting_sample(unet, labels, seeds, **kw):
        made.extend(seeds)
        return sample(unet, labels, seeds, **kw)

    monkeypatch.setattr(diffusion_module, "sample", counting_sample)
    generate(str(export), str(out), per_class=5, **SETTINGS)

    assert sorted(made) == sorted([image_seed(0, "glioma", 3), image_seed(0, "meningioma", 4)])
    after = pd.read_csv(out / "manifest.csv", dtype=str, keep_default_na=False)
    assert len(after) == 10 and after["path"].is_unique
    assert set(after["path"]) == set(before)
    for p in set(before) - set(lost):
        assert (out / p).stat().st_mtime_ns == mtimes[p]  # untouched
    for p in lost:
        assert (pixels(out / p) - before[p]).abs().max() <= 1  # the same image as before the kill

    generate(str(export), str(out), per_class=5, **SETTINGS)  # nothing left to do
    assert len(made) == 2 and len(pd.read_csv(out / "manifest.csv")) == 10


def test_generate_refuses_mixed_settings_and_unknown_classes(export, tmp_path):
    out = tmp_path / "syn"
    generate(str(export), str(out), per_class=1, **SETTINGS)
    with pytest.raises(ValueError, match="Resume with the same settings"):
        generate(str(export), str(out), per_class=2, **{**SETTINGS, "sampler": {"steps": 3}})
    with pytest.raises(ValueError, match="unknown to the generator"):
        generate(str(export), str(tmp_path / "other"), per_class=1, classes=["pituitary"], **SETTINGS)
    with pytest.raises(ValueError, match="or a `per_class` mapping alone"):
        generate(
            str(export), str(tmp_path / "other"), per_class={"glioma": 1}, classes=["glioma"], **SETTINGS
        )


def test_an_export_from_before_the_one_schema_generates_the_same_images(export, tmp_path):
    # GeneratorMeta's generator.json had neither `module` nor `weights`: such a folder still loads and samples.
    old = tmp_path / "old_export"
    shutil.copytree(export, old)
    info = json.loads((old / "generator.json").read_text())
    del info["module"], info["weights"]
    (old / "generator.json").write_text(json.dumps(info))
    new = generate(str(export), str(tmp_path / "new"), per_class=2, **SETTINGS)
    again = generate(str(old), str(tmp_path / "old"), per_class=2, **SETTINGS)
    assert load_diffusion(old)[1].checkpoint == load_diffusion(export)[1].checkpoint
    for c in CLASSES:
        for k in range(2):
            assert (again / c / f"{k:06d}.png").read_bytes() == (new / c / f"{k:06d}.png").read_bytes()
