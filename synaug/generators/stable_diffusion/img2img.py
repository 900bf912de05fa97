"""img2img noise augmentation (thesis 1): Stable Diffusion variants of every real training image.

Grey images: the VAE is an RGB model, so a grey image is replicated to three channels going in, and the RGB
output is converted back to grey with PIL's luma (ITU-R 601: 0.299 R + 0.587 G + 0.114 B) coming out. With grey
input the model's output channels differ only slightly, so the luma is close to their mean; `channels: 3` keeps
the RGB output instead.

A training-free generator kind (`sd-img2img`): it has no export. `img2img` (the command) writes variants of every
image of a split; `variants` (the kind's `derive`) writes exactly N variants per class of given real rows, which is
how `synaug experiment` and `synaug tune` make a `generate:` source from each real subset
(`synaug.experiment.generators`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from synaug.data.sources import DataError, ImageSource, load_source
from synaug.data.synthetic import Made, image_seed, train_set_fingerprint, write_synthetic
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
    src = load_source(
        data, val_fraction=val_fraction, test_fraction=test_fraction, seed=split_seed, data_root=data_root
    )
    classes = classes or list(src.classes)
    unknown = sorted(set(classes) - set(src.classes))
    if unknown:
        raise DataError(f"class(es) {unknown} are not in {data}; its classes are {src.classes}")
    items = src.items
    real = {}  # (class, index) -> row of its real image
    for c in classes:
        rows = items.index[(items["split"] == split) & (items["label"] == src.classes.index(c))]
        real |= {(c, j * per_image + k): r for j, r in enumerate(rows) for k in range(per_image)}
    return write_img2img(
        src,
        real,
        out,
        dict(split=split, per_image=per_image),
        model=model,
        strength=strength,
        steps=steps,
        guidance_scale=guidance_scale,
        prompts=prompts or {c: default_prompt(c) for c in classes},
        negative_prompt=negative_prompt,
        image_size=image_size,
        channels=channels,
        seed=seed,
        batch_size=batch_size,
        device=device,
    )


def variants(
    src: ImageSource,
    rows: np.ndarray,
    out: str | Path,
    counts: dict[str, int],
    model: str = SD15,
    strength: float = 0.1,
    steps: int = 50,
    guidance_scale: float = 7.5,
    prompts: dict[str, str] | None = None,
    negative_prompt: str | None = None,
    image_size: int = 512,
    channels: Literal[1, 3] = 1,
    seed: int = 0,
    batch_size: int = 8,
    device: str = "auto",
) -> Path:
    """Exactly `counts[c]` img2img variants of class c, of the real rows `rows` of `src` only (a grid's real
    training subset: `synaug.experiment.generators` calls this for a `generate:` source), into `out`.

    Variant k of class c is of the image at position k mod n of a seeded permutation of the class's n rows
    (`seed`, the class): every image gets one variant before any gets two, so each gets floor or ceil of
    counts / n variants, and the images that get the extra one are a seeded random draw, not the first in file
    order (which can follow patients or acquisition). The assignment of an index does not depend on `counts`,
    so a larger count later only adds variants. The other arguments are `img2img`'s.
    """
    labels, ids = src.items["label"].to_numpy(), src.items["id"].to_numpy()
    real = {}  # (class, index) -> row of its real image
    for c, n in counts.items():
        own = np.sort(rows[labels[rows] == src.classes.index(c)])
        if n and not len(own):
            raise ValueError(f"{n} variants of class {c!r} asked for, but the real rows hold none of it")
        order = np.random.default_rng([seed, src.classes.index(c)]).permutation(own)
        real |= {(c, k): int(order[k % len(order)]) for k in range(n)}
    return write_img2img(
        src,
        real,
        out,
        dict(train_set=train_set_fingerprint(ids[rows].tolist())),
        model=model,
        strength=strength,
        steps=steps,
        guidance_scale=guidance_scale,
        prompts=prompts or {c: default_prompt(c) for c in counts},
        negative_prompt=negative_prompt,
        image_size=image_size,
        channels=channels,
        seed=seed,
        batch_size=batch_size,
        device=device,
    )


def default_prompt(c: str) -> str:
    return f"an image of a {c.replace('_', ' ')}"


def write_img2img(
    src: ImageSource,
    real: dict[tuple[str, int], int],
    out: str | Path,
    selection: dict,
    *,
    model: str,
    strength: float,
    steps: int,
    guidance_scale: float,
    prompts: dict[str, str],
    negative_prompt: str | None,
    image_size: int,
    channels: int,
    seed: int,
    batch_size: int,
    device: str,
) -> Path:
    """The variant of the real row `real[(c, k)]` for every (class, index) pair, through the resumable writer;
    `selection` (how the real images were chosen) claims the folder with the sampling settings."""
    if strength and int(strength * steps) < 1:
        raise ValueError(
            f"strength {strength} with {steps} steps denoises int({strength} * {steps}) = 0 steps; "
            "raise the strength or the steps"
        )
    if image_size % 8:
        raise ValueError(f"image_size must be a multiple of 8 (the VAE's downsampling); got {image_size}")
    classes = list(dict.fromkeys(c for c, _ in real))
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
        **selection,
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
    derive=variants,
)
