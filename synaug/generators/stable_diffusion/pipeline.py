"""Stable Diffusion as an augmenter: loading a checkpoint, img2img noise augmentation, importing outside images.

Checkpoints: any diffusers Stable Diffusion pipeline (SD 1.x, 2.x, SDXL), as a local folder (what
`pipe.save_pretrained` or `hf download <id> --local-dir <folder>` writes) or a hub id. Without network
(HF_HUB_OFFLINE=1, or none) a hub id loads only from the Hugging Face cache; otherwise `load_pipeline` stops with
an error that names the checkpoint and says how to pass a folder. `runwayml/stable-diffusion-v1-5` has left the
hub; its copy is `stable-diffusion-v1-5/stable-diffusion-v1-5`.

The safety checker is not loaded: on medical images its NSFW classifier fires spuriously and replaces images
with black ones, which would enter a training set as if they were samples.

Grey images (thesis 1, `img2img`): the VAE is an RGB model, so a grey image is replicated to three channels
going in, and the RGB output is converted back to grey with PIL's luma (ITU-R 601: 0.299 R + 0.587 G + 0.114 B)
coming out. With grey input the model's output channels differ only slightly, so the luma is close to their
mean; `channels: 3` keeps the RGB output instead.
"""

from __future__ import annotations

import csv
import hashlib
import os
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from diffusers import AutoPipelineForImage2Image, AutoPipelineForText2Image, DiffusionPipeline
from PIL import Image
from tqdm.auto import tqdm

from synaug.data.images import IMAGE_EXTENSIONS, open_image, to_mode
from synaug.data.sources import DataError, load_source
from synaug.data.synthetic import SyntheticWriter, claim_folder
from synaug.generators.base import sha256
from synaug.generators.generate import image_seed

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"


class CheckpointNotFoundError(OSError):
    """A Stable Diffusion checkpoint that is neither a local pipeline folder nor reachable on the hub."""


def load_pipeline(
    model: str,
    task: Literal["text2image", "image2image"] = "text2image",
    dtype: torch.dtype | None = None,
    **components,
) -> DiffusionPipeline:
    """The diffusers pipeline for `model` (a folder or a hub id), without its safety checker.

    `task` picks the pipeline class for the checkpoint's family (StableDiffusion[XL][Img2Img]Pipeline);
    `components` replace the checkpoint's (e.g. a fine-tuned `unet=`).
    """
    try:
        config = DiffusionPipeline.load_config(model)
        if "safety_checker" in config:
            components = dict(safety_checker=None, requires_safety_checker=False, **components)
        if (
            "text_encoder_2" in config
        ):  # SDXL: its invisible watermark would alter the pixels of training images
            components = dict(add_watermarker=False, **components)
        auto = AutoPipelineForText2Image if task == "text2image" else AutoPipelineForImage2Image
        return auto.from_pretrained(model, dtype=dtype, **components)
    except OSError as err:
        raise CheckpointNotFoundError(not_found_message(model)) from err


def not_found_message(model: str) -> str:
    if Path(model).expanduser().exists():
        return (
            f"{model}: not a diffusers pipeline folder (no model_index.json, or a component missing). "
            "Pass the folder that `pipe.save_pretrained(folder)` or `hf download <id> --local-dir folder` wrote."
        )
    offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") else ""
    msg = (
        f"Stable Diffusion checkpoint {model!r} is not a local folder, not in the Hugging Face cache, and could "
        f"not be fetched from the hub{offline}. Download it on a machine with network, "
        f"`hf download {model} --local-dir /path/to/sd`, and pass the folder instead: model=/path/to/sd."
    )
    if model.startswith("runwayml/"):
        msg += f" `{model}` has left the hub; its community copy is `{SD15}`."
    return msg


def unet_digest(pipe: DiffusionPipeline) -> str:
    """sha256 of the UNet weights file the pipeline loaded (of the shard digests, for a sharded UNet)."""
    folder = Path(pipe.unet.config._name_or_path)
    # Variants (`*.fp16.safetensors`) sit beside the default weights; a name with one dot is the default.
    return files_digest(sorted(f for f in folder.glob("*.safetensors") if f.name.count(".") == 1))


def files_digest(files: list[Path]) -> str:
    """sha256 of one file; of the files' digests for several."""
    if len(files) == 1:
        return sha256(files[0])
    return hashlib.sha256("\n".join(sha256(f) for f in files).encode()).hexdigest()


def pick_device(device: str) -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)


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
    out = Path(out)
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
    claim_folder(out, settings)
    writer = SyntheticWriter(out, generator="sd-img2img", run_id=model, checkpoint=settings["checkpoint"])
    done = writer.done()
    items = src.items
    todo = []  # (class, index, row of the real item)
    for c in classes:
        rows = items.index[(items["split"] == split) & (items["label"] == src.classes.index(c))]
        todo += [
            (c, j * per_image + k, r)
            for j, r in enumerate(rows)
            for k in range(per_image)
            if (c, j * per_image + k) not in done
        ]
    with tqdm(total=len(todo), desc=f"img2img into {out}", unit="img") as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            seeds = [image_seed(seed, c, k) for c, k, _ in batch]
            # Grey sources come out of load() with the grey value replicated in R, G and B.
            x = torch.from_numpy(np.stack([src.load(int(r), image_size, 3) for _, _, r in batch]))
            images = (
                [Image.fromarray(a.permute(1, 2, 0).numpy()) for a in x]
                if strength == 0
                else pipe(
                    prompt=[prompts[c] for c, _, _ in batch],
                    negative_prompt=[negative_prompt] * len(batch) if negative_prompt else None,
                    image=x.float() / 255,
                    strength=strength,
                    num_inference_steps=steps,
                    guidance_scale=guidance_scale,
                    generator=[torch.Generator().manual_seed(s) for s in seeds],
                    output_type="pil",
                ).images
            )
            for (c, k, r), s, image in zip(batch, seeds, images, strict=True):
                writer.write(image.convert("L" if channels == 1 else "RGB"), c, k, s, [items.at[r, "id"]])
            bar.update(len(batch))
    return out


def import_folder(
    folder: str,
    out: str,
    generator: str,
    class_map: dict[str, str] | None = None,
    source_map: str | None = None,
    run_id: str = "external",
    checkpoint: str = "",
    train_ids: str | None = None,
    data: str | None = None,
    channels: Literal[1, 3] | None = None,
) -> Path:
    """Import externally generated images (e.g. thesis 2's DALL-E 2 variations) as a synthetic folder.

    The images are read from `folder/<class folder>/*` and written, with the provenance declared here, through
    SyntheticWriter into `out` (`<class>/<index>.png` in sorted file order, `manifest.csv`, and `imported.csv`
    mapping each original file to its new path). Rerunning resumes.

    Args:
        folder: one subfolder per class of images.
        out: the synthetic folder to write.
        generator: what made the images, for the manifest's `generator` column (e.g. `dalle2-variation`).
        class_map: subfolder name -> class name of the real dataset (default: the subfolder names are the class
            names); only mapped subfolders are imported when given.
        source_map: CSV with columns `file` (path relative to `folder`) and `source` (the real image ids it was
            derived from, `;`-separated): what the leakage guard needs for image variations. Files not in it
            have no source.
        run_id, checkpoint: the manifest's ids of the generator (a job id, a model version).
        train_ids: a text file of the real ids the generator learned from, one a line (none by default: DALL-E
            never saw the dataset).
        data: the real source; when given, class names and source ids are checked against it.
        channels: convert to 1 (grey) or 3 (RGB) channels (default: keep each image's grey or RGB mode).

    External images have no seed: the manifest's `seed` is empty.
    """
    folder, out = Path(folder), Path(out)
    subdirs = sorted(d.name for d in folder.iterdir() if d.is_dir())
    class_map = class_map or {d: d for d in subdirs}
    absent = sorted(set(class_map) - set(subdirs))
    if absent:
        raise DataError(f"{folder}: class_map names subfolder(s) {absent} that do not exist; found {subdirs}")
    files = {
        d: sorted(p for p in (folder / d).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        for d in class_map
    }
    sources: dict[str, list[str]] = {}
    if source_map:
        table = pd.read_csv(source_map, dtype=str, keep_default_na=False)
        if {"file", "source"} - set(table.columns):
            raise DataError(f"{source_map}: needs columns `file` and `source`; has {list(table.columns)}")
        known = {p.relative_to(folder).as_posix() for fs in files.values() for p in fs}
        stray = sorted(set(table["file"]) - known)
        if stray:
            raise DataError(f"{source_map}: file(s) not among the images imported from {folder}: {stray[:5]}")
        sources = {f: s.split(";") if s else [] for f, s in zip(table["file"], table["source"], strict=True)}
    ids = Path(train_ids).read_text().split() if train_ids else []
    if data:
        src = load_source(data, carve=False)
        wrong = sorted(set(class_map.values()) - set(src.classes))
        if wrong:
            raise DataError(f"class(es) {wrong} are not in {data}; its classes are {src.classes}")
        unknown = sorted({s for ss in sources.values() for s in ss} - set(src.items["id"]))
        if unknown:
            raise DataError(f"{source_map}: {len(unknown)} source id(s) not in {data}, e.g. {unknown[0]}")

    claim_folder(
        out,
        dict(
            generator=generator,
            folder=str(folder.resolve()),
            class_map=class_map,
            source_map=str(Path(source_map).resolve()) if source_map else None,
            run_id=run_id,
            checkpoint=checkpoint,
            channels=channels,
        ),
    )
    writer = SyntheticWriter(out, generator=generator, run_id=run_id, checkpoint=checkpoint, train_ids=ids)
    done = writer.done()
    log = out / "imported.csv"
    if not log.exists():
        log.write_text("file,path\n")
    for d, c in class_map.items():
        for k, p in enumerate(files[d]):
            if (c, k) in done:
                continue
            image = open_image(p)
            image = to_mode(image, channels or (1 if image.mode in ("L", "I;16", "I", "F", "LA") else 3))
            rel = p.relative_to(folder).as_posix()
            path = writer.write(image, c, k, "", sources.get(rel, []))  # no seed: an empty `seed`
            with log.open("a", newline="") as f:
                csv.writer(f).writerow([rel, path.relative_to(out).as_posix()])
    return out
