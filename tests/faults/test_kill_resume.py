"""SIGKILL during a generator fit, then `--ckpt_path last.ckpt`: the resumed run ends with the very weights of an
uninterrupted one, bit for bit on the CPU. The config is the shipped `diffusion_tiny.yaml` with its checkpoint
schedule (every 20 steps: mid-epoch, 18 batches an epoch); the killed run hangs right after its first checkpoint
and is killed there. Exact because the training loader's position travels in the checkpoint (EpochSampler)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
SYNAUG = Path(sys.executable).with_name("synaug")


def fit(cwd: Path, config: Path, *extra: str, **env: str) -> subprocess.Popen:
    cwd.mkdir(exist_ok=True)
    # One torch thread each: the whole and the killed run train at the same time on a 2-core machine, where two
    # threads each oversubscribe the cores (4x slower); every run alike, so the weights still match bit for bit.
    environment = os.environ | {"OMP_NUM_THREADS": "1"} | env
    environment["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).parent), environment.get("PYTHONPATH", "")]
    )
    log = (cwd / "fit.log").open("a")
    return subprocess.Popen(
        [str(SYNAUG), "fit", "-c", str(config), "--trainer.enable_progress_bar", "false", *extra],
        cwd=cwd,
        env=environment,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def final_state(cwd: Path) -> dict:
    """The export written at the end of training (the EMA UNet and its metadata): the run's final word."""
    (export,) = {p.parent.parent for p in cwd.rglob("generator/unet/diffusion_pytorch_model.safetensors")}
    meta = json.loads((export / "generator.json").read_text())
    return {
        "global_step": meta["global_step"],
        "ema": load_file(export / "unet/diffusion_pytorch_model.safetensors"),
    }


def assert_identical(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.slow  # three (four) fresh processes: their imports dominate
def test_sigkill_during_generator_fit_then_resume_is_exact(breast_npz, tmp_path, figures):
    config = yaml.safe_load((ROOT / "configs/generators/diffusion_tiny.yaml").read_text())
    config["data"]["root"] = str(breast_npz)
    config["model"]["init_args"]["sample_every"] = 1000  # sample grids cost time and change no weight
    config["trainer"]["max_steps"] = 26  # its checkpoint at step 20 falls in the middle of the second epoch
    path = tmp_path / "diffusion_tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    marker = tmp_path / "hanging"
    whole = fit(tmp_path / "whole", path)
    killed = fit(
        tmp_path / "killed",
        path,
        "--trainer.callbacks+=hang.HangAfterFirstCheckpoint",
        HANG_MARKER=str(marker),
    )
    try:
        deadline = time.time() + 300
        while not marker.exists():
            assert killed.poll() is None and time.time() < deadline, (tmp_path / "killed/fit.log").read_text()
            time.sleep(0.1)
        killed.send_signal(signal.SIGKILL)
        assert killed.wait() == -signal.SIGKILL
        assert whole.wait(timeout=300) == 0, (tmp_path / "whole/fit.log").read_text()[-3000:]
    finally:
        for p in (whole, killed):
            if p.poll() is None:
                p.kill()
    step, dirpath = marker.read_text().split()
    resumed = fit(tmp_path / "killed", path, "--ckpt_path", str(Path(dirpath) / "last.ckpt"))
    assert resumed.wait(timeout=300) == 0, (tmp_path / "killed/fit.log").read_text()[-3000:]
    a, b = final_state(tmp_path / "whole"), final_state(tmp_path / "killed")
    assert a["global_step"] == b["global_step"] == config["trainer"]["max_steps"]
    assert_identical(a, b)
    figures(
        "faults survived",
        "SIGKILL during generator fit (diffusion_tiny.yaml), resumed from last.ckpt",
        f"killed at step {step}; the exported EMA weights bit-identical to an uninterrupted run's",
    )


@pytest.mark.parametrize("loader", ["memory", "dataloader"])
def test_mid_epoch_resume_is_exact_on_both_loaders(breast_npz, tmp_path, loader):
    """In-process twin of the SIGKILL test, for both training loaders: a checkpoint in the middle of an epoch
    (step 5 of 4-batch epochs) resumes to the weights of an uninterrupted run."""
    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint

    from synaug.data import ClassificationData
    from synaug.generators.diffusion.module import ClassConditionalDiffusion

    def run(folder, ckpt_path=None):
        data = ClassificationData(
            root=str(breast_npz),
            image_size=28,
            batch_size=16,
            real_fraction=0.1,
            loader=loader,
            num_workers=0,
        )
        model = ClassConditionalDiffusion(
            num_classes=2,
            in_chans=1,
            image_size=28,
            preset="tiny",
            sample_every=1000,
            export_dir=str(folder / "x"),
        )
        ckpt = ModelCheckpoint(dirpath=folder, every_n_train_steps=5, save_top_k=-1)
        trainer = Trainer(
            max_steps=10, logger=False, callbacks=[ckpt], limit_val_batches=0, enable_progress_bar=False,
            enable_model_summary=False, accelerator="cpu", default_root_dir=folder,
        )  # fmt: skip
        trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
        assert trainer.num_training_batches == 4  # so step 5 is mid-epoch
        return model

    whole = run(tmp_path / "whole")
    resumed = run(tmp_path / "resumed", ckpt_path=str(tmp_path / "whole" / "epoch=1-step=5.ckpt"))
    assert_identical(whole.state_dict(), resumed.state_dict())
