"""Class-conditional diffusion: sampling, classifier-free guidance, training, exact resume and export."""

from pathlib import Path

import mlflow
import pytest
import torch
from helpers.toy import toy_data, trainer  # tests/ is on sys.path (pytest rootdir-less import)
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from synaug.generators.diffusion.module import ClassConditionalDiffusion, load_diffusion
from synaug.generators.diffusion.network import build_unet, canvas_size, sample
from synaug.tracking import MLFlowLogger

TINY3 = dict(
    block_out_channels=(16, 16, 32), down_block_types=("DownBlock2D",) * 3, up_block_types=("UpBlock2D",) * 3
)


def tiny_module(**kw) -> ClassConditionalDiffusion:
    torch.manual_seed(0)
    args = dict(
        num_classes=2,
        in_chans=1,
        image_size=16,
        class_names=["a", "b"],
        preset="tiny",
        lr=2e-3,
        warmup_steps=0,
        sample_every=0,
        ema_decay=0.9,
    )
    return ClassConditionalDiffusion(**{**args, **kw})


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to one grey level: fp32 results may differ in the last bit with the batch around them."""
    return (a.int() - b.int()).abs().max().item() <= 1


@pytest.mark.parametrize("scheduler", ["ddim", "dpm++"])
@pytest.mark.parametrize("channels", [1, 3])
def test_sample_shape_dtype_range_and_per_image_seeds(scheduler, channels):
    torch.manual_seed(0)
    unet = build_unet(2, channels, 16, "tiny")
    images = sample(unet, [0, 1, 1], seeds=[5, 6, 7], scheduler=scheduler, steps=4)
    assert images.shape == (3, channels, 16, 16)
    assert images.dtype == torch.uint8
    assert images.float().std() > 1  # not a constant image: the [-1, 1] -> [0, 255] mapping kept values
    assert images.min() < 128 < images.max()
    alone = sample(unet, [1], seeds=[7], scheduler=scheduler, steps=4)
    assert close(alone[0], images[2])  # an image is a function of its label and seed, not of its batch
    assert not close(images[1], images[2])  # different seeds, different images


def test_sizes_not_divisible_are_padded_then_cropped():
    assert canvas_size(28, 4) == 32 and canvas_size(64, 4) == 64 and canvas_size(28, 3) == 28
    unet = build_unet(3, 1, 14, "tiny", **TINY3)  # 3 levels: the side must divide by 4
    assert unet.config.sample_size == 16
    assert sample(unet, [0, 2], steps=2, image_size=14).shape == (2, 1, 14, 14)
    with pytest.raises(ValueError, match="class labels must lie in"):
        sample(unet, [3], steps=2)  # 3 is the null class of a 3-class model


def test_base_preset_is_the_25m_benchmark_model():
    unet = build_unet(4, 1, 64, "base")
    assert 25e6 < sum(p.numel() for p in unet.parameters()) < 28e6


def test_cpu_preset_has_no_attention_in_its_levels_and_fits_28_px_unpadded():
    unet = build_unet(2, 1, 28, "cpu")
    assert unet.config.sample_size == 28  # 3 levels: 28 halves twice, no padding
    blocks = [*unet.down_blocks, *unet.up_blocks]  # diffusers' mid block keeps its one attention, at 7 px
    assert not any("Attention" in type(m).__name__ for b in blocks for m in b.modules())
    assert 1.0e6 < sum(p.numel() for p in unet.parameters()) < 1.1e6


def test_classifier_free_guidance():
    torch.manual_seed(0)
    unet = build_unet(2, 1, 16, "tiny")
    with torch.no_grad():
        unet.class_embedding.weight.mul_(5)  # a fresh model barely listens to its labels; make it

    def run(labels, w):
        return sample(unet, labels, seeds=[1, 1], steps=3, guidance_scale=w)

    # w = 0 is unconditional: the label has no effect.
    assert close(run([0, 0], 0.0), run([1, 1], 0.0))
    # w = 1 is conditional: eps_u + 1 (eps_c - eps_u) = eps_c, so the null class's embedding has no effect...
    a = run([0, 1], 1.0)
    assert not close(a[0], a[1])
    null = unet.class_embedding.weight[2].clone()
    with torch.no_grad():
        unet.class_embedding.weight[2] = torch.randn_like(null) * 5
    assert close(run([0, 1], 1.0), a)
    # ... while with w != 1 it does.
    b = run([0, 1], 3.0)
    with torch.no_grad():
        unet.class_embedding.weight[2] = null
    assert not close(run([0, 1], 3.0), b)


class Losses(Callback):
    def __init__(self):
        self.values = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.values.append(outputs["loss"].item())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """30 steps on one fixed batch, logged to MLflow with a sample grid every 15 steps."""
    tmp = tmp_path_factory.mktemp("train")
    model = tiny_module(sample_every=15, sample_per_class=2, sample_steps=2)
    logger = MLFlowLogger(experiment_name="test-diffusion")
    losses = Losses()
    t = trainer(
        tmp,
        30,
        logger=logger,
        callbacks=[losses, ModelCheckpoint(every_n_train_steps=30)],
        enable_checkpointing=True,
        log_every_n_steps=5,
    )
    t.fit(model, train_dataloaders=DataLoader(toy_data(), batch_size=8))
    return model, losses.values, logger, t


def test_training_lowers_the_loss(trained):
    _, losses, _, _ = trained
    assert len(losses) == 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, (first, last)


def test_training_logs_loss_curve_and_sample_grids_to_mlflow(trained):
    model, _, logger, _ = trained
    client = mlflow.MlflowClient(logger._tracking_uri)
    assert len(client.get_metric_history(logger.run_id, "train/loss")) >= 5
    grids = [f.path for f in client.list_artifacts(logger.run_id, "samples")]
    assert grids == ["samples/step_0000015.png", "samples/step_0000030.png"]
    assert model.run_id == logger.run_id


def test_export_at_train_end_holds_the_ema_weights(trained):
    model, _, logger, t = trained
    folder = model.export_dir()
    assert folder == Path(t.checkpoint_callback.dirpath).parent / "generator"  # beside the run's checkpoints
    assert folder.parent.name == logger.run_id
    unet, meta = load_diffusion(folder)
    weights = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    assert len(weights) == len(model.ema.shadow_params)
    for p, s in zip(unet.parameters(), model.ema.shadow_params, strict=True):
        assert torch.equal(p, s)
    live = model.unet.parameters()
    assert not all(
        torch.equal(s, p) for s, p in zip(model.ema.shadow_params, live, strict=True)
    )  # EMA != live
    assert (meta.class_names, meta.image_size, meta.channels, meta.run_id) == (
        ["a", "b"],
        16,
        1,
        logger.run_id,
    )
    assert meta.train_ids == []  # plain dataloaders have no datamodule.train_ids
    assert meta.info["noise_schedule"]["beta_schedule"] == "squaredcos_cap_v2"
    assert len(meta.checkpoint) == 64


def test_resume_from_checkpoint_equals_uninterrupted_run(tmp_path):
    data = DataLoader(toy_data(), batch_size=4)  # 2 batches an epoch; the checkpoint falls on a boundary
    kw = dict(lr_schedule="cosine", warmup_steps=2)
    every4 = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    full = tiny_module(**kw)
    trainer(tmp_path, 8, callbacks=[every4], enable_checkpointing=True).fit(full, train_dataloaders=data)
    ckpt = tmp_path / "ckpt" / "epoch=1-step=4.ckpt"
    assert ckpt.is_file()

    torch.manual_seed(123)  # a different init and global RNG state: the checkpoint must restore everything
    resumed = ClassConditionalDiffusion(**full.hparams)
    trainer(tmp_path, 8).fit(resumed, train_dataloaders=data, ckpt_path=ckpt)

    assert resumed.global_step == full.global_step == 8
    for a, b in zip(resumed.unet.parameters(), full.unet.parameters(), strict=True):
        assert torch.equal(a, b)
    assert resumed.ema.optimization_step == full.ema.optimization_step == 8
    for a, b in zip(resumed.ema.shadow_params, full.ema.shadow_params, strict=True):
        assert torch.equal(a, b)

    # The Lightning checkpoint is also a loadable generator: its EMA weights, without unpickling code.
    unet, meta = load_diffusion(ckpt)
    ema4 = torch.load(ckpt, weights_only=True)["ema"]["shadow_params"]
    for p, s in zip(unet.parameters(), ema4, strict=True):
        assert torch.equal(p, s)
    assert meta.class_names == ["a", "b"] and meta.image_size == 16
