"""Training a class-conditional DDPM on the user's own images, as a LightningModule for `synaug fit`.

Objective: epsilon-prediction MSE (DDPM), labels replaced by the null class with probability `p_uncond` so the
same UNet learns the unconditional prediction classifier-free guidance needs. EMA weights (diffusers' EMAModel,
with warm-up) are what samples and exports use.

Exact resume: the noise, timesteps and label dropout of each batch come from a generator seeded by
(seed, global_step, batch_idx, rank) rather than the global RNG, which Lightning does not checkpoint; the EMA
state travels in the Lightning checkpoint (`on_save_checkpoint`). Resuming from a checkpoint taken at an epoch
boundary therefore reproduces an uninterrupted run exactly (on deterministic hardware).

Export (`save_pretrained`), beside the Lightning checkpoints at the end of training, or where `export_dir` says:

    unet/                 EMA UNet2DModel: config.json + diffusion_pytorch_model.safetensors
    scheduler/            the training DDPMScheduler config
    generator.json        kind "diffusion", class_names, image_size, channels, run_id, train_set fingerprint,
                          global_step, git commit (`synaug.generators.base.write_export`)
    train_ids.txt         the real item ids the generator learned from, one a line

Provenance contract: the module records `trainer.datamodule.train_ids` (a list of str: the ids of the real
images in the training set it is given) at the start of fit; without it the export records no training set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.training_utils import EMAModel

from synaug.generators import base
from synaug.generators.base import (
    Generator,
    GeneratorMeta,
    GeneratorModule,
    module_meta,
    pad_to,
    read_export,
    write_export,
)
from synaug.generators.diffusion.network import SamplerName, build_unet, noise_scheduler, null_class, sample
from synaug.generators.registry import register


class ClassConditionalDiffusion(GeneratorModule):
    kind = "diffusion"

    def __init__(
        self,
        num_classes: int,
        in_chans: int,
        image_size: int,
        class_names: list[str] | None = None,
        preset: Literal["tiny", "cpu", "small", "base", "large"] = "base",
        unet_kwargs: dict[str, Any] | None = None,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "squaredcos_cap_v2",
        p_uncond: float = 0.1,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.95, 0.999),
        weight_decay: float = 1e-6,
        warmup_steps: int = 500,
        lr_schedule: Literal["constant_with_warmup", "cosine", "linear"] = "constant_with_warmup",
        ema_decay: float = 0.999,
        ema_power: float = 0.75,
        seed: int = 0,
        sample_every: int = 1000,
        sample_per_class: int = 8,
        sample_scheduler: SamplerName = "ddim",
        sample_steps: int = 50,
        guidance_scale: float = 2.0,
        export_dir: str | None = None,
    ):
        """
        Args:
            num_classes, in_chans, image_size, class_names: from the data module (linked by the CLI).
            preset: UNet size, see `synaug.generators.diffusion.network.PRESETS` (`base`: 26.6M parameters).
            unet_kwargs: UNet2DModel arguments that replace the preset's (e.g. `block_out_channels`).
            num_train_timesteps, beta_schedule: the DDPM noise schedule.
            p_uncond: probability of training a sample with the null class (classifier-free guidance).
            lr, betas, weight_decay: AdamW; the learning rate warms up linearly over `warmup_steps`.
            lr_schedule: after warm-up: constant, or cosine / linear decay to 0 at the last step.
            ema_decay, ema_power: EMA decay ceiling and warm-up power (decay = 1 - (1 + step)^-power; with 3/4
                it reaches 0.999 at 10k steps).
            seed: seeds the per-step noise, timesteps and label dropout.
            sample_every: log a grid of EMA samples to MLflow every this many optimizer steps (0: never), at
                fixed noise and labels (`sample_per_class` per class, `sample_scheduler`, `sample_steps`,
                `guidance_scale`), so grids are comparable across steps.
            export_dir: where `save_pretrained` writes at the end of training (default: `generator/` beside
                the Lightning checkpoints folder).
        """
        super().__init__()
        class_names = base.class_names(num_classes, class_names)
        if not 0 <= p_uncond < 1:
            raise ValueError(f"p_uncond must lie in [0, 1); got {p_uncond}")
        self.save_hyperparameters()
        self.class_names = class_names
        self.unet = build_unet(num_classes, in_chans, image_size, preset, **(unet_kwargs or {}))
        self.noise_scheduler = noise_scheduler(num_train_timesteps, beta_schedule)
        # EMAModel is not an nn.Module: its device follows the model's in on_fit_start / on_load_checkpoint,
        # its state goes into the Lightning checkpoint in on_save_checkpoint.
        self.ema = EMAModel(
            self.unet.parameters(),
            decay=ema_decay,
            use_ema_warmup=True,
            inv_gamma=1.0,
            power=ema_power,
            foreach=True,
        )

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        x, y, _ = batch
        hp = self.hparams
        if x.shape[1:] != (hp.in_chans, hp.image_size, hp.image_size):
            raise ValueError(
                f"batch images have shape {tuple(x.shape[1:])}; the model was built for "
                f"{(hp.in_chans, hp.image_size, hp.image_size)}"
            )
        seed = np.random.SeedSequence(
            [hp.seed, self.global_step, batch_idx, self.global_rank]
        ).generate_state(1)[0]
        g = torch.Generator(self.device).manual_seed(int(seed))
        x0 = pad_to(x * 2 - 1, self.unet.config.sample_size)
        noise = torch.randn(x0.shape, generator=g, device=self.device)
        t = torch.randint(0, hp.num_train_timesteps, (len(x0),), generator=g, device=self.device)
        uncond = torch.rand(len(y), generator=g, device=self.device) < hp.p_uncond
        labels = torch.where(uncond, null_class(self.unet), y)
        eps = self.unet(self.noise_scheduler.add_noise(x0, noise, t), t, class_labels=labels).sample
        loss = F.mse_loss(eps.float(), noise)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        hp = self.hparams
        opt = torch.optim.AdamW(
            self.unet.parameters(), lr=hp.lr, betas=hp.betas, weight_decay=hp.weight_decay
        )
        return self.with_warmup_schedule(opt)

    def optimizer_step(self, *args, **kwargs) -> None:
        # Here rather than in on_train_batch_end: once per optimizer step, also under gradient accumulation.
        super().optimizer_step(*args, **kwargs)
        self.ema.step(self.unet.parameters())

    def on_fit_start(self) -> None:
        self.ema.to(self.device)
        super().on_fit_start()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["ema"] = self.ema.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.ema.load_state_dict(checkpoint["ema"])
        self.ema.to(self.device)

    def ema_unet(self) -> UNet2DModel:
        """A copy of the UNet holding the EMA weights, on the CPU."""
        unet = UNet2DModel.from_config(self.unet.config)
        self.ema.copy_to(unet.parameters())
        return unet.eval()

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write the EMA UNet (safetensors), the noise schedule and the provenance files into `folder`."""
        folder = Path(folder)
        self.ema_unet().save_pretrained(folder / "unet", safe_serialization=True)
        self.noise_scheduler.save_pretrained(folder / "scheduler")
        return write_export(self, folder, [folder / "unet" / "diffusion_pytorch_model.safetensors"])

    def grid_step(self) -> int:
        # The EMA's step count: once per optimizer step, also under gradient accumulation.
        return self.ema.optimization_step

    def grid_samples(self) -> tuple[torch.Tensor, list[str], str]:
        hp = self.hparams
        labels = [c for c in range(hp.num_classes) for _ in range(hp.sample_per_class)]
        self.ema.store(self.unet.parameters())
        self.ema.copy_to(self.unet.parameters())
        images = sample(
            self.unet,
            labels,
            seeds=0,
            scheduler=hp.sample_scheduler,
            steps=hp.sample_steps,
            guidance_scale=hp.guidance_scale,
            image_size=hp.image_size,
            train_schedule=self.noise_scheduler,
        )
        self.ema.restore(self.unet.parameters())
        title = (
            f"EMA samples, step {self.grid_step()}, {hp.sample_scheduler} {hp.sample_steps} steps, "
            f"guidance {hp.guidance_scale}"
        )
        return images, self.class_names, title


def load_diffusion(path: str | Path) -> tuple[UNet2DModel, GeneratorMeta]:
    """Load the EMA UNet and its metadata from an export folder (primary) or a Lightning `.ckpt`.

    Both load without unpickling code: safetensors for an export, `weights_only=True` for a checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        weights = path / "unet" / "diffusion_pytorch_model.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(
                f"{path}: not a generator export (no unet/diffusion_pytorch_model.safetensors)"
            )
        unet = UNet2DModel.from_pretrained(path / "unet", use_safetensors=True)
        meta = read_export(path, [weights])
        meta.info["noise_schedule"] = dict(DDPMScheduler.load_config(path / "scheduler"))
    elif path.suffix == ".ckpt":
        module = ClassConditionalDiffusion.load_from_checkpoint(path, map_location="cpu", weights_only=True)
        unet = module.ema_unet()
        meta = module_meta(module, path, noise_schedule=dict(module.noise_scheduler.config))
    else:
        raise FileNotFoundError(f"{path}: expected a generator export folder or a Lightning .ckpt file")
    return unet.eval(), meta


class DiffusionGenerator(Generator):
    """The EMA UNet of an export or checkpoint, sampled with DDIM or DPM-Solver++ and classifier-free guidance."""

    batch_size = 256

    def __init__(
        self,
        unet: UNet2DModel,
        meta: GeneratorMeta,
        scheduler: SamplerName,
        steps: int,
        guidance_scale: float,
    ):
        super().__init__(meta)
        self.unet, self.scheduler, self.steps, self.guidance_scale = unet, scheduler, steps, guidance_scale

    @classmethod
    def load(
        cls,
        checkpoint: str | Path,
        device: torch.device,
        scheduler: SamplerName = "ddim",
        steps: int = 50,
        guidance_scale: float = 2.0,
    ) -> DiffusionGenerator:
        """scheduler, steps: the sampler (`ddim` or `dpm++`) and its number of steps; guidance_scale: the
        classifier-free guidance weight (1: plain conditional sampling). On CUDA under bf16 autocast."""
        return cls(*load_diffusion(checkpoint), scheduler, steps, guidance_scale).to(device)

    def settings(self) -> dict[str, Any]:
        return dict(scheduler=self.scheduler, steps=self.steps, guidance_scale=self.guidance_scale)

    def sample(self, classes: list[str], seeds: list[int]) -> torch.Tensor:
        return sample(
            self.unet,
            [self.meta.class_names.index(c) for c in classes],
            seeds,
            scheduler=self.scheduler,
            steps=self.steps,
            guidance_scale=self.guidance_scale,
            image_size=self.meta.image_size,
            train_schedule=self.meta.info["noise_schedule"],
        )

    def to(self, device: torch.device) -> DiffusionGenerator:
        self.unet.to(device)
        return self


register(
    "diffusion",
    "class-conditional DDPM trained on the user's images (diffusers UNet2DModel, classifier-free guidance)",
    module=ClassConditionalDiffusion,
    load=DiffusionGenerator.load,
)
