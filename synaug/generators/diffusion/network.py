"""Class-conditional diffusion: diffusers' UNet2DModel with a class embedding, and guided sampling.

Thesis 1 found that Stable Diffusion lacks priors for medical concepts; a small DDPM trained on the dataset
itself needs none. The UNet gets `num_classes + 1` class embeddings: the last index is the "null" class that
training substitutes for the real label with probability `p_uncond`, so one network gives both the conditional
and the unconditional prediction that classifier-free guidance extrapolates between.

Image sizes: a UNet with L levels halves the resolution L - 1 times, so its input side must be divisible by
2^(L-1). An image whose side is not (28 px MedMNIST with the 4-level `base` preset) is reflect-padded, centred,
to the next multiple (32 px): the UNet trains and samples on that canvas and `sample` crops the centre back to
the image size (`synaug.generators.base.pad_to`, `crop_to`). Nothing is resized.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DModel
from tqdm.auto import tqdm

from synaug.generators.base import crop_to, seed_list

SamplerName = Literal["ddim", "dpm++"]

# Parameter counts are for 1 channel and 4 classes; 3 channels add about 1k, each class one embedding row.
PRESETS: dict[str, dict[str, Any]] = {
    # 0.16M: tests and CPU smoke runs only.
    "tiny": dict(
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    ),
    # 1.06M, attention only in the mid block (at 7 px for 28 px images): the CPU preset for 28-32 px
    # (experiments/bench/generator_budget.py measured it on 2 cores; attention at 14-16 px is what makes `small`
    # 20x slower there).
    "cpu": dict(
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownBlock2D",) * 3,
        up_block_types=("UpBlock2D",) * 3,
    ),
    # 4.0M: quick experiments at 28-64 px.
    "small": dict(
        block_out_channels=(32, 64, 128),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    ),
    # 26.6M: the 64 px benchmark model; self-attention at 16 and 8 px, as DDPM attends at 16 px.
    "base": dict(
        block_out_channels=(64, 128, 256, 256),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    ),
    # 113.7M: DDPM's 256 px (LSUN) layout, for 128-256 px images; attention at 1/16 of the image side.
    "large": dict(
        block_out_channels=(128, 128, 256, 256, 512, 512),
        layers_per_block=2,
        down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
    ),
}


def canvas_size(image_size: int, levels: int) -> int:
    """The smallest side >= `image_size` that a UNet with `levels` levels can halve `levels - 1` times."""
    step = 2 ** (levels - 1)
    return -(-image_size // step) * step


def build_unet(
    num_classes: int, in_chans: int, image_size: int, preset: str = "base", **overrides: Any
) -> UNet2DModel:
    """A class-conditional UNet2DModel from a preset; `overrides` are UNet2DModel arguments that replace it."""
    if preset not in PRESETS:
        raise ValueError(f"unknown UNet preset {preset!r}; choose one of {sorted(PRESETS)}")
    kwargs = {**PRESETS[preset], **overrides}
    return UNet2DModel(
        sample_size=canvas_size(image_size, len(kwargs["block_out_channels"])),
        in_channels=in_chans,
        out_channels=in_chans,
        num_class_embeds=num_classes + 1,  # the last one is the null class of classifier-free guidance
        **kwargs,
    )


def null_class(unet: UNet2DModel) -> int:
    return unet.config.num_class_embeds - 1


def noise_scheduler(
    num_train_timesteps: int = 1000, beta_schedule: str = "squaredcos_cap_v2"
) -> DDPMScheduler:
    """The training noise schedule; the cosine schedule suits small images better than DDPM's linear one."""
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule)


def inference_scheduler(
    name: SamplerName, train_schedule: DDPMScheduler | dict
) -> DDIMScheduler | DPMSolverMultistepScheduler:
    """DDIM (eta = 0) or DPM-Solver++ (2nd order) over the training noise schedule."""
    config = train_schedule.config if isinstance(train_schedule, DDPMScheduler) else train_schedule
    # "trailing" starts sampling at the last training timestep, where the training inputs were pure noise;
    # "leading" would start up to T/steps earlier, from noise the model never saw at that t.
    if name == "ddim":
        return DDIMScheduler.from_config(config, timestep_spacing="trailing")
    if name == "dpm++":
        return DPMSolverMultistepScheduler.from_config(
            config, algorithm_type="dpmsolver++", solver_order=2, timestep_spacing="trailing"
        )
    raise ValueError(f"unknown scheduler {name!r}; choose 'ddim' or 'dpm++'")


@torch.no_grad()
def sample(
    unet: UNet2DModel,
    class_labels: Sequence[int] | torch.Tensor,
    seeds: int | Sequence[int] = 0,
    *,
    scheduler: SamplerName = "ddim",
    steps: int = 50,
    guidance_scale: float = 2.0,
    image_size: int | None = None,
    train_schedule: DDPMScheduler | dict | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Generate one image per class label; returns uint8 (N, C, image_size, image_size) on the CPU.

    seeds: one per image (image i starts from `torch.randn` seeded with `seeds[i]` on the CPU, so it does not
        depend on the batch it is in), or an int s giving image i the seed s + i.
    guidance_scale: w in eps = eps_uncond + w (eps_cond - eps_uncond); 1 is plain conditional sampling, 0
        unconditional. Both halves run in one batched forward.
    image_size: the side to crop the UNet's canvas to (default: the canvas, i.e. no crop).
    train_schedule: the DDPMScheduler (or its config) the UNet was trained with (default: `noise_scheduler()`).
    Both samplers are deterministic given the initial noise. On CUDA the UNet runs under bf16 autocast.
    """
    device = unet.device
    labels = torch.as_tensor(class_labels, dtype=torch.long)
    n = len(labels)
    seeds = seed_list(seeds, n)
    null = null_class(unet)
    if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < null:
        raise ValueError(f"class labels must lie in [0, {null}); got {labels.tolist()}")
    side = unet.config.sample_size
    image_size = image_size or side
    sched = inference_scheduler(scheduler, train_schedule or noise_scheduler())
    sched.set_timesteps(steps, device=device)

    shape = (unet.config.in_channels, side, side)
    x = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]).to(
        device
    )
    x = x * sched.init_noise_sigma
    both = torch.cat([labels, torch.full_like(labels, null)]).to(device)
    was_training = unet.training
    unet.eval()
    for t in tqdm(sched.timesteps, desc="sampling", leave=False, disable=not progress):
        x_in = sched.scale_model_input(torch.cat([x, x]), t)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            eps = unet(x_in, t, class_labels=both).sample.float()
        cond, uncond = eps.chunk(2)
        x = sched.step(uncond + guidance_scale * (cond - uncond), t, x).prev_sample
    unet.train(was_training)
    x = crop_to(x, image_size)
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
