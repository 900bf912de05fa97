"""Training and sampling speed of the class-conditional diffusion UNet presets on a CPU, on BreastMNIST's real
images (2 classes, grey).

    python experiments/bench/generator_speed.py [--image_size 28] [--steps 10] [--presets tiny cpu small]

Diffusion: `steps` optimizer steps of the training objective the module uses (noise prediction with
classifier-free label dropout, AdamW), batch 32, timed after one warm-up step; then 16 images sampled with
classifier-free guidance and 25 DDIM steps (`synaug.generators.diffusion.network.sample`). The PGGAN's speed
(through `synaug fit`, growing to 32 px) is what `generator_budget.py --kind pggan` prints.
Prints one row per preset: parameters, training img/s, sampling img/s, and the torch threads used.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from synaug.generators.base import pad_to
from synaug.generators.diffusion.network import build_unet, noise_scheduler, null_class, sample

ROOT = Path(__file__).resolve().parents[2]


def images(npz: Path, n: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    data = np.load(npz)
    x = torch.from_numpy(data["train_images"][:n]).float().div(255).unsqueeze(1)
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True) if x.shape[-1] != size else x
    return x, torch.from_numpy(data["train_labels"][:n].reshape(-1)).long()


def diffusion(preset: str, x: torch.Tensor, y: torch.Tensor, steps: int) -> dict:
    unet = build_unet(2, 1, x.shape[-1], preset)
    schedule = noise_scheduler()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    x0 = pad_to(x * 2 - 1, unet.config.sample_size)

    def step():
        noise = torch.randn_like(x0)
        t = torch.randint(0, schedule.config.num_train_timesteps, (len(x0),))
        labels = torch.where(torch.rand(len(y)) < 0.1, null_class(unet), y)
        loss = F.mse_loss(unet(schedule.add_noise(x0, noise, t), t, class_labels=labels).sample, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    train = steps * len(x0) / (time.perf_counter() - start)
    unet.eval()
    start = time.perf_counter()
    sample(unet, [0, 1] * 8, list(range(16)), steps=25, image_size=x.shape[-1])
    return {
        "model": f"diffusion {preset}",
        "params_M": sum(p.numel() for p in unet.parameters()) / 1e6,
        "train_img_s": train,
        "sample_img_s": 16 / (time.perf_counter() - start),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT / ".." / "shared" / "data" / "medmnist" / "breastmnist.npz"))
    p.add_argument("--image_size", type=int, default=28)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--presets", nargs="+", default=["tiny", "cpu", "small"])
    a = p.parse_args()
    x, y = images(Path(a.data), 32, a.image_size)
    rows = [diffusion(preset, x, y, a.steps) for preset in a.presets]
    load = os.getloadavg()[0]
    print(f"{a.image_size} px, batch 32, {torch.get_num_threads()} torch threads, load average {load:.1f}")
    for r in rows:
        print(
            f"{r['model']:<18} {r['params_M']:6.2f}M params  train {r['train_img_s']:7.1f} img/s  "
            f"sample {r['sample_img_s']:6.2f} img/s (25 DDIM steps, guidance)"
        )


if __name__ == "__main__":
    main()
