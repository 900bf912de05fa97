"""`synaug generate`: write N images per class from a trained class-conditional diffusion generator or PGGAN.

Images go through `SyntheticWriter` (`<out>/<class>/<index>.png` + `manifest.csv`) with their provenance: the
generator's MLflow run, the sha256 of its weights file, the per-image seed and the real images it learned from.
The settings that, with the seed, determine an image (checkpoint, sampler, steps, guidance) are kept in
`<out>/generation.json`; a folder only ever holds images made with one set of them. The generator kind comes
from the checkpoint: `kind` in an export's `generator.json`, or the PGGAN state
in a Lightning `.ckpt`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from synaug.data.synthetic import SyntheticWriter, claim_folder
from synaug.generators.diffusion.module import load_generator
from synaug.generators.diffusion.network import SamplerName, sample
from synaug.generators.pggan.module import load_pggan
from synaug.generators.pggan.network import sample as pggan_sample


def image_seed(seed: int, cls: str, index: int) -> int:
    """The seed of image `index` of class `cls`: a hash, so it is independent of batching and of other classes."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{cls}/{index}".encode()).digest()[:8], "big") >> 1


def generate(
    checkpoint: str,
    out: str,
    per_class: int | dict[str, int] = 100,
    classes: list[str] | None = None,
    scheduler: SamplerName = "ddim",
    steps: int = 50,
    guidance_scale: float = 2.0,
    batch_size: int = 256,
    seed: int = 0,
    device: str = "auto",
) -> Path:
    """Generate `per_class` images of each class into the folder `out`, resuming what is already there.

    Args:
        checkpoint: a generator export folder (what training writes at its end, `ClassConditionalDiffusion.
            save_pretrained`, `ProgressiveGAN.save_pretrained`), or a Lightning `.ckpt` of either; either way
            its EMA weights. A PGGAN samples at the growth stage it was saved at.
            A Stable Diffusion DreamBooth / LoRA / textual inversion export (a folder with `dreambooth.json`)
            goes to `synaug.generators.stable_diffusion.dreambooth.generate_dreambooth` with these arguments (give it SD's
            settings, e.g. `-c configs/generators/dreambooth_generate.yaml`).
        out: the synthetic image folder. Rerunning the same command after a kill makes exactly the images that
            are missing; raising `per_class` later adds the extra indices.
        per_class: images per class, one number for all, or a mapping class name -> number.
        classes: the classes to generate (default: all the generator knows); only with an int `per_class`.
        scheduler, steps: sampler (`ddim` or `dpm++`) and its number of steps (diffusion only).
        guidance_scale: classifier-free guidance weight (1: plain conditional sampling; diffusion only).
        batch_size: images per batched sampling call.
        seed: base seed; image k of class c starts from the noise of `image_seed(seed, c, k)`, recorded in the
            manifest, so `sample(unet, [label], [that seed], ...)` with these settings remakes it (a PGGAN's
            latent is `torch.randn` seeded with it: `synaug.generators.pggan.network.sample(g, [label], [that seed])`).
        device: `auto` (CUDA when present, bf16 autocast there), `cpu`, `cuda`, `cuda:1`, ...

    Returns the output folder.
    """
    if (Path(checkpoint) / "dreambooth.json").is_file():
        # Imported here: dreambooth imports this module (image_seed), and the diffusion path needs no peft.
        from synaug.generators.stable_diffusion.dreambooth import generate_dreambooth

        return generate_dreambooth(
            checkpoint,
            out,
            per_class,
            classes,
            scheduler,
            steps,
            guidance_scale,
            batch_size=batch_size,
            seed=seed,
            device=device,
        )
    kind = generator_kind(Path(checkpoint))
    if kind == "pggan":
        # One forward pass from the latent: sampler, steps and guidance do not apply.
        net, meta = load_pggan(checkpoint)
        settings = dict(generator=kind, checkpoint=meta.checkpoint, seed=seed)

        def make(labels, seeds):
            return pggan_sample(net, labels, seeds, image_size=meta.image_size)
    else:
        net, meta = load_generator(checkpoint)
        settings = dict(
            generator=kind,
            checkpoint=meta.checkpoint,
            scheduler=scheduler,
            steps=steps,
            guidance_scale=guidance_scale,
            seed=seed,
        )

        def make(labels, seeds):
            return sample(
                net,
                labels,
                seeds,
                scheduler=scheduler,
                steps=steps,
                guidance_scale=guidance_scale,
                image_size=meta.image_size,
                train_schedule=meta.noise_schedule,
            )

    if isinstance(per_class, dict):
        if classes is not None:
            raise ValueError("give `classes` with an int `per_class`, or a `per_class` mapping alone")
        counts = dict(per_class)
    else:
        counts = {c: per_class for c in (classes or meta.class_names)}
    unknown = sorted(set(counts) - set(meta.class_names))
    if unknown:
        raise ValueError(f"class(es) {unknown} unknown to the generator; it knows {meta.class_names}")
    negative = {c: n for c, n in counts.items() if n < 0}
    if negative:
        raise ValueError(f"negative image counts: {negative}")

    out = Path(out)
    claim_folder(out, settings)

    writer = SyntheticWriter(
        out, generator=kind, run_id=meta.run_id, checkpoint=meta.checkpoint, train_ids=meta.train_ids
    )
    done = writer.done()
    todo = [(c, k) for c, n in counts.items() for k in range(n) if (c, k) not in done]
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    net.to(dev)
    with tqdm(total=len(todo), desc=f"generating into {out}", unit="img") as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            seeds = [image_seed(seed, c, k) for c, k in batch]
            images = make([meta.class_names.index(c) for c, _ in batch], seeds)
            for (c, k), s, image in zip(batch, seeds, images, strict=True):
                writer.write(image.numpy(), c, k, s)
            bar.update(len(batch))
    return out


def generator_kind(path: Path) -> str:
    """`pggan` or `diffusion`, from an export's `generator.json` or the state a Lightning `.ckpt` holds."""
    info = path / "generator.json"
    if info.is_file():
        return json.loads(info.read_text())["kind"]
    if path.suffix == ".ckpt" and path.is_file():
        return "pggan" if "pggan" in torch.load(path, map_location="cpu", weights_only=True) else "diffusion"
    return "diffusion"  # not a generator at all: load_generator's error says what it expected
