"""Classification metrics (torchmetrics) under synaug's names, and the confusion-matrix figure."""

from __future__ import annotations

import warnings

import matplotlib.pyplot as plt
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)


class ClassificationMetrics(nn.Module):
    """Accumulates probabilities and targets; `compute(prefix)` gives `prefix/acc`, `prefix/f1_macro`, ...,
    per-class `prefix/recall/<class>` and `prefix/f1/<class>`, and `prefix/cross_entropy`."""

    def __init__(self, num_classes: int, class_names: list[str] | None = None):
        super().__init__()
        self.class_names = class_names or [str(i) for i in range(num_classes)]
        k = num_classes
        # Per-class scores, averaged here over the classes present in the targets: torchmetrics' macro averages
        # count a class absent from the split as 0 (macro AUROC 0.569 instead of 0.758 in one case).
        self.scores = MetricCollection(
            {
                "acc": MulticlassAccuracy(k, average="micro"),
                "precision": MulticlassPrecision(k, average=None),
                "recall": MulticlassRecall(k, average=None),
                "f1": MulticlassF1Score(k, average=None),
                "auroc": MulticlassAUROC(k, average=None),
            }
        )
        self.confmat = MulticlassConfusionMatrix(k)
        self.cross_entropy = MeanMetric()

    def update(self, probs: torch.Tensor, target: torch.Tensor) -> None:
        self.scores.update(probs, target)
        self.confmat.update(probs, target)
        # NLL of the probabilities (clamped: an SVC can give an exact 0) is the cross-entropy of the logits.
        self.cross_entropy.update(F.nll_loss(probs.clamp_min(1e-12).log(), target, reduction="none"))

    def compute(self, prefix: str) -> dict[str, float]:
        """Per-class recall and F1 (NaN for a class with no target: it has none to recall), macro precision,
        recall, F1 and AUROC over the classes present, with a warning naming the absent ones."""
        present = self.confmat.compute().sum(dim=1) > 0
        absent = [c for c, p in zip(self.class_names, present.tolist(), strict=True) if not p]
        if absent:
            warnings.warn(
                f"{prefix}: class(es) {absent} have no {prefix} images; their recall/F1/AUROC are NaN and left "
                "out of the macro averages",
                stacklevel=2,
            )
        scores = self.scores.compute()
        out = {f"{prefix}/acc": float(scores["acc"])}
        for name in ("precision", "recall", "f1", "auroc"):
            value = scores[name].float().masked_fill(~present, float("nan"))
            out[f"{prefix}/{name}_macro" if name != "auroc" else f"{prefix}/auroc"] = float(value.nanmean())
            if name in ("recall", "f1"):
                out |= {
                    f"{prefix}/{name}/{c}": float(v) for c, v in zip(self.class_names, value, strict=True)
                }
        out[f"{prefix}/cross_entropy"] = float(self.cross_entropy.compute())
        return out

    def confusion_figure(self, title: str = "") -> plt.Figure:
        fig, ax = self.confmat.plot(labels=self.class_names)  # laid out by torchmetrics (no tight_layout)
        ax.set_title(title)
        return fig

    def reset(self) -> None:
        self.scores.reset()
        self.confmat.reset()
        self.cross_entropy.reset()
