"""`synaug generate`: write N images per class from a trained generator of any registered kind.

The kind comes from the export itself (`kind` in its `generator.json`, or in a Lightning `.ckpt`), and the
registry (`synaug.generators.registry`) loads it. Images go through `write_synthetic` (`<out>/<class>/<index>.png`
+ `manifest.csv`) with their provenance: the generator's MLflow run, the sha256 of its weights, the per-image
seed and the real images it learned from. The settings that, with the seed, determine an image (checkpoint,
sampler, steps, guidance) are kept in `<out>/generation.json`; a folder only ever holds images made with one
set of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from synaug.data.synthetic import Made, image_seed, write_synthetic
from synaug.generators.registry import load_generator


def generate(
    checkpoint: str,
    out: str,
    per_class: int | dict[str, int] = 100,
    classes: list[str] | None = None,
    sampler: dict[str, Any] | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    device: str = "auto",
) -> Path:
    """Generate `per_class` images of each class into the folder `out`, resuming what is already there.

    Args:
        checkpoint: a generator export folder (what training writes at its end, `generator/` beside a run's
            checkpoints) or a Lightning `.ckpt` of a trained generator, of any registered kind: the class-
            conditional diffusion model, the PGGAN (at the growth stage it was saved at), DreamBooth / LoRA /
            textual inversion, or a kind registered elsewhere.
        out: the synthetic image folder. Rerunning the same command after a kill makes exactly the images that
            are missing; raising `per_class` later adds the extra indices.
        per_class: images per class, one number for all, or a mapping class name -> number.
        classes: the classes to generate (default: all the generator can make); only with an int `per_class`.
        sampler: the kind's sampling settings, the arguments of its `load` (diffusion: `scheduler` `ddim` or
            `dpm++`, `steps`, `guidance_scale`; DreamBooth: those and `negative_prompt`, `channels`, `model`;
            the PGGAN has none). A setting the kind does not take is an error naming those it takes.
        batch_size: images per batched sampling call (default: the kind's).
        seed: base seed; image k of class c starts from the noise of `image_seed(seed, c, k)`, recorded in the
            manifest, so the kind's `sample([c], [that seed])` with these settings remakes it.
        device: `auto` (CUDA when present, bf16 autocast there), `cpu`, `cuda`, `cuda:1`, ...

    Returns the output folder.
    """
    gen = load_generator(checkpoint, device, **(sampler or {}))
    if isinstance(per_class, dict):
        if classes is not None:
            raise ValueError("give `classes` with an int `per_class`, or a `per_class` mapping alone")
        counts = dict(per_class)
    else:
        counts = {c: per_class for c in (classes or gen.classes)}
    unknown = sorted(set(counts) - set(gen.classes))
    if unknown:
        raise ValueError(f"class(es) {unknown} unknown to the generator; it can make {gen.classes}")
    negative = {c: n for c, n in counts.items() if n < 0}
    if negative:
        raise ValueError(f"negative image counts: {negative}")
    meta = gen.meta

    def make(batch: list[tuple[str, int]]) -> list[Made]:
        seeds = [image_seed(seed, c, k) for c, k in batch]
        images = gen.sample([c for c, _ in batch], seeds)
        if isinstance(images, torch.Tensor):
            images = images.numpy()  # uint8 (N, C, H, W): one (C, H, W) array per image
        return [Made(image, s) for image, s in zip(images, seeds, strict=True)]

    return write_synthetic(
        out,
        dict(generator=gen.name, checkpoint=meta.checkpoint, **gen.settings(), seed=seed),
        [(c, k) for c, n in counts.items() for k in range(n)],
        make,
        generator=gen.name,
        run_id=meta.run_id,
        checkpoint=meta.checkpoint,
        train_ids=meta.train_ids,
        batch_size=batch_size or gen.batch_size,
    )
