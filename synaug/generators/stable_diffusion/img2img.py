"""img2img noise augmentation (thesis 1): Stable Diffusion variants of every real training image.

Grey images: the VAE is an RGB model, so a grey image is replicated to three channels going in, and the RGB
output is converted back to grey with PIL's luma (ITU-R 601: 0.299 R + 0.587 G + 0.114 B) coming out. With grey
input the model's output channels differ only slightly, so the luma is close to their mean; `channels: 3` keeps
the RGB output instead.

A training-free generator kind (`sd-img2img`): it has no export, its command writes the synthetic folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from synaug.data.sources import DataError, load_source
from synaug.data.synthetic import Made, image_seed, write_synthetic
from synaug.generators.registry import register
from synaug.generators.stable_diffusion.pipeline import SD15, load_pipeline, unet_digest
from synaug.utils import pick_device


def img2img(
    data: str,
    out: str,
    model: str = SD15,
    per_image: int = 1,
    strength: float = 0.1,
    steps: int = 50,
    guidance_scale: float = 7.5,
    prompts: dict[str, str] | None = None,
    negative_prompt: str | None = None,
    classes: list[str] | None = None,
    split: Literal["train", "val", "test"] = "train",
    image_size: int = 512,
    channels: Literal[1, 3] = 1,
    seed: int = 0,
    batch_size: int = 8,
    device: str = "auto",
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    data_root: str | None = None,
) -> Path:
    """Noise augmentation (thesis 1): `per_image` img2img variants of every real image of `split`, into `out`.

    Each real image is encoded by the VAE, noised to `strength` of the schedule and denoised over the last
    `strength * steps` of `steps` steps towards its class prompt, so low strengths (0.05-0.20) keep the anatomy
    and vary texture and noise. Variants are written through SyntheticWriter (generator `sd-img2img`) with their
    real image's id in `source`, so the leakage guard keeps them on the side of the split their source is on.

    Args:
        data: the real source (folder, MedMNIST .npz or CSV), split as ClassificationData splits it: give the
            same `val_fraction`, `test_fraction`, `split_seed`, `data_root` as the data config.
        out: the synthetic folder; rerun the same command to resume, it makes exactly the missing images.
        model: Stable Diffusion checkpoint, a folder or a hub id (SD 1.x, 2.x, SDXL).
        per_image: variants per real image; variant k of the j-th image of class c is index j * per_image + k.
        strength: share of the noise schedule added; diffusers denoises int(strength * steps) steps, which must
            be at least 1. Strength 0 adds no noise, so each "variant" is its real image as it is (no VAE round
            trip): the control that tells the effect of the noise from that of repeating real images.
        steps, guidance_scale: the sampler's step count over the full schedule and the classifier-free guidance.
        prompts: class name -> prompt (default: "an image of a <class name>" for every class).
        negative_prompt: one negative prompt for all classes.
        classes: the classes to augment (default: all).
        image_size: the side images are resized to for the model and written at; a multiple of 8.
        channels: 1 writes grey (luma of the RGB output), 3 writes RGB.
        seed: image `index` of class `c` uses the seed `image_seed(seed, c, index)`, recorded in the manifest.
        batch_size: images per pipeline call.
        device: `auto` (CUDA in bf16 when present), `cpu`, `cuda`, `cuda:1`, ...

    Returns the output folder.
    """
    if strength and int(strength * steps) < 1:
        raise ValueError(
            f"strength {strength} with {steps} steps denoises int({strength} * {steps}) = 0 steps; "
            "raise the strength or the steps"
        )
    if image_size % 8:
        raise ValueError(f"image_size must be a multiple of 8 (the VAE's downsampling); got {image_size}")
    src = load_source(
        data, val_fraction=val_fraction, test_fraction=test_fraction, seed=split_seed, data_root=data_root
    )
    classes = classes or list(src.classes)
    unknown = sorted(set(classes) - set(src.classes))
    if unknown:
        raise DataError(f"class(es) {unknown} are not in {data}; its classes are {src.classes}")
    prompts = prompts or {c: f"an image of a {c.replace('_', ' ')}" for c in classes}
    missing = sorted(set(classes) - set(prompts))
    if missing:
        raise ValueError(f"no prompt for class(es) {missing}; `prompts` must name every class augmented")

    dev = pick_device(device)
    pipe = load_pipeline(
        model, "image2image", dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32
    ).to(dev)
    pipe.set_progress_bar_config(disable=True)
    settings = dict(
        generator="sd-img2img",
        model=model,
        checkpoint=unet_digest(pipe),
        data=src.fingerprint,
        split=split,
        per_image=per_image,
        strength=strength,
        steps=steps,
        guidance_scale=guidance_scale,
        prompts={c: prompts[c] for c in classes},
        negative_prompt=negative_prompt,
        image_size=image_size,
        channels=channels,
        seed=seed,
    )
    items = src.items
    real = {}  # (class, index) -> row of its real image
    for c in classes:
        rows = items.index[(items["split"] == split) & (items["label"] == src.classes.index(c))]
        real |= {(c, j * per_image + k): r for j, r in enumerate(rows) for k in range(per_image)}

    def make(batch: list[tuple[str, int]]) -> list[Made]:
        seeds = [image_seed(seed, c, k) for c, k in batch]
        # Grey sources come out of load() with the grey value replicated in R, G and B.
        x = torch.from_numpy(np.stack([src.load(int(real[b]), image_size, 3) for b in batch]))
        images = (
            [Image.fromarray(a.permute(1, 2, 0).numpy()) for a in x]
            if strength == 0
            else pipe(
                prompt=[prompts[c] for c, _ in batch],
                negative_prompt=[negative_prompt] * len(batch) if negative_prompt else None,
                image=x.float() / 255,
                strength=strength,
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                generator=[torch.Generator().manual_seed(s) for s in seeds],
                output_type="pil",
            ).images
        )
        mode = "L" if channels == 1 else "RGB"
        return [
            Made(image.convert(mode), s, [items.at[real[b], "id"]])
            for b, s, image in zip(batch, seeds, images, strict=True)
        ]

    return write_synthetic(
        out,
        settings,
        list(real),
        make,
        generator="sd-img2img",
        run_id=model,
        checkpoint=settings["checkpoint"],
        batch_size=batch_size,
    )


register(
    "sd-img2img",
    "Stable Diffusion img2img variants of real training images (noise augmentation); training-free",
    command=img2img,
)
