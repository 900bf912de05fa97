"""ResNet-18 training throughput at 128 px on brain MRI: synaug's in-memory on-device path vs a standard
torchvision ImageFolder + DataLoader(num_workers = all cores) path, printed as images/s and their ratio.

    python experiments/bench/classifier_throughput.py [--steps 200] [--batch-size 256] [--compile]

Both paths train the same ImageClassifier through the same Lightning Trainer (bf16-mixed on a GPU) with a
horizontal-flip policy; images/s is measured after a warm-up, over the remaining steps.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import lightning.pytorch as L
import torch
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision.transforms import v2

from synaug.classifiers import ImageClassifier
from synaug.data import ClassificationData


class Throughput(L.Callback):
    def __init__(self, warmup: int):
        self.warmup, self.images, self.start = warmup, 0, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.warmup:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.start = time.perf_counter()
        if self.start is not None:
            self.images += len(batch[0])

    def on_train_end(self, trainer, pl_module):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.rate = self.images / (time.perf_counter() - self.start)


class IndexedImageFolder(datasets.ImageFolder):
    """ImageFolder giving synaug's batch layout (image, label, row)."""

    def __getitem__(self, i):
        x, y = super().__getitem__(i)
        return x, y, i


def run(dm_or_loader, args) -> float:
    model = ImageClassifier(
        "resnet18", num_classes=4, in_chans=1, image_size=args.image_size, compile=args.compile
    )
    meter = Throughput(args.warmup)
    trainer = L.Trainer(
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        callbacks=[meter],
        limit_val_batches=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        precision="bf16-mixed" if torch.cuda.is_available() else "32-true",
    )
    if isinstance(dm_or_loader, L.LightningDataModule):
        trainer.fit(model, datamodule=dm_or_loader)
    else:
        trainer.fit(model, train_dataloaders=dm_or_loader)
    return meter.rate


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--root", default=str(Path(__file__).parents[2] / ".." / "shared" / "data" / "brain_tumor_mri")
    )
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--compile", action="store_true")
    args = p.parse_args()
    torch.backends.cudnn.benchmark = True
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"

    dm = ClassificationData(
        args.root,
        image_size=args.image_size,
        channels=1,
        batch_size=args.batch_size,
        policy="hflip",
        loader="memory",
    )
    t = time.perf_counter()
    dm.setup()
    print(
        f"decode into memory: {len(dm.table)} images in {time.perf_counter() - t:.1f} s (cached after the first run)"
    )
    on_device = run(dm, args)

    tf = v2.Compose(
        [
            v2.PILToTensor(),
            v2.Grayscale(),
            v2.Resize((args.image_size, args.image_size), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )
    ds = IndexedImageFolder(str(Path(args.root) / "train"), transform=tf)
    workers = os.cpu_count()
    loader = DataLoader(
        ds,
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=workers,
        pin_memory=True,
        persistent_workers=True,
        drop_last=True,
    )
    baseline = run(loader, args)

    print(
        f"device: {device}; ResNet-18, {args.image_size} px, batch {args.batch_size}, "
        f"{args.steps - args.warmup} timed steps{', torch.compile' if args.compile else ''}"
    )
    print(f"on-device (synaug memory path): {on_device:10.1f} images/s")
    print(f"ImageFolder + DataLoader({workers} workers): {baseline:10.1f} images/s")
    print(f"ratio: {on_device / baseline:.2f}x")


if __name__ == "__main__":
    main()
