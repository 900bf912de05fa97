"""Progressive GAN: networks, growth schedule, training, MLflow, export, exact resume and fine-tuning."""

import copy
import json
import math
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from helpers.toy import toy_data, trainer  # tests/ is on sys.path (pytest rootdir-less import)
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image
from safetensors.torch import load_file
from torch.utils.data import DataLoader, TensorDataset

import synaug.generators.pggan.module as pggan_module
from synaug.cli import SynAugCLI, main
from synaug.data import ClassificationData
from synaug.data.synthetic import image_seed, read_synthetic, train_set_fingerprint
from synaug.generators.base import sha256
from synaug.generators.generate import generate
from synaug.generators.pggan.module import ProgressiveGAN, load_pggan
from synaug.generators.pggan.network import (
    Discriminator,
    EqualizedConv2d,
    EqualizedLinear,
    Generator,
    canvas_size,
    minibatch_std,
    sample,
    upsample,
)
from synaug.tracking import MLFlowLogger

CONFIGS = Path(__file__).resolve().parents[3] / "configs" / "generators"
TINY = dict(latent_dim=16, channel_base=64, max_channels=16)  # 16, 8, 4 feature maps at 4, 8, 16 px


def tiny_module(**kw) -> ProgressiveGAN:
    torch.manual_seed(0)
    args = dict(
        num_classes=2,
        in_chans=1,
        image_size=16,
        class_names=["a", "b"],
        stable=2,
        fade=2,
        sample_every=0,
        ema_decay=0.9,
        **TINY,
    )
    return ProgressiveGAN(**{**args, **kw})


def gan_trainer(tmp_path, iterations: int, **kw) -> Trainer:
    # Lightning counts the critic's and the generator's optimizer steps
    return trainer(tmp_path, 2 * iterations, **kw)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to one grey level: fp32 results may differ in the last bit with the batch around them."""
    return (a.int() - b.int()).abs().max().item() <= 1


# ---- networks ----
@pytest.mark.parametrize("channels", [1, 3])
def test_shapes_and_sampling_per_stage(channels):
    torch.manual_seed(0)
    g, d = Generator(3, channels, 16, **TINY), Discriminator(3, channels, 16, 64, 16)
    z, y = torch.randn(5, 16), torch.tensor([0, 1, 2, 0, 1])
    for stage, side in enumerate([4, 8, 16]):
        x = g(z, y, stage, 0.5)
        assert x.shape == (5, channels, side, side)
        assert d(x, y, stage, 0.5).shape == (5,)
        images = sample(g, [0, 1, 2, 2], seeds=[5, 6, 7, 7], stage=stage)
        # Every stage samples at the canvas size, so grids keep one size as the networks grow.
        assert images.shape == (4, channels, 16, 16) and images.dtype == torch.uint8
        assert images.float().std() > 1 and images.min() < 128 < images.max()
        assert close(images[2], images[3]) and not close(images[1], images[2])
    alone = sample(g, [2], seeds=[7])
    assert close(alone[0], sample(g, [0, 1, 2], seeds=[5, 6, 7])[2])  # a function of label and seed only
    with pytest.raises(ValueError, match="class labels must lie in"):
        sample(g, [3])


def test_sizes_that_are_not_powers_of_two_are_padded_then_cropped():
    assert [canvas_size(s) for s in (4, 16, 28, 33, 64)] == [4, 16, 32, 64, 64]
    with pytest.raises(ValueError, match="at least 4"):
        canvas_size(3)
    model = tiny_module(image_size=12)
    assert model.canvas == 16
    assert sample(model.generator_ema, [0, 1], image_size=12).shape == (2, 1, 12, 12)
    # A 12 px batch is reflect-padded to 16 and pooled to the stage's side.
    real = model.real_images(torch.rand(2, 1, 12, 12), stage=1, alpha=1.0)
    assert real.shape == (2, 1, 8, 8) and real.min() >= -1 and real.max() <= 1
    with pytest.raises(ValueError, match="one entry per stage"):
        tiny_module(batch_sizes=[4, 4])


def test_equalized_learning_rate():
    torch.manual_seed(0)
    conv = EqualizedConv2d(64, 32, 3)
    assert abs(conv.weight.std().item() - 1) < 0.02  # N(0, 1) weights: Adam's steps are scale-free...
    assert conv.scale == pytest.approx(math.sqrt(2) / math.sqrt(64 * 9))  # ...He's constant at runtime
    x = torch.randn(2, 64, 5, 5)
    assert torch.allclose(conv(x), F.conv2d(x, conv.weight * conv.scale, conv.bias, padding=1))
    lin = EqualizedLinear(100, 10, gain=1)
    assert lin.scale == pytest.approx(0.1)
    for net in (Generator(2, 1, 16, **TINY), Discriminator(2, 1, 16, 64, 16)):
        plain = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
        assert plain == []  # every weight layer is equalised


def test_minibatch_std_appends_the_group_spread():
    x = torch.randn(6, 3, 4, 4)
    out = minibatch_std(x, 4)  # 6 is not a multiple of 4: groups of gcd(6, 4) = 2
    assert out.shape == (6, 4, 4, 4) and torch.equal(out[:, :3], x)
    same = minibatch_std(torch.ones(8, 3, 4, 4))
    assert same[:, 3].abs().max() < 1e-3  # identical samples: no spread (mode collapse shows here)
    assert minibatch_std(x)[:, 3].min() > 0.1


def test_growth_schedule_and_fade_in():
    model = tiny_module(stable=[2, 2, 1], fade=4)
    stages = [model.growth(i) for i in range(14)]
    assert (
        stages
        == [(0, 1.0)] * 2
        + [(1, a) for a in (0, 0.25, 0.5, 0.75)]
        + [(1, 1.0)] * 2
        + [(2, a) for a in (0, 0.25, 0.5, 0.75)]
        + [(2, 1.0)] * 2
    )  # the last stage goes on past its stable steps
    # The inverse (fine-tuning's restore point): exact in a fade-in; alpha 1 maps to the stable period's start.
    assert [model.iteration_at(*model.growth(i)) for i in range(14)] == [
        0,
        0,
        2,
        3,
        4,
        5,
        6,
        6,
        8,
        9,
        10,
        11,
        12,
        12,
    ]

    g, d = model.generator, model.discriminator
    z, y = torch.randn(4, 16), torch.tensor([0, 1, 0, 1])
    for stage in (1, 2):
        low = g(z, y, stage - 1, 1.0)
        assert torch.equal(g(z, y, stage, 0.0), upsample(low))  # alpha 0: the previous stage, upsampled
        high = g(z, y, stage, 1.0)
        assert high.shape[-1] == 2 * low.shape[-1]  # the side doubles at the boundary
        assert torch.allclose(g(z, y, stage, 0.25), 0.75 * upsample(low) + 0.25 * high, atol=1e-5)
        x = torch.randn(4, 1, 4 * 2**stage, 4 * 2**stage)
        assert torch.equal(d(x, y, stage, 0.0), d(F.avg_pool2d(x, 2), y, stage - 1, 1.0))
    # Reals fade in the same way: at alpha 0 they hold only half the resolution.
    x = torch.rand(2, 1, 16, 16)
    real = model.real_images(x, 2, 0.0)
    assert torch.equal(real, upsample(model.real_images(x, 1, 1.0)))


# ---- training ----
def test_per_stage_batch_sizes(tmp_path, monkeypatch):
    model = tiny_module(stable=1, fade=1, batch_sizes=[8, 4, 2])
    seen = []
    forward = model.discriminator.forward

    def recording(x, labels, stage, alpha=1.0):
        seen.append((x.shape[-1], len(x)))
        return forward(x, labels, stage, alpha)

    monkeypatch.setattr(model.discriminator, "forward", recording)
    gan_trainer(tmp_path, 5).fit(model, one_batch())  # 4 px, fade to 8, 8, fade to 16, 16
    assert set(seen) == {(4, 8), (8, 4), (16, 2)}


def test_training_moves_samples_toward_a_single_colour_dataset(tmp_path):
    x = torch.full((16, 1, 4, 4), 0.8)  # 0.6 in the generator's [-1, 1]
    data = DataLoader(TensorDataset(x, torch.arange(16) % 2, torch.arange(16)), batch_size=8)
    model = tiny_module(image_size=4, lr=0.01, ema_decay=0.5)

    def distance() -> float:
        return (sample(model.generator_ema, [0, 1] * 8).float() / 127.5 - 1 - 0.6).abs().mean().item()

    before = distance()
    gan_trainer(tmp_path, 60).fit(model, train_dataloaders=data)
    assert model.iteration == 60
    assert distance() < 0.5 * before, (before, distance())


class Grab(Callback):
    """The module's full training state when training starts (after any restore or init_from)."""

    def on_train_start(self, trainer, module):
        self.state = snapshot(module, trainer)


def snapshot(module: ProgressiveGAN, t: Trainer) -> dict:
    return dict(
        weights={k: v.clone() for k, v in module.state_dict().items()},
        optimizers=copy.deepcopy([o.state_dict() for o in t.optimizers]),
        iteration=module.iteration,
        growth=module.growth(module.iteration),
        phase=module.phase,
        schedule=(module.fade_steps, module.stable_steps),
    )


def assert_same(a: dict, b: dict) -> None:
    for k in ("iteration", "growth", "phase", "schedule"):
        assert a[k] == b[k], k
    assert a["weights"].keys() == b["weights"].keys()
    for k in a["weights"]:
        assert torch.equal(a["weights"][k], b["weights"][k]), k
    for oa, ob in zip(a["optimizers"], b["optimizers"], strict=True):
        assert oa["state"].keys() == ob["state"].keys()
        for i in oa["state"]:
            for k in oa["state"][i]:
                assert torch.equal(oa["state"][i][k], ob["state"][i][k]), (i, k)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """12 iterations through all three stages of a 14 px (padded to 16) model, logged to MLflow."""
    tmp = tmp_path_factory.mktemp("train")
    model = tiny_module(image_size=14, sample_every=4, sample_per_class=2)
    logger = MLFlowLogger(experiment_name="test-pggan")
    t = gan_trainer(
        tmp,
        12,
        logger=logger,
        callbacks=[ModelCheckpoint(every_n_train_steps=24)],
        enable_checkpointing=True,
        log_every_n_steps=1,
    )
    t.fit(model, train_dataloaders=DataLoader(toy_data(size=14), batch_size=4))
    return model, logger, t


def test_training_logs_losses_growth_and_sample_grids_to_mlflow(trained):
    model, logger, t = trained
    assert model.iteration == 12 and t.global_step == 24
    client = mlflow.MlflowClient(logger._tracking_uri)
    for name in ("train/d_loss", "train/g_loss", "train/gp", "train/w_dist"):
        assert len(client.get_metric_history(logger.run_id, name)) >= 10, name
    stage = [m.value for m in client.get_metric_history(logger.run_id, "train/stage")]
    alpha = [m.value for m in client.get_metric_history(logger.run_id, "train/alpha")]
    assert sorted(set(stage)) == [0, 1, 2] and sorted(set(alpha)) == [0, 0.5, 1]
    grids = [f.path for f in client.list_artifacts(logger.run_id, "samples")]
    assert grids == ["samples/step_0000004.png", "samples/step_0000008.png", "samples/step_0000012.png"]
    assert model.run_id == logger.run_id


def test_export_holds_the_ema_generator_and_loads_for_sampling(trained):
    model, logger, t = trained
    folder = model.export_dir()
    assert folder.parent.name == logger.run_id  # beside the run's checkpoints
    info = json.loads((folder / "generator.json").read_text())
    assert info["kind"] == "pggan" and (info["stage"], info["alpha"], info["iteration"]) == (2, 1.0, 12)
    assert (info["image_size"], info["channels"], info["class_names"]) == (14, 1, ["a", "b"])
    weights = load_file(folder / "generator.safetensors")
    ema = model.generator_ema.state_dict()
    assert weights.keys() == ema.keys() and all(torch.equal(weights[k], ema[k]) for k in ema)
    assert not all(torch.equal(ema[k], v) for k, v in model.generator.state_dict().items())  # EMA != live

    g, meta = load_pggan(folder)
    assert (meta.class_names, meta.image_size, meta.channels, meta.run_id) == (
        ["a", "b"],
        14,
        1,
        logger.run_id,
    )
    assert meta.train_ids == [] and len(meta.checkpoint) == 64  # plain dataloaders record no train_ids
    images = sample(g, [0, 1, 1], seeds=[3, 4, 5], image_size=meta.image_size)
    assert images.shape == (3, 1, 14, 14)
    assert torch.equal(images, sample(model.ema_generator(), [0, 1, 1], [3, 4, 5], image_size=14))

    ckpt_g, ckpt_meta = load_pggan(t.checkpoint_callback.best_model_path)  # a .ckpt loads too
    assert (ckpt_g.stage, ckpt_g.alpha) == (2, 1.0) and ckpt_meta.image_size == 14
    assert torch.equal(sample(ckpt_g, [1], [9], image_size=14), sample(g, [1], [9], image_size=14))


# ---- exact resume and fine-tuning ----
@pytest.fixture(scope="module")
def run8(tmp_path_factory):
    """8 uninterrupted iterations (stage 0, fade to 8 px, 8 px, fade to 16 px), a checkpoint after each."""
    tmp = tmp_path_factory.mktemp("run8")
    kw = dict(batch_sizes=[8, 4, 2])  # stages 1 and 2 train on the first 4 and 2 rows of each batch
    model = tiny_module(**kw)
    every = ModelCheckpoint(dirpath=tmp / "ckpt", every_n_train_steps=2, save_top_k=-1)
    t = gan_trainer(tmp, 8, callbacks=[every], enable_checkpointing=True)
    t.fit(model, train_dataloaders=one_batch())
    return model, snapshot(model, t), tmp / "ckpt", kw


def one_batch() -> DataLoader:
    # One batch an epoch: every iteration ends an epoch, where Lightning can resume exactly.
    return DataLoader(toy_data(), batch_size=8)


def ckpt_at(folder, iteration: int):
    path = folder / f"epoch={iteration - 1}-step={2 * iteration}.ckpt"
    assert path.is_file()
    return path


def test_resume_from_checkpoint_equals_uninterrupted_run(run8, tmp_path):
    full, final, ckpts, kw = run8
    torch.manual_seed(123)  # a different init and global RNG state: the checkpoint must restore everything
    resumed = ProgressiveGAN(**full.hparams)
    t = gan_trainer(tmp_path, 8)
    # Killed after iteration 3, in the middle of the 8 px fade-in (alpha 0.5, Adam state of that phase).
    t.fit(resumed, one_batch(), ckpt_path=ckpt_at(ckpts, 3))
    assert_same(snapshot(resumed, t), final)
    assert resumed.global_step == 16


def test_init_from_checkpoint_continues_like_a_resume(run8, tmp_path):
    full, final, ckpts, kw = run8
    # Same schedule and data order: a fine-tune from iteration 4 ends where the uninterrupted run did.
    model = tiny_module(**kw, init_from=str(ckpt_at(ckpts, 4)))
    t = gan_trainer(tmp_path, 4)
    t.fit(model, one_batch())
    assert_same(snapshot(model, t), final)


def test_init_from_restores_stage_alpha_ema_and_optimizer_under_a_new_schedule(run8, tmp_path):
    _, _, ckpts, kw = run8
    path = ckpt_at(ckpts, 3)  # mid fade-in: stage 1, alpha 0.5
    saved = torch.load(path, weights_only=True)
    grab = Grab()
    model = tiny_module(**kw, fade=6, init_from=str(path))  # another schedule: resume at (1, 0.5)
    gan_trainer(tmp_path, 1, callbacks=[grab]).fit(model, one_batch())
    s = grab.state
    assert s["growth"] == (1, 0.5) and s["iteration"] == 2 + 3 and s["phase"] == saved["pggan"]["phase"]
    for k, v in saved["state_dict"].items():
        assert torch.equal(s["weights"][k], v), k  # generator, critic and EMA
    for mine, theirs in zip(s["optimizers"], saved["optimizer_states"], strict=True):
        assert mine["state"].keys() == theirs["state"].keys() and mine["state"]
        for i in theirs["state"]:
            assert all(torch.equal(mine["state"][i][k], theirs["state"][i][k]) for k in theirs["state"][i])

    # Another class set: the label embeddings start fresh (no Adam state), everything else is restored.
    grab = Grab()
    three = tiny_module(**kw, num_classes=3, class_names=["x", "y", "z"], init_from=str(path))
    fresh = {k: v.clone() for k, v in three.state_dict().items()}
    gan_trainer(tmp_path, 1, callbacks=[grab]).fit(three, one_batch())
    for k, v in grab.state["weights"].items():
        assert torch.equal(v, fresh[k] if k.endswith("embed.weight") else saved["state_dict"][k]), k
    g_state = grab.state["optimizers"][0]["state"]
    embed_index = [n for n, _ in three.generator.named_parameters()].index("embed.weight")
    assert embed_index not in g_state and len(g_state) == len(saved["optimizer_states"][0]["state"]) - 1


def test_init_from_an_export_folder(run8, tmp_path):
    full, _, _, kw = run8
    folder = full.save_pretrained(tmp_path / "export")
    grab = Grab()
    model = tiny_module(**kw, init_from=str(folder))
    gan_trainer(tmp_path, 1, callbacks=[grab]).fit(model, one_batch())
    weights = load_file(folder / "generator.safetensors")
    for k, v in weights.items():  # the EMA generator becomes both the generator and its EMA
        assert torch.equal(grab.state["weights"][f"generator.{k}"], v)
        assert torch.equal(grab.state["weights"][f"generator_ema.{k}"], v)
    assert grab.state["growth"] == full.growth(full.iteration) == (2, 1.0)
    assert grab.state["optimizers"][0]["state"] == {}  # fresh Adam


def test_a_schedule_in_epochs_resolves_from_the_training_set(tmp_path):
    model = tiny_module(unit="epochs", stable=1, fade=0.5)
    with pytest.raises(RuntimeError, match="known once `setup`"):
        model.growth(0)
    with pytest.raises(ValueError, match="needs the training set's size"):  # a plain DataLoader has none
        gan_trainer(tmp_path, 1).fit(model, one_batch())


# ---- generation ----
def test_generate_from_a_pggan_export_and_checkpoint(trained, tmp_path, monkeypatch):
    model, logger, t = trained
    folder = model.export_dir()
    settings = dict(batch_size=4, device="cpu")
    out = generate(str(folder), str(tmp_path / "syn"), per_class=3, **settings)
    items = read_synthetic(out, ["a", "b"]).items
    assert sorted(items["path"]) == [f"{c}/{k:06d}.png" for c in "ab" for k in range(3)]
    assert set(items["generator"]) == {"pggan"} and set(items["run_id"]) == {logger.run_id}
    digest = sha256(folder / "generator.safetensors")
    assert set(items["checkpoint"]) == {digest}
    assert json.loads((out / "generation.json").read_text()) == dict(
        generator="pggan", checkpoint=digest, seed=0
    )
    g, _ = load_pggan(folder)
    for _, row in items.iterrows():
        assert int(row["seed"]) == image_seed(0, row["class"], int(row["path"][-10:-4]))
        image = torch.from_numpy(np.array(Image.open(row["file"])))
        assert image.shape == (14, 14)  # grey, cropped to the image size from the 16 px canvas
        assert close(sample(g, [row["label"]], [int(row["seed"])], image_size=14)[0, 0], image)  # remade

    # Killed after writing b/1's image but before its manifest row: the rerun makes exactly that image.
    manifest = pd.read_csv(out / "manifest.csv", dtype=str, keep_default_na=False)
    manifest[manifest["path"] != "b/000001.png"].to_csv(out / "manifest.csv", index=False)
    made = []

    def counting(net, labels, seeds, **kw):
        made.extend(seeds)
        return sample(net, labels, seeds, **kw)

    monkeypatch.setattr(pggan_module, "sample", counting)
    generate(str(folder), str(out), per_class=3, **settings)
    assert made == [image_seed(0, "b", 1)] and len(pd.read_csv(out / "manifest.csv")) == 6

    # A Lightning checkpoint is recognised as a PGGAN's and samples its EMA generator.
    ckpt = t.checkpoint_callback.best_model_path
    items = read_synthetic(
        generate(ckpt, str(tmp_path / "from_ckpt"), per_class=1, **settings), ["a", "b"]
    ).items
    assert set(items["generator"]) == {"pggan"} and set(items["checkpoint"]) == {sha256(Path(ckpt))}


# ---- the command line ----
def test_synaug_fit_on_a_selection_with_per_stage_epochs_then_generate(breast_npz, tmp_path):
    dm = ClassificationData(str(breast_npz), image_size=16)
    dm.setup("fit")
    chosen = dm.train_ids[::10]
    pd.DataFrame({"id": chosen}).to_csv(tmp_path / "selected.csv", index=False)
    cli = SynAugCLI(
        args=[
            "fit",
            "-c",
            str(CONFIGS / "pggan_tiny.yaml"),
            f"--data.root={breast_npz}",
            f"--data.selection={tmp_path / 'selected.csv'}",
            "--data.image_size=16",
            "--data.batch_size=16",
            "--model.init_args.unit=epochs",
            "--model.init_args.stable=0.5",
            "--model.init_args.fade=1",
            "--model.init_args.batch_sizes=[16, 8, 8]",
            "--model.init_args.sample_every=8",
            "--trainer.max_steps=32",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path / 'outputs'}",
        ]
    )
    model, n = cli.model, len(chosen)
    # Epochs at each stage's batch size, in iterations: 0.5 epoch at 16 and at 8, fade-ins of 1 epoch at 8.
    assert model.stable_steps == [round(n / 32), round(n / 16), round(n / 16)]
    assert model.fade_steps == [0, round(n / 8), round(n / 8)]
    assert model.iteration == 16

    folder = model.export_dir()
    info = json.loads((folder / "generator.json").read_text())
    assert (info["kind"], info["channels"], info["image_size"], info["iteration"]) == ("pggan", 1, 16, 16)
    assert sorted((folder / "train_ids.txt").read_text().split("\n")) == sorted(chosen)  # only the selection
    client = mlflow.MlflowClient()
    assert [f.path for f in client.list_artifacts(model.run_id, "samples")] == [
        "samples/step_0000008.png",
        "samples/step_0000016.png",
    ]

    classes = dm.class_names
    out = main_generate(folder, tmp_path / "syn", classes[0])
    syn = read_synthetic(out, classes)
    assert len(syn.items) == 2 and set(syn.items["generator"]) == {"pggan"}
    assert set(syn.items["train_set"]) == {train_set_fingerprint(chosen)}
    assert syn.train_ids(train_set_fingerprint(chosen)) == sorted(chosen)


def main_generate(checkpoint: Path, out: Path, cls: str) -> Path:
    """`synaug generate CHECKPOINT OUT -c configs/generators/pggan_generate.yaml` with two images of one class."""
    config = ["-c", str(CONFIGS / "pggan_generate.yaml"), f"--per_class={{{cls}: 2}}", "--device=cpu"]
    main(["generate", str(checkpoint), str(out), *config])
    return out
