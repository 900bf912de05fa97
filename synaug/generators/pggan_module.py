"""Training a progressive GAN on the user's own images, as a LightningModule for `synaug fit`.

Objective: WGAN-GP (gradient penalty 10 at target norm 1) plus the paper's drift term 0.001 E[D(real)^2],
which keeps the critic's scores near zero; one critic step per generator step (the paper's n_critic = 1),
Adam(lr 0.001, betas (0, 0.99)), EMA of the generator's weights (decay 0.999) for samples and export.

Growth schedule, in iterations (one critic + one generator step) or per-stage epochs (`unit`): stage 0
(4x4) trains `stable[0]`; every later stage fades in over `fade[s]` (alpha 0 -> 1 linearly, real images
blended between the two resolutions the same way) and then trains `stable[s]` more; the last stage goes on
until the trainer stops. The paper shows 800k images per phase: `800_000 / batch size` iterations. Lightning
counts each optimizer step, so `trainer.max_steps` is 2 x iterations (and so is `every_n_train_steps`); fit
logs the schedule in iterations and trainer steps. Adam's state is reset when a phase (a fade-in or a stable
period) begins, as the official code does.

Per-stage batch size: `batch_sizes[s]` rows are taken from the front of each data-module batch (batches are
shuffled, so that is a random subset); the data module's `batch_size` must be the largest of them.

Class conditioning, image sizes, channels: see `synaug.generators.pggan`. One model per class is the same
model trained on data restricted to one class (e.g. `data.real_fraction: {glioma: 1.0, ...: 0.0}`).

Exact resume (`--ckpt_path`): the latents and gradient-penalty mixing of each iteration come from a generator
seeded by (seed, iteration, rank), the iteration counter and the phase travel in the checkpoint, the EMA
generator is a submodule, and so does the schedule in iterations (an epoch schedule is resolved once).
Resuming at an epoch boundary reproduces an uninterrupted run bit for bit on CPU, given a data loader whose
order after the resume is the uninterrupted run's.

Fine-tuning (`init_from`), as thesis 1 fine-tuned an NIH chest X-ray PGGAN on a small set: a new run starts
from another run's Lightning checkpoint (networks, EMA, both Adam states, growth stage and alpha) or from an
export folder (its EMA generator as both generator and EMA; a fresh critic and fresh Adam states). The stage
and alpha are restored, not the iteration: the run continues at that point of its own schedule (at the start
of the stage's stable period if alpha was 1). Class embeddings of another class set are left freshly
initialised (with no Adam state); every other tensor must match. A `--ckpt_path` resume ignores `init_from`.

Export (`save_pretrained`), beside the Lightning checkpoints at the end of training, or where `export_dir` says:

    generator.safetensors   the EMA generator's weights
    generator.json          kind "pggan", architecture, class_names, image_size, channels, stage, alpha,
                            iteration, run_id, train_set fingerprint, global_step, git commit
    train_ids.txt           the real item ids the generator learned from (those of `init_from` too)
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from safetensors.torch import load_file, save_file

from synaug.generators import export
from synaug.generators.diffusion import pad_to
from synaug.generators.diffusion_module import sample_grid
from synaug.generators.export import GeneratorMeta, export_dir, provenance, record_training_set
from synaug.generators.pggan import (
    Discriminator,
    Generator,
    canvas_size,
    downsample,
    num_stages,
    resolution,
    sample,
    upsample,
)
from synaug.tracking import log_figure
from synaug.utils import atomic_path

log = logging.getLogger(__name__)


class ProgressiveGAN(L.LightningModule):
    def __init__(
        self,
        num_classes: int,
        in_chans: int,
        image_size: int,
        class_names: list[str] | None = None,
        latent_dim: int = 512,
        channel_base: int = 16384,
        max_channels: int = 512,
        mbstd_group: int = 4,
        stable: float | list[float] = 6250,
        fade: float | list[float] = 6250,
        unit: Literal["iterations", "epochs"] = "iterations",
        batch_sizes: list[int] | None = None,
        lr: float = 0.001,
        betas: tuple[float, float] = (0.0, 0.99),
        gp_weight: float = 10.0,
        drift: float = 0.001,
        ema_decay: float = 0.999,
        reset_optimizers: bool = True,
        seed: int = 0,
        sample_every: int = 1000,
        sample_per_class: int = 8,
        init_from: str | None = None,
        export_dir: str | None = None,
    ):
        """
        Args:
            num_classes, in_chans, image_size, class_names: from the data module (linked by the CLI).
            latent_dim: size of the latent (and of the label embedding concatenated to it).
            channel_base, max_channels: feature maps at side r are min(max_channels, channel_base / r); the
                defaults are the paper's (512 up to 32 px, then halving). `mbstd_group`: minibatch-std group.
            stable, fade: length of each stage's stable period and fade-in (one number for all, or one per stage;
                stage 0 has no fade-in and `fade[0]` is ignored), in `unit`s. The defaults are the paper's 800k
                images at batch 128.
            unit: `iterations`, or `epochs`: passes over the training set at that stage's batch size, i.e.
                round(epochs x training images / batch size) iterations (needs the data module's training set).
            batch_sizes: per stage, the rows of each data-module batch to train on (default: all of them).
            lr, betas: Adam for both networks. gp_weight, drift: WGAN-GP weight and the drift term's epsilon.
            ema_decay: the generator EMA's decay per iteration.
            reset_optimizers: reset both Adam states when a fade-in or stable period begins.
            seed: seeds the per-iteration latents and gradient-penalty mixing.
            sample_every: log a grid of EMA samples to MLflow every this many iterations (0: never), at fixed
                latents and labels (`sample_per_class` per class), upsampled to the image size.
            init_from: a Lightning checkpoint or export folder of a ProgressiveGAN to fine-tune (module doc).
            export_dir: where `save_pretrained` writes at the end of training (default: `generator/` beside
                the Lightning checkpoints folder).
        """
        super().__init__()
        class_names = export.class_names(num_classes, class_names)
        canvas = canvas_size(image_size)
        n = num_stages(canvas)
        per_stage(stable, n, "stable"), per_stage(fade, n, "fade")  # wrong lengths fail here, not at fit
        if batch_sizes is not None and len(batch_sizes) != n:
            raise ValueError(
                f"batch_sizes needs one entry per stage (4..{canvas} px: {n}); got {batch_sizes}"
            )
        self.save_hyperparameters()
        self.automatic_optimization = False  # alternating critic and generator steps
        self.class_names = class_names
        self.canvas = canvas
        self.generator = Generator(num_classes, in_chans, canvas, latent_dim, channel_base, max_channels)
        self.discriminator = Discriminator(
            num_classes, in_chans, canvas, channel_base, max_channels, mbstd_group
        )
        self.generator_ema = copy.deepcopy(self.generator).requires_grad_(False)
        # The schedule in iterations; in epochs it needs the training set's size, known at `setup`.
        self.stable_steps: list[int] | None = None
        self.fade_steps: list[int] | None = None
        if unit == "iterations":
            self.resolve_schedule([1.0] * n)
        self.iteration = 0
        self.phase: int | None = None  # the growth phase of the last iteration trained (see `phase`)
        self.train_ids: list[str] = []
        self.run_id = ""

    # ---- growth schedule ----
    def resolve_schedule(self, iterations_per_unit: list[float]) -> None:
        hp, n = self.hparams, len(iterations_per_unit)
        stable, fade = per_stage(hp.stable, n, "stable"), per_stage(hp.fade, n, "fade")
        self.stable_steps = [round(v * k) for v, k in zip(stable, iterations_per_unit, strict=True)]
        self.fade_steps = [0] + [round(v * k) for v, k in zip(fade, iterations_per_unit, strict=True)][1:]

    def setup(self, stage: str) -> None:
        if self.hparams.unit != "epochs":
            return
        dm = self.trainer.datamodule
        if not hasattr(dm, "train_rows"):
            raise ValueError(
                "unit: epochs needs the training set's size: train through synaug's ClassificationData, or "
                "give the schedule in iterations"
            )
        batches = self.hparams.batch_sizes or [dm.hparams.batch_size] * num_stages(self.canvas)
        # A resumed run then takes the schedule from its checkpoint (on_load_checkpoint runs after setup).
        self.resolve_schedule([len(dm.train_rows) / b for b in batches])

    def growth(self, iteration: int) -> tuple[int, float]:
        """The stage and fade-in alpha of an iteration."""
        if self.stable_steps is None:
            raise RuntimeError(
                "the schedule is in epochs: it is known once `setup` has seen the training set"
            )
        for s, (fade, stable) in enumerate(zip(self.fade_steps, self.stable_steps, strict=True)):
            if iteration < fade:
                return s, iteration / fade
            iteration -= fade
            if iteration < stable or s == len(self.stable_steps) - 1:
                return s, 1.0
            iteration -= stable
        raise AssertionError("unreachable")

    def iteration_at(self, stage: int, alpha: float) -> int:
        """The first iteration of this schedule at `stage` and `alpha` (inverse of `growth`)."""
        start = sum(self.fade_steps[:stage]) + sum(self.stable_steps[:stage])
        fade = self.fade_steps[stage]
        return start + (round(alpha * fade) if alpha < 1 else fade)

    @staticmethod
    def phase_of(stage: int, alpha: float) -> int:
        """Fade-in of stage s: 2s; its stable period: 2s + 1."""
        return 2 * stage + int(alpha >= 1)

    # ---- training ----
    def real_images(self, x: torch.Tensor, stage: int, alpha: float) -> torch.Tensor:
        """A [0, 1] batch as the critic sees reals at this stage: [-1, 1], on the canvas, at the stage's side,
        blended during a fade-in with its upsampled half-resolution version as the generator's output is."""
        x = pad_to(x * 2 - 1, self.canvas)
        x = F.avg_pool2d(x, self.canvas // resolution(stage))
        if stage > 0 and alpha < 1:
            x = torch.lerp(upsample(downsample(x)), x, alpha)
        return x

    def gradient_penalty(
        self, real: torch.Tensor, fake: torch.Tensor, y: torch.Tensor, stage: int, alpha: float, g
    ) -> torch.Tensor:
        eps = torch.rand(len(real), 1, 1, 1, generator=g, device=real.device)
        mixed = torch.lerp(fake, real, eps).requires_grad_(True)
        (grad,) = torch.autograd.grad(
            self.discriminator(mixed, y, stage, alpha).sum(), mixed, create_graph=True
        )
        return (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y, _ = batch
        hp = self.hparams
        if x.shape[1:] != (hp.in_chans, hp.image_size, hp.image_size):
            raise ValueError(
                f"batch images have shape {tuple(x.shape[1:])}; the model was built for "
                f"{(hp.in_chans, hp.image_size, hp.image_size)}"
            )
        stage, alpha = self.growth(self.iteration)
        opt_g, opt_d = self.optimizers()
        phase = self.phase_of(stage, alpha)
        if hp.reset_optimizers and phase != self.phase:
            # New layers came in or the blend froze: the moment estimates of the last phase are stale.
            opt_g.optimizer.state.clear()
            opt_d.optimizer.state.clear()
        self.phase = phase
        if hp.batch_sizes:
            x, y = x[: hp.batch_sizes[stage]], y[: hp.batch_sizes[stage]]
        seed = np.random.SeedSequence([hp.seed, self.iteration, self.global_rank]).generate_state(1)[0]
        g = torch.Generator(self.device).manual_seed(int(seed))
        latents = lambda: torch.randn(len(y), hp.latent_dim, generator=g, device=self.device)  # noqa: E731

        real = self.real_images(x, stage, alpha)
        with self.toggled_optimizer(opt_d):
            with torch.no_grad():
                fake = self.generator(latents(), y, stage, alpha)
            d_real = self.discriminator(real, y, stage, alpha)
            d_fake = self.discriminator(fake, y, stage, alpha)
            gp = self.gradient_penalty(real, fake, y, stage, alpha, g)
            d_loss = d_fake.mean() - d_real.mean() + hp.gp_weight * gp + hp.drift * d_real.pow(2).mean()
            opt_d.zero_grad()
            self.manual_backward(d_loss)
            opt_d.step()

        with self.toggled_optimizer(opt_g):
            g_loss = -self.discriminator(self.generator(latents(), y, stage, alpha), y, stage, alpha).mean()
            opt_g.zero_grad()
            self.manual_backward(g_loss)
            opt_g.step()
        self.update_ema()
        self.iteration += 1

        self.log_dict(
            {
                "train/d_loss": d_loss,
                "train/g_loss": g_loss,
                "train/stage": float(stage),
                "train/alpha": alpha,
            },
            prog_bar=True,
        )
        self.log_dict({"train/gp": gp, "train/w_dist": d_real.mean() - d_fake.mean()})
        if (
            hp.sample_every
            and self.iteration % hp.sample_every == 0
            and isinstance(self.logger, MLFlowLogger)
        ):
            self._log_samples(self.iteration, stage, alpha)

    @torch.no_grad()
    def update_ema(self) -> None:
        for e, p in zip(self.generator_ema.parameters(), self.generator.parameters(), strict=True):
            e.lerp_(p, 1 - self.hparams.ema_decay)

    def configure_optimizers(self):
        hp = self.hparams
        adam = lambda m: torch.optim.Adam(m.parameters(), lr=hp.lr, betas=hp.betas, eps=1e-8)  # noqa: E731
        return adam(self.generator), adam(self.discriminator)

    def on_fit_start(self) -> None:
        hp, dm = self.hparams, self.trainer.datamodule
        dm_batch = getattr(dm, "hparams", {}).get("batch_size")
        if hp.batch_sizes and dm_batch and max(hp.batch_sizes) > dm_batch:
            raise ValueError(f"batch_sizes {hp.batch_sizes} exceed the data module's batch_size {dm_batch}")
        if hp.init_from and self.trainer.ckpt_path is None:
            self.load_training_state(hp.init_from)
        record_training_set(self)
        last = self.iteration_at(len(self.stable_steps) - 1, 1.0)
        stage, alpha = self.growth(self.iteration)
        # On the console (Lightning's logger), as an epoch schedule's iterations are known only here.
        rank_zero_info(
            f"PGGAN at iteration {self.iteration} (stage {stage}, {resolution(stage)} px, alpha {alpha:.3f}); "
            f"per stage, fade-in {self.fade_steps} and stable {self.stable_steps} iterations; the last stage "
            f"is fully in from iteration {last}, i.e. trainer step {2 * last} (2 optimizer steps an iteration)"
        )

    # ---- checkpoints, fine-tuning, export ----
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        stage, alpha = self.growth(self.iteration)
        checkpoint["pggan"] = dict(
            iteration=self.iteration,
            stage=stage,
            alpha=alpha,
            phase=self.phase,
            train_ids=self.train_ids,
            run_id=self.run_id,
            stable_steps=self.stable_steps,
            fade_steps=self.fade_steps,
        )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["pggan"]
        self.iteration, self.phase = state["iteration"], state["phase"]
        self.stable_steps, self.fade_steps = state["stable_steps"], state["fade_steps"]
        self.train_ids, self.run_id = state["train_ids"], state["run_id"]

    def load_training_state(self, path: str | Path) -> None:
        """Start from another run's checkpoint or export (see `init_from`); called at fit start."""
        path = Path(path)
        if path.is_dir():
            info = json.loads((path / "generator.json").read_text())
            if info.get("kind") != "pggan":
                raise ValueError(f"{path}: not a PGGAN export (kind {info.get('kind')!r})")
            weights = load_file(path / "generator.safetensors")
            state = {f"{m}.{k}": v for m in ("generator", "generator_ema") for k, v in weights.items()}
            state |= {f"discriminator.{k}": v for k, v in self.discriminator.state_dict().items()}
            stage, alpha = info["stage"], info["alpha"]
            ids = (path / "train_ids.txt").read_text()
            self.train_ids = ids.split("\n") if ids else []
            load_state_except_class_embeddings(self, state)
            self.phase = None
            log.info("initialised from the export %s: a fresh critic and fresh Adam states", path)
        elif path.suffix == ".ckpt":
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            fresh = load_state_except_class_embeddings(self, ckpt["state_dict"])
            params = dict(self.named_parameters())
            for opt, saved in zip(self.optimizers(), ckpt["optimizer_states"], strict=True):
                opt.optimizer.load_state_dict(saved)
                for name in fresh:  # Adam moments shaped for the other class set
                    opt.optimizer.state.pop(params[name], None)
            state = ckpt["pggan"]
            stage, alpha, self.phase, self.train_ids = (
                state["stage"],
                state["alpha"],
                state["phase"],
                state["train_ids"],
            )
        else:
            raise FileNotFoundError(f"init_from {path}: expected a PGGAN export folder or a Lightning .ckpt")
        self.iteration = self.iteration_at(stage, alpha)

    @rank_zero_only
    def on_train_end(self) -> None:
        with atomic_path(self.export_dir()) as folder:  # a killed or full-disk export leaves no half folder
            self.save_pretrained(folder)

    def ema_generator(self) -> Generator:
        """A copy of the EMA generator on the CPU, set to sample at the current stage and alpha."""
        g = copy.deepcopy(self.generator_ema).cpu().eval()
        g.stage, g.alpha = self.growth(self.iteration)
        return g

    def export_dir(self) -> Path:
        return export_dir(self)

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write the EMA generator (safetensors), its metadata and the provenance files into `folder`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        g = self.ema_generator()
        save_file({k: v.contiguous() for k, v in g.state_dict().items()}, folder / "generator.safetensors")
        meta = dict(
            kind="pggan",
            architecture=g.config,
            class_names=self.class_names,
            image_size=self.hparams.image_size,
            channels=self.hparams.in_chans,
            stage=g.stage,
            alpha=g.alpha,
            iteration=self.iteration,
            **provenance(self, folder),
        )
        (folder / "generator.json").write_text(json.dumps(meta, indent=2))
        log.info("exported the EMA generator to %s", folder)
        return folder

    @rank_zero_only
    def _log_samples(self, iteration: int, stage: int, alpha: float) -> None:
        hp = self.hparams
        labels = [c for c in range(hp.num_classes) for _ in range(hp.sample_per_class)]
        images = sample(self.generator_ema, labels, 0, image_size=hp.image_size, stage=stage, alpha=alpha)
        fig = sample_grid(images, self.class_names)
        r = resolution(stage)
        fig.suptitle(f"EMA samples, iteration {iteration}, stage {stage} ({r}x{r}), alpha {alpha:.2f}")
        log_figure(self.logger.experiment, self.logger.run_id, fig, f"samples/step_{iteration:07d}.png")


def per_stage(value: float | list[float], n: int, name: str) -> list[float]:
    if isinstance(value, int | float):
        return [value] * n
    if len(value) != n:
        raise ValueError(f"{name} needs one number, or one per stage ({n}); got {value}")
    return list(value)


def load_state_except_class_embeddings(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Load `state` strictly, except label embeddings shaped for another class set, which stay as they are.
    Returns the names of those."""
    own = module.state_dict()
    fresh = [
        k for k, v in state.items() if k.endswith("embed.weight") and k in own and v.shape != own[k].shape
    ]
    if fresh:
        log.info("class embeddings %s left freshly initialised: the checkpoint has another class set", fresh)
    module.load_state_dict({**state, **{k: own[k] for k in fresh}})
    return fresh


def load_pggan(path: str | Path) -> tuple[Generator, GeneratorMeta]:
    """Load the EMA generator and its metadata from an export folder (primary) or a Lightning `.ckpt`.

    The generator samples at the stage and alpha it was saved at; `GeneratorMeta.noise_schedule` is empty.
    Both load without unpickling code: safetensors for an export, `weights_only=True` for a checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        weights = path / "generator.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(f"{path}: not a PGGAN export (no generator.safetensors)")
        info = json.loads((path / "generator.json").read_text())
        g = Generator(**info["architecture"])
        g.load_state_dict(load_file(weights))
        g.stage, g.alpha = info["stage"], info["alpha"]
        meta = GeneratorMeta.from_export(path, weights)
    elif path.suffix == ".ckpt":
        module = ProgressiveGAN.load_from_checkpoint(path, map_location="cpu", weights_only=True)
        g = module.ema_generator()
        meta = GeneratorMeta.from_module(module, path)
    else:
        raise FileNotFoundError(f"{path}: expected a PGGAN export folder or a Lightning .ckpt file")
    return g.requires_grad_(False).eval(), meta
