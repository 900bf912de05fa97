"""Fine-tuned classifiers (thesis 2): any timm backbone by name (basic_cnn, resnet18, vit_*), trained end to end."""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from synaug.classifiers.base import Classifier
from synaug.models.backbones import create_backbone, input_channels, normalization


class ImageClassifier(Classifier):
    def __init__(
        self,
        backbone: str = "resnet18",
        num_classes: int = 2,
        in_chans: int = 3,
        image_size: int = 128,
        class_names: list[str] | None = None,
        pretrained: bool = False,
        checkpoint_path: str | None = None,
        model_kwargs: dict | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        scheduler: LRSchedulerCallable | None = None,
        label_smoothing: float = 0.0,
        compile: bool = False,
    ):
        """
        Args:
            backbone: a timm model name (`basic_cnn` is synaug's thesis-2 CNN, registered with timm).
            pretrained, checkpoint_path: weights from the hub or a local timm-format file; never downloaded
                offline (a clear error names the model instead).
            model_kwargs: passed to `timm.create_model`, e.g. `{img_size: 128}` for a ViT at 128 px.
            compile: `torch.compile` the network (worth it on a GPU for long runs).
        """
        super().__init__(num_classes, class_names)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.net = create_backbone(
            backbone,
            pretrained=pretrained,
            checkpoint_path=checkpoint_path,
            num_classes=num_classes,
            in_chans=in_chans,
            **(model_kwargs or {}),
        )
        mean, std = normalization(self.net, bool(pretrained or checkpoint_path), in_chans)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)
        self.optimizer, self.scheduler = optimizer, scheduler

    def configure_model(self):
        if self.hparams.compile:
            self.net = torch.compile(self.net)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        if x.is_cuda:  # conv kernels on tensor cores want NHWC
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    def on_fit_start(self):
        if self.device.type == "cuda":
            self.net.to(memory_format=torch.channels_last)

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        loss = F.cross_entropy(self(x), y, label_smoothing=self.hparams.label_smoothing)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, sync_dist=True)
        return loss

    def probs(self, x: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
        return self(x).float().softmax(-1)

    def configure_optimizers(self):
        opt = self.optimizer(self.parameters())
        return opt if self.scheduler is None else {"optimizer": opt, "lr_scheduler": self.scheduler(opt)}


def load_classifier(checkpoint: str | Path) -> ImageClassifier:
    """An `ImageClassifier` from its Lightning checkpoint, in eval mode on the CPU, offline and without unpickling
    code (`weights_only=True`: a checkpoint file is user input).

    The backbone is rebuilt without fetching pretrained weights (the checkpoint holds the trained ones, and an
    offline machine has no hub), but keeps the normalisation it was trained with, which `ImageClassifier` takes
    from the pretrained config when it started from pretrained weights. Not `load_from_checkpoint`: its first
    parameter is also named `checkpoint_path`, so it cannot override the hyperparameter of that name.
    """
    ckpt = torch.load(Path(checkpoint).expanduser(), map_location="cpu", weights_only=True)
    hp = ckpt.get("hyper_parameters", {})
    if "backbone" not in hp or not any(k.startswith("net.") for k in ckpt.get("state_dict", {})):
        raise ValueError(
            f"{checkpoint}: not an ImageClassifier checkpoint (no `backbone` hyperparameter and `net.` weights)"
        )
    init = inspect.signature(ImageClassifier).parameters  # LightningCLI adds keys such as `_class_path`
    kwargs = {k: v for k, v in hp.items() if k in init}
    pretrained = bool(hp.get("pretrained") or hp.get("checkpoint_path"))
    # Pretrained RGB weights kept their RGB stem for grey images (see `input_channels`).
    net = {"pretrained": False, "checkpoint_path": None, "compile": False}
    net["in_chans"] = input_channels(pretrained, hp["in_chans"])
    model = ImageClassifier(**kwargs | net)
    # A compiled net was saved under `_orig_mod.`.
    model.load_state_dict({k.replace("net._orig_mod.", "net."): v for k, v in ckpt["state_dict"].items()})
    model.hparams.in_chans = hp["in_chans"]  # the data's channels, as trained
    model.mean, model.std = normalization(model.net, pretrained, hp["in_chans"])
    return model.eval()
