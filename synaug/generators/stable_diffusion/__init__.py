"""Stable Diffusion: `pipeline` (loading a checkpoint), `dreambooth` (DreamBooth / LoRA / textual inversion
training), `textual_inversion` (its token embedding), `img2img` (noise augmentation)."""
