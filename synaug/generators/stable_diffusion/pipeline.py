"""Loading a Stable Diffusion checkpoint without its safety checker, offline; the digest of its UNet.

Checkpoints: any diffusers Stable Diffusion pipeline (SD 1.x, 2.x, SDXL), as a local folder (what
`pipe.save_pretrained` or `hf download <id> --local-dir <folder>` writes) or a hub id. Without network
(HF_HUB_OFFLINE=1, or none) a hub id loads only from the Hugging Face cache; otherwise `load_pipeline` stops with
an error that names the checkpoint and says how to pass a folder. `runwayml/stable-diffusion-v1-5` has left the
hub; its copy is `stable-diffusion-v1-5/stable-diffusion-v1-5`.

The safety checker is not loaded: on medical images its NSFW classifier fires spuriously and replaces images
with black ones, which would enter a training set as if they were samples.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import torch
from diffusers import AutoPipelineForImage2Image, AutoPipelineForText2Image, DiffusionPipeline

from synaug.generators.base import files_digest

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
