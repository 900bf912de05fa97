"""End to end: one class's DreamBooth-LoRA (400 steps, prior preservation) then 200 generated images, through
`synaug fit -c configs/generators/dreambooth_lora.yaml` and `synaug generate`, on an SD-1.5-sized pipeline
with random weights (compute does not depend on the values; no download). Prints the seconds of each phase.

    python experiments/bench/dreambooth_lora.py [--work /tmp/db-bench] [--steps 400] [--images 200]
    python experiments/bench/dreambooth_lora.py --tiny      # CPU smoke run of the script itself

Issue 6's target on one H100: under 3 minutes for the fit (class images included) plus the generation.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

ROOT = Path(__file__).resolve().parents[2]
# The test helpers write CLIP's BPE vocabulary as CLIPTokenizer files (and the tiny pipeline of --tiny).
sys.path.insert(0, str(ROOT / "tests" / "generators"))
from helpers.sd_dummy import save_dummy_pipeline, write_clip_vocab  # noqa: E402

from synaug.cli import main  # noqa: E402


def random_sd15(folder: Path, tiny: bool) -> Path:
    """SD 1.5's architecture (860M UNet, 12-layer CLIP ViT-L/14 text encoder, 84M VAE) with random weights."""
    if tiny:
        return save_dummy_pipeline(folder)
    tokenizer = CLIPTokenizer.from_pretrained(
        write_clip_vocab(folder / "vocab", merges=48894)
    )  # 49408 tokens
    text = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=768,
        intermediate_size=3072,
        num_attention_heads=12,
        num_hidden_layers=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
    )
    pipe = StableDiffusionPipeline(
        unet=UNet2DConditionModel(cross_attention_dim=768, sample_size=64),  # the defaults are SD 1.x's
        vae=AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            sample_size=512,
        ),
        text_encoder=CLIPTextModel(text),
        tokenizer=tokenizer,
        scheduler=DDIMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            steps_offset=1,
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder / "sd15-random")
    return folder / "sd15-random"


def main_(args: argparse.Namespace) -> None:
    work = Path(args.work)
    size = 16 if args.tiny else 512
    model = random_sd15(work, args.tiny)
    # A class of 100 grey images (the cluster trained on) beside a second class, as an image folder.
    rng = np.random.default_rng(0)
    for c in ("glioma", "meningioma"):
        (work / "data" / c).mkdir(parents=True, exist_ok=True)
        for i in range(100):
            Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(
                work / "data" / c / f"{i}.png"
            )
    ids = [f"glioma/{i}.png" for i in range(100)]
    pd.DataFrame({"id": ids}).to_csv(work / "cluster.csv", index=False)
    tiny = [
        "--model.init_args.resolution",
        "32",
        "--trainer.accelerator",
        "cpu",
        "--trainer.precision",
        "32-true",
    ]
    fit = [
        "fit",
        "-c",
        str(ROOT / "configs/generators/dreambooth_lora.yaml"),
        "--model.init_args.model",
        str(model),
    ]
    fit += ["--model.init_args.num_class_images", str(args.images), "--trainer.max_steps", str(args.steps)]
    fit += ["--data.root", str(work / "data"), "--data.selection", str(work / "cluster.csv")]
    fit += ["--data.image_size", str(size), "--trainer.default_root_dir", str(work / "run")]
    fit += ["--model.init_args.class_images", str(work / "class_images")]
    fit += tiny if args.tiny else []

    start = time.perf_counter()
    main(fit)
    fitted = time.perf_counter()
    (export,) = {p.parent for p in (work / "run").rglob("generator.json")}
    gen = [
        "generate",
        str(export),
        str(work / "synthetic"),
        "-c",
        str(ROOT / "configs/generators/dreambooth_generate.yaml"),
    ]
    gen += ["--per_class", str(args.images)] + (
        ["--device", "cpu", "--sampler", "{steps: 2}"] if args.tiny else []
    )
    main(gen)
    done = time.perf_counter()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(
        f"{device}: fit {fitted - start:.1f} s ({args.steps} steps, {args.images} class images), "
        f"generation {done - fitted:.1f} s ({args.images} images), total {done - start:.1f} s"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="/tmp/dreambooth-bench")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--tiny", action="store_true")
    main_(parser.parse_args())
