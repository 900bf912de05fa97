"""Stable Diffusion checkpoints, img2img noise augmentation and the import of outside images."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline
from helpers.toy import image_folder  # tests/ is on sys.path (pytest rootdir-less import)
from PIL import Image

from synaug.data.sources import DataError
from synaug.data.synthetic import image_seed, read_synthetic, train_set_fingerprint
from synaug.generators.base import sha256
from synaug.generators.external import import_folder
from synaug.generators.stable_diffusion.img2img import img2img
from synaug.generators.stable_diffusion.pipeline import CheckpointNotFoundError, load_pipeline

CLASSES = ["glioma", "meningioma"]


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    return image_folder(tmp_path_factory.mktemp("real"), CLASSES)


SETTINGS = dict(per_image=2, strength=0.2, steps=10, image_size=32, batch_size=4, device="cpu")


def pixels(path) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(path))).int()


def test_img2img_writes_grey_variants_with_their_real_source_ids(tiny, real, tmp_path):
    out = img2img(str(real), str(tmp_path / "syn"), model=tiny, **SETTINGS)
    items = read_synthetic(out, CLASSES).items
    assert len(items) == 2 * 3 * 2  # classes x training images x variants
    assert set(items["generator"]) == {"sd-img2img"} and set(items["run_id"]) == {tiny}
    assert set(items["checkpoint"]) == {sha256(Path(tiny) / "unet" / "diffusion_pytorch_model.safetensors")}
    for _, row in items.iterrows():
        c, k = row["class"], int(row["path"][-10:-4])
        assert row["source"] == f"train/{c}/{k // 2}.png"  # variant k of training image k // 2, train only
        assert int(row["seed"]) == image_seed(0, c, k)
        image = Image.open(row["file"])
        assert image.mode == "L" and image.size == (32, 32)  # grey in, grey out, at the model's size
    # the two variants of one image differ (their seeds do) and stay near it at strength 0.2
    a, b = pixels(out / "glioma/000000.png"), pixels(out / "glioma/000001.png")
    assert not torch.equal(a, b)


def test_img2img_resumes_exactly_the_missing_images(tiny, real, tmp_path):
    out = tmp_path / "syn"
    img2img(str(real), str(out), model=tiny, **SETTINGS)
    manifest = pd.read_csv(out / "manifest.csv", dtype=str, keep_default_na=False)
    before = {p: pixels(out / p) for p in manifest["path"]}
    mtimes = {p: (out / p).stat().st_mtime_ns for p in manifest["path"]}
    lost = ["glioma/000003.png", "meningioma/000005.png"]  # killed after writing the image, or before
    manifest[~manifest["path"].isin(lost)].to_csv(out / "manifest.csv", index=False)
    (out / lost[1]).unlink()

    img2img(str(real), str(out), model=tiny, **SETTINGS)
    after = pd.read_csv(out / "manifest.csv", dtype=str, keep_default_na=False)
    assert len(after) == 12 and after["path"].is_unique
    for p in set(before) - set(lost):
        assert (out / p).stat().st_mtime_ns == mtimes[p]
    for p in lost:
        assert (pixels(out / p) - before[p]).abs().max() <= 1  # remade from its seed, in another batch
    with pytest.raises(ValueError, match="Resume with the same settings"):
        img2img(str(real), str(out), model=tiny, **{**SETTINGS, "strength": 0.1})


def test_img2img_strength(tiny, real, tmp_path):
    # Diffusers denoises int(strength * steps) steps; at 0 it has nothing to run (and fails obscurely), so
    # img2img refuses it. The honest small-strength property: one step at the last timestep lands near the VAE
    # round trip of the input (the VAE is lossy, so not on the input), much nearer than larger strengths.
    with pytest.raises(ValueError, match="denoises int"):
        img2img(str(real), str(tmp_path / "syn"), model=tiny, strength=0.01, steps=50)
    # Strength 0 adds no noise: the real image itself, resized to `image_size` as the pipeline would see it.
    same = img2img(
        str(real), str(tmp_path / "zero"), model=tiny, **{**SETTINGS, "strength": 0.0, "image_size": 16}
    )
    for _, row in pd.read_csv(same / "manifest.csv").iterrows():
        assert torch.equal(pixels(same / row["path"]), pixels(real / row["source"]))
    pipe = load_pipeline(tiny, "image2image")
    assert isinstance(pipe, StableDiffusionImg2ImgPipeline)
    pipe.set_progress_bar_config(disable=True)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(2)]  # noqa: E731
    with torch.no_grad():
        # What the pipeline does first, with the same per-image generators: encode, sample the latent, decode.
        latents = [pipe.vae.encode(x[i : i + 1] * 2 - 1).latent_dist.sample(g) for i, g in enumerate(gens())]
        round_trip = (pipe.vae.decode(torch.cat(latents)).sample / 2 + 0.5).clamp(0, 1)

    def distance(strength):
        out = pipe(
            ["a", "b"], image=x, strength=strength, num_inference_steps=50, generator=gens(), output_type="pt"
        )
        return (out.images - round_trip).abs().mean().item()

    near, far = distance(0.02), distance(0.2)
    assert near < 0.4 * far, (near, far)


def test_offline_hub_id_without_cache_names_the_model_and_the_folder_option(tmp_path):
    with pytest.raises(CheckpointNotFoundError) as err:
        load_pipeline("stable-diffusion-v1-5/stable-diffusion-v1-5")
    msg = str(err.value)
    assert "'stable-diffusion-v1-5/stable-diffusion-v1-5'" in msg and "HF_HUB_OFFLINE" in msg
    assert "--local-dir" in msg and "pass the folder" in msg
    with pytest.raises(CheckpointNotFoundError, match="community copy is `stable-diffusion-v1-5/"):
        load_pipeline("runwayml/stable-diffusion-v1-5")
    with pytest.raises(CheckpointNotFoundError, match="not a diffusers pipeline folder"):
        load_pipeline(str(tmp_path))


def test_import_folder_records_the_declared_provenance(real, tmp_path):
    ext = tmp_path / "dalle"
    for d in ("glioma_variations", "men"):
        (ext / d).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (20, 20), (i * 50, 10, 10)).save(ext / d / f"v{i}.png")
    (tmp_path / "sources.csv").write_text(
        "file,source\nglioma_variations/v0.png,train/glioma/0.png\nmen/v1.png,train/meningioma/1.png;train/meningioma/2.png\n"
    )
    (tmp_path / "train_ids.txt").write_text("train/glioma/0.png\n")
    args = dict(
        folder=str(ext),
        generator="dalle2-variation",
        class_map={"glioma_variations": "glioma", "men": "meningioma"},
        source_map=str(tmp_path / "sources.csv"),
        run_id="openai-2023-05",
        data=str(real),
    )
    out = import_folder(out=str(tmp_path / "syn"), train_ids=str(tmp_path / "train_ids.txt"), **args)
    items = read_synthetic(out, CLASSES).items.set_index("path")
    assert list(items.index) == [
        "glioma/000000.png",
        "glioma/000001.png",
        "meningioma/000000.png",
        "meningioma/000001.png",
    ]
    assert set(items["generator"]) == {"dalle2-variation"} and set(items["run_id"]) == {"openai-2023-05"}
    assert items.at["glioma/000000.png", "source"] == "train/glioma/0.png"
    assert items.at["glioma/000001.png", "source"] == ""
    assert items.at["meningioma/000001.png", "source"] == "train/meningioma/1.png;train/meningioma/2.png"
    assert set(items["seed"]) == {""} and set(items["train_set"]) == {
        train_set_fingerprint(["train/glioma/0.png"])
    }
    assert Image.open(out / "meningioma/000001.png").mode == "RGB"
    log = pd.read_csv(out / "imported.csv")
    assert log.set_index("file").at["men/v1.png", "path"] == "meningioma/000001.png"

    import_folder(out=str(out), train_ids=str(tmp_path / "train_ids.txt"), **args)  # resumes: nothing to do
    assert len(pd.read_csv(out / "manifest.csv")) == 4

    (tmp_path / "bad.csv").write_text("file,source\nmen/v0.png,train/meningioma/99.png\n")
    with pytest.raises(DataError, match="source id"):
        import_folder(out=str(tmp_path / "bad"), **{**args, "source_map": str(tmp_path / "bad.csv")})
    with pytest.raises(DataError, match="not in"):
        import_folder(
            out=str(tmp_path / "bad2"), **{**args, "class_map": {"men": "pituitary"}, "source_map": None}
        )
