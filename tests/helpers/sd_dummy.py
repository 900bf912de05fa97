"""A tiny Stable Diffusion pipeline built in code, as diffusers' own tests build theirs (`get_dummy_components`).

The tokenizer is CLIP's: byte-level BPE with the first `merges` merges of the vocabulary open_clip ships (the
one CLIP was trained with), written as `vocab.json` + `merges.txt`, so prompts tokenize as real CLIP prompts
do, over a vocabulary small enough for a 32-wide text encoder.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from open_clip.tokenizer import bytes_to_unicode, default_bpe
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer


def write_clip_vocab(folder: Path, merges: int = 500) -> Path:
    """CLIP's vocabulary truncated to its first `merges` merges, in the files CLIPTokenizer reads."""
    lines = gzip.decompress(Path(default_bpe()).read_bytes()).decode("utf-8").split("\n")
    pairs = [tuple(m.split()) for m in lines[1 : merges + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(p) for p in pairs]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({v: i for i, v in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(p) for p in pairs) + "\n")
    return folder


def get_dummy_components(tmp: Path) -> dict:
    """UNet (4/8 channels, one cross-attention level), VAE (factor 2), 2-layer CLIP text encoder, DDIM."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=2,
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(4, 8),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=2,
    )
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_vocab(tmp / "vocab"), model_max_length=77)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return dict(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
    )


def save_dummy_pipeline(tmp: Path) -> Path:
    """The tiny pipeline as a local checkpoint folder, what `load_pipeline` and the modules read."""
    pipe = StableDiffusionPipeline(**get_dummy_components(tmp), requires_safety_checker=False)
    pipe.save_pretrained(tmp / "tiny-sd")
    return tmp / "tiny-sd"


def save_dummy_sdxl_pipeline(tmp: Path) -> Path:
    """A tiny SDXL pipeline folder: two text encoders (the second with a pooled projection), whose penultimate
    hidden states side by side (32 + 32) are the UNet's context, and the UNet's added time/text embedding."""
    sd = get_dummy_components(tmp)
    tokenizer = sd["tokenizer"]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,
        norm_num_groups=2,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,  # 6 time ids x 8 + the pooled text embedding
    )
    torch.manual_seed(1)
    config = sd["text_encoder"].config.to_dict()
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**{**config, "projection_dim": 32}))
    pipe = StableDiffusionXLPipeline(
        vae=sd["vae"],
        text_encoder=sd["text_encoder"],
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=sd["scheduler"],
        add_watermarker=False,
    )
    pipe.save_pretrained(tmp / "tiny-sdxl")
    return tmp / "tiny-sdxl"
