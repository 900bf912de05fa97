"""Heads on frozen CNN features (thesis 1): an FFNN, an RBF SVC or elastic-net logistic regression.

Features of every image are computed once by the frozen backbone and cached on disk, keyed by the images'
content, the backbone and its weights: a grid of 20 seeds x several heads extracts features once. The FFNN
trains on them with Lightning; the scikit-learn heads are fitted once at the start of `fit`, and the fitted
estimator travels in the Lightning checkpoint so that `synaug test --ckpt_path` works the same for all heads.
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.calibration import CalibratedClassifierCV
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC
from tqdm.auto import tqdm

from synaug.cache import cached_tensors
from synaug.classifiers.base import Classifier
from synaug.models.backbones import create_backbone, normalization, weights_id


class FeatureClassifier(Classifier):
    def __init__(
        self,
        head: Literal["ffnn", "svc", "logreg"] = "ffnn",
        backbone: str = "efficientnet_b0",
        num_classes: int = 2,
        in_chans: int = 3,
        image_size: int = 128,
        class_names: list[str] | None = None,
        pretrained: bool = False,
        checkpoint_path: str | None = None,
        hidden: list[int] | None = None,
        l2: float = 0.02,
        lr: float = 1e-3,
        svc_c: float = 10.0,
        svc_gamma: str | float = "scale",
        svc_tol: float = 0.01,
        logreg_c: float = 10.0,
        l1_ratio: float = 0.5,
        max_iter: int = 300,
        standardize: bool = True,
        feature_batch_size: int = 128,
    ):
        """
        Args:
            head: `ffnn` (hidden ReLU layers, L2 penalty `l2`, Adam `lr`; epochs and early stopping come from
                the trainer config), `svc` (RBF, `svc_c`, `svc_gamma`, `svc_tol`, Platt-scaled probabilities) or
                `logreg` (elastic-net, saga, `logreg_c`, `l1_ratio`, `max_iter`).
            backbone, pretrained, checkpoint_path: the frozen feature extractor (timm name). Random weights are
                drawn from a fixed seed so that their features, and the cache, are reproducible.
            hidden: FFNN hidden widths, default 4 x 256 as in thesis 1.
            standardize: scale features to zero mean and unit variance before the scikit-learn heads (saga and
                the RBF kernel both assume comparable feature scales).
        """
        super().__init__(num_classes, class_names)
        self.save_hyperparameters()
        self.hidden = hidden or [256] * 4
        self.automatic_optimization = head == "ffnn"
        # (rows of the data table, D): a buffer so it follows the module to its device, but not checkpointed.
        self.register_buffer("features", torch.empty(0), persistent=False)
        self.ffnn: nn.Sequential | None = None
        self.estimator = None

    # ---- features ----
    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule
        if dm.hparams.policy != "none":
            raise ValueError(
                f"FeatureClassifier uses cached features of unaugmented images; data.policy is "
                f"'{dm.hparams.policy}'. Set data.policy: none, or use ImageClassifier."
            )
        h = self.hparams
        key = dict(
            weights=weights_id(h.backbone, h.pretrained, h.checkpoint_path),
            size=dm.image_size,
            channels=dm.channels,
        )
        table = dm.table
        feats = None
        real = ~table["synthetic"].to_numpy()
        # Real images: features of the whole source at once, shared by every subset and seed.
        all_x, kept = dm.source.decode(
            np.arange(len(dm.source)), dm.image_size, dm.channels, dm.hparams.on_bad_image
        )
        real_f = cached_tensors(
            "features",
            key | {"images": dm.source.fingerprint, "on_bad": dm.hparams.on_bad_image},
            lambda: {"f": self._extract(all_x)},
        )["f"]
        pos = np.full(len(dm.source), -1)
        pos[kept] = np.arange(len(kept))
        feats = torch.empty(len(table), real_f.shape[1])
        feats[real] = real_f[pos[table["key"].to_numpy()[real]]]
        if (~real).any():
            rows = np.flatnonzero(~real)
            digest = hashlib.sha256("".join(table["sha256"].to_numpy()[rows]).encode()).hexdigest()
            x = torch.stack([torch.from_numpy(dm.load_row(int(r))) for r in rows])
            feats[~real] = cached_tensors(
                "features", key | {"images": digest}, lambda: {"f": self._extract(x)}
            )["f"]
        self.features = feats
        if h.head == "ffnn" and self.ffnn is None:
            dims = [feats.shape[1], *self.hidden]
            layers = [m for a, b in zip(dims, dims[1:], strict=False) for m in (nn.Linear(a, b), nn.ReLU())]
            self.ffnn = nn.Sequential(*layers, nn.Linear(dims[-1], h.num_classes))

    @torch.no_grad()
    def _extract(self, images: torch.Tensor) -> torch.Tensor:
        h = self.hparams
        with torch.random.fork_rng():
            torch.manual_seed(0)
            net = create_backbone(
                h.backbone,
                pretrained=h.pretrained,
                checkpoint_path=h.checkpoint_path,
                num_classes=0,
                in_chans=h.in_chans,
            )
        device = self.trainer.strategy.root_device
        net.eval().to(device)
        mean, std = normalization(net, bool(h.pretrained or h.checkpoint_path), h.in_chans)
        out = []
        for b in tqdm(images.split(h.feature_batch_size), desc=f"features ({h.backbone})"):
            x = (b.to(device).float() / 255 - mean.to(device)) / std.to(device)
            out.append(net(x).float().cpu())
        return torch.cat(out)

    # ---- heads ----
    def on_fit_start(self) -> None:
        if self.hparams.head == "ffnn":
            return
        h, dm = self.hparams, self.trainer.datamodule
        if h.head == "svc":
            # Platt-scaled probabilities (for cross-entropy and AUROC); scikit-learn >= 1.9 spells SVC's old
            # probability=True this way.
            svc = SVC(C=h.svc_c, kernel="rbf", gamma=h.svc_gamma, tol=h.svc_tol, random_state=0)
            est = CalibratedClassifierCV(svc, method="sigmoid", ensemble=False)
        else:
            # 0 < l1_ratio < 1 is the elastic net (scikit-learn >= 1.8 takes the penalty from l1_ratio alone).
            est = LogisticRegression(
                C=h.logreg_c, l1_ratio=h.l1_ratio, solver="saga", max_iter=h.max_iter, random_state=0
            )
        self.estimator = make_pipeline(StandardScaler(), est) if h.standardize else est
        rows = dm.train_rows
        self.estimator.fit(self.features[rows].cpu().numpy(), dm.table["label"].to_numpy()[rows])

    def on_train_end(self) -> None:
        # ModelCheckpoint saves only after optimizer steps, and a scikit-learn head takes none: save the fitted
        # head where the callback would have, and make it the best, so `test(ckpt_path="best")` finds it.
        cb = self.trainer.checkpoint_callback
        if self.estimator is not None and cb is not None and not cb.best_model_path:
            cb.best_model_path = str(Path(cb.dirpath) / f"{self.hparams.head}.ckpt")
            self.trainer.save_checkpoint(cb.best_model_path)

    def training_step(self, batch, batch_idx):
        if self.hparams.head != "ffnn":
            return None  # fitted in on_fit_start; the epoch only walks the data
        _, y, row = batch
        loss = F.cross_entropy(self.ffnn(self.features[row]), y)
        # Keras-style kernel L2 (thesis 1): l2 * sum(w^2), not AdamW's decoupled decay.
        penalty = sum((m.weight**2).sum() for m in self.ffnn if isinstance(m, nn.Linear))
        self.log("train/loss", loss, prog_bar=True, on_step=False, on_epoch=True)
        return loss + self.hparams.l2 * penalty

    def probs(self, x: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
        f = self.features[row]
        if self.hparams.head == "ffnn":
            return self.ffnn(f).softmax(-1)
        return torch.as_tensor(
            self.estimator.predict_proba(f.cpu().numpy()), dtype=torch.float32, device=f.device
        )

    def configure_optimizers(self):
        if self.hparams.head != "ffnn":
            return None
        return torch.optim.Adam(self.ffnn.parameters(), lr=self.hparams.lr)

    # scikit-learn estimators have no tensor form: they travel pickled, as bytes in a uint8 tensor, so that the
    # checkpoint still loads with weights_only=True. Unpickle only checkpoints you trust, as with joblib.
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.estimator is not None:
            checkpoint["sklearn"] = torch.frombuffer(
                bytearray(pickle.dumps(self.estimator)), dtype=torch.uint8
            )

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "sklearn" in checkpoint:
            self.estimator = pickle.loads(checkpoint["sklearn"].numpy().tobytes())
