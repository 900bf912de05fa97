"""Heads on frozen CNN features (thesis 1): an FFNN, an RBF SVC or elastic-net logistic regression.

Features are computed by the frozen backbone only for the images a run uses (its subset, validation and test
images, synthetic ones) and cached on disk per image, keyed by the image's content, the backbone, its weights
and the image size: the seeds, heads, ratios and cells of a grid extract each image once. The FFNN trains on
them with Lightning; the scikit-learn heads are fitted once at the start of `fit`, and the fitted estimator
travels in the Lightning checkpoint, as its arrays (`sklearn_state`), so that `synaug test --ckpt_path` works
the same for all heads and loading a checkpoint never unpickles anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.calibration import CalibratedClassifierCV, _CalibratedClassifier, _SigmoidCalibration
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC
from tqdm.auto import tqdm

from synaug.cache import cached_rows
from synaug.classifiers.base import Classifier
from synaug.models.backbones import create_backbone, normalization, weights_id


class FeatureClassifier(Classifier):
    def __init__(
        self,
        head: Literal["ffnn", "svc", "logreg"] = "ffnn",
        backbone: str = "efficientnet_lite0",
        num_classes: int = 2,
        in_chans: int = 3,
        image_size: int = 128,
        class_names: list[str] | None = None,
        pretrained: bool = True,
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
        head_seed: int | None = None,
    ):
        """
        Args:
            head: `ffnn` (hidden ReLU layers, L2 penalty `l2`, Adam `lr`; epochs and early stopping come from
                the trainer config), `svc` (RBF, `svc_c`, `svc_gamma`, `svc_tol`, Platt-scaled probabilities) or
                `logreg` (elastic-net, saga, `logreg_c`, `l1_ratio`, `max_iter`).
            backbone, pretrained, checkpoint_path: the frozen feature extractor (timm name). The default,
                ImageNet EfficientNet-Lite0, ships in a package and works offline; other pretrained backbones
                need `checkpoint_path`. Random weights (`pretrained: false`) are drawn from a fixed seed so that
                their features, and the cache, are reproducible.
            hidden: FFNN hidden widths, default 4 x 256 as in thesis 1.
            standardize: scale features to zero mean and unit variance before the scikit-learn heads (saga and
                the RBF kernel both assume comparable feature scales).
            head_seed: the heads' randomness: the FFNN's initial weights, saga's sampling order, the shuffled folds
                of the SVC's Platt calibration. Default: drawn from the global RNG, which the run's
                `seed_everything` seeds, so that seeds of a grid differ and a seed repeats.
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
        # Rows of the table are this run's images: features of the others are never computed.
        self.features = cached_rows(
            "features", key, dm.table["sha256"].tolist(), lambda rows: self._extract(dm, rows)
        )
        if h.head == "ffnn" and self.ffnn is None:
            dims = [self.features.shape[1], *self.hidden]
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self._seed())
                layers = [
                    m for a, b in zip(dims, dims[1:], strict=False) for m in (nn.Linear(a, b), nn.ReLU())
                ]
                self.ffnn = nn.Sequential(*layers, nn.Linear(dims[-1], h.num_classes))

    def _seed(self) -> int:
        if self.hparams.head_seed is None:
            self.hparams.head_seed = int(torch.randint(2**31 - 1, ()))  # recorded, so a checkpoint names it
        return self.hparams.head_seed

    @torch.no_grad()
    def _extract(self, dm, rows: np.ndarray) -> torch.Tensor:
        """Features of table rows `rows`, decoded a batch at a time (from memory or from disk)."""
        h = self.hparams
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # random weights, when asked for, are the same in every run
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
        mean, std = mean.to(device), std.to(device)
        out = []
        for b in tqdm(
            np.array_split(rows, -(-len(rows) // h.feature_batch_size)), desc=f"features ({h.backbone})"
        ):
            if dm.in_memory:
                x = dm.images[torch.as_tensor(b, device=dm.images.device)]
            else:
                x = torch.stack([torch.from_numpy(dm.load_row(int(r))) for r in b])
            # (x - mean) / std repeats grey images to a pretrained RGB stem (see `normalization`)
            out.append(net((x.to(device).float() / 255 - mean) / std).float().cpu())
        return torch.cat(out)

    # ---- heads ----
    def on_fit_start(self) -> None:
        if self.hparams.head == "ffnn":
            return
        h, dm = self.hparams, self.trainer.datamodule
        seed = self._seed()
        if h.head == "svc":
            # Platt-scaled probabilities (for cross-entropy and AUROC); scikit-learn >= 1.9 spells SVC's old
            # probability=True this way. The SVC itself is deterministic: the seed shuffles the calibration folds.
            svc = SVC(C=h.svc_c, kernel="rbf", gamma=h.svc_gamma, tol=h.svc_tol, random_state=seed)
            folds = StratifiedKFold(5, shuffle=True, random_state=seed)
            est = CalibratedClassifierCV(svc, method="sigmoid", cv=folds, ensemble=False)
        else:
            # 0 < l1_ratio < 1 is the elastic net (scikit-learn >= 1.8 takes the penalty from l1_ratio alone).
            est = LogisticRegression(
                C=h.logreg_c, l1_ratio=h.l1_ratio, solver="saga", max_iter=h.max_iter, random_state=seed
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
        self.log("train/loss", loss, prog_bar=True, on_step=False, on_epoch=True, sync_dist=True)
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

    # The fitted estimator travels as its arrays and plain values (`sklearn_state`), which torch.load reads with
    # weights_only=True and which rebuild only the classes in `SKLEARN_TYPES`: a checkpoint cannot run code.
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.estimator is not None:
            checkpoint["sklearn_state"] = sklearn_state(self.estimator)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "sklearn" in checkpoint:
            raise ValueError(
                "this checkpoint stores its scikit-learn head as a pickle, which synaug no longer loads (unpickling "
                "can run any code); retrain the head with `synaug fit` to get a checkpoint that can be tested"
            )
        if "sklearn_state" in checkpoint:
            self.estimator = sklearn_from_state(checkpoint["sklearn_state"])


# --- scikit-learn heads as tensors ---------------------------------------------------------------------------

# The classes a stored head may contain; anything else is refused by name, never imported.
SKLEARN_TYPES = {
    f"{c.__module__}.{c.__qualname__}": c
    for c in (
        Pipeline,
        StandardScaler,
        LogisticRegression,
        SVC,
        CalibratedClassifierCV,
        _CalibratedClassifier,
        _SigmoidCalibration,
        StratifiedKFold,
    )
}


def sklearn_state(obj: Any) -> Any:
    """A fitted estimator as nested dicts and lists of tensors and plain values (the object's `__dict__`)."""
    if isinstance(obj, np.ndarray):
        if obj.dtype == object:
            raise TypeError(f"cannot store an object array of shape {obj.shape}")
        return torch.from_numpy(np.ascontiguousarray(obj).copy())
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if isinstance(obj, list):
        return [sklearn_state(v) for v in obj]
    if isinstance(obj, tuple):
        return {"tuple": [sklearn_state(v) for v in obj]}
    if isinstance(obj, dict):
        return {"dict": {k: sklearn_state(v) for k, v in obj.items()}}
    name = f"{type(obj).__module__}.{type(obj).__qualname__}"
    if name not in SKLEARN_TYPES:
        raise TypeError(f"cannot store a {name} in a scikit-learn head (known: {sorted(SKLEARN_TYPES)})")
    return {"class": name, "state": {k: sklearn_state(v) for k, v in vars(obj).items()}}


def sklearn_from_state(state: Any) -> Any:
    """The estimator `sklearn_state` stored; a class outside `SKLEARN_TYPES` raises ValueError."""
    if isinstance(state, torch.Tensor):
        return state.numpy()
    if isinstance(state, list):
        return [sklearn_from_state(v) for v in state]
    if not isinstance(state, dict):
        return state
    if "tuple" in state:
        return tuple(sklearn_from_state(v) for v in state["tuple"])
    if "dict" in state:
        return {k: sklearn_from_state(v) for k, v in state["dict"].items()}
    cls = SKLEARN_TYPES.get(state["class"])
    if cls is None:
        raise ValueError(
            f"checkpoint's scikit-learn head names {state['class']!r}, which is not a known head class "
            f"({sorted(SKLEARN_TYPES)}); refusing to load it"
        )
    obj = cls.__new__(cls)
    obj.__dict__.update({k: sklearn_from_state(v) for k, v in state["state"].items()})
    return obj
