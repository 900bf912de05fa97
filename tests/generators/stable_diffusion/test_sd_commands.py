"""The Stable Diffusion configs through the command line: `synaug fit` of DreamBooth-LoRA on one cluster,
`synaug generate` from its export (resumable), `synaug generate img2img` and `synaug generate from-folder`."""

from pathlib import Path

import pandas as pd
import pytest
from helpers.toy import image_folder  # tests/ is on sys.path (pytest rootdir-less import)
from PIL import Image

from synaug.cli import main
from synaug.data.synthetic import read_synthetic, train_set_fingerprint

CONFIGS = Path(__file__).resolve().parents[3] / "configs" / "generators"
CLASSES = ["glioma", "meningioma", "notumor", "pituitary"]  # the brain MRI classes the configs name


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    return image_folder(tmp_path_factory.mktemp("real"), CLASSES)


def test_dreambooth_lora_on_one_cluster_then_generate_resumably(tiny, real, tmp_path):
    cluster = ["train/glioma/0.png", "train/glioma/2.png"]  # what `synaug sample` writes per cluster
    pd.DataFrame({"id": cluster}).to_csv(tmp_path / "cluster_0.csv", index=False)
    main(
        ["fit", "-c", str(CONFIGS / "dreambooth_lora.yaml"), "--model.init_args.model", tiny]
        + ["--model.init_args.resolution", "32", "--model.init_args.num_class_images", "2"]
        + ["--model.init_args.class_image_steps", "2", "--model.init_args.validation_every", "0"]
        + ["--data.root", str(real), "--data.selection", str(tmp_path / "cluster_0.csv")]
        + ["--data.image_size", "16", "--data.num_workers", "0", "--trainer.max_steps", "2"]
        + ["--trainer.accelerator", "cpu", "--trainer.precision", "32-true"]
        + ["--trainer.default_root_dir", str(tmp_path / "run")]
    )
    (meta,) = (tmp_path / "run").rglob("generator.json")
    export = meta.parent
    assert sorted(p.name for p in export.iterdir()) == [
        "generator.json",
        "pytorch_lora_weights.safetensors",
        "train_ids.txt",
    ]

    out = tmp_path / "syn"
    args = ["generate", str(export), str(out), "-c", str(CONFIGS / "dreambooth_generate.yaml")]
    args += ["--per_class", "3", "--sampler", "{steps: 2}", "--batch_size", "2", "--device", "cpu"]
    main(args)
    items = read_synthetic(out, CLASSES).items
    assert sorted(items["path"]) == [f"glioma/{k:06d}.png" for k in range(3)]  # the one class learned
    assert set(items["generator"]) == {"sd-lora"} and set(items["train_set"]) == {
        train_set_fingerprint(cluster)
    }
    assert Image.open(out / "glioma/000000.png").mode == "L"  # grey, as the training data
    manifest = pd.read_csv(out / "manifest.csv", dtype=str, keep_default_na=False)
    before = (out / "glioma/000001.png").read_bytes()
    manifest[manifest["path"] != "glioma/000001.png"].to_csv(out / "manifest.csv", index=False)
    main(args)  # resumes: remakes exactly the missing image
    after = pd.read_csv(out / "manifest.csv", dtype=str, keep_default_na=False)
    assert sorted(after["path"]) == sorted(manifest["path"])
    assert (out / "glioma/000001.png").read_bytes() == before


def test_img2img_and_import_commands(tiny, real, tmp_path):
    main(
        ["generate", "img2img", str(real), str(tmp_path / "img2img"), "-c", str(CONFIGS / "img2img.yaml")]
        + ["--model", tiny, "--image_size", "32", "--steps", "10"]
        + ["--classes", "[pituitary]", "--device", "cpu"]
    )
    items = read_synthetic(tmp_path / "img2img", CLASSES).items
    assert sorted(items["source"]) == [f"train/pituitary/{i}.png" for i in range(3)]

    main(["generate", "from-folder", str(real / "val"), str(tmp_path / "imported"), "dalle2"])
    items = read_synthetic(tmp_path / "imported", CLASSES).items
    assert len(items) == 4 and set(items["generator"]) == {"dalle2"}
