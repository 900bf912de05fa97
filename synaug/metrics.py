"""Classification metrics (torchmetrics) under synaug's names, and the confusion-matrix figure."""

from __future__ import annotations

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
        self.scores = MetricCollection(
            {
                "acc": MulticlassAccuracy(k, average="micro"),
                "precision_macro": MulticlassPrecision(k, average="macro"),
                "recall_macro": MulticlassRecall(k, average="macro"),
                "f1_macro": MulticlassF1Score(k, average="macro"),
                "auroc": MulticlassAUROC(k, average="macro"),
                "recall": MulticlassRecall(k, average=None),
                "f1": MulticlassF1Score(k, average=None),
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
        out = {}
        for name, value in self.scores.compute().items():
            if value.ndim:
                out |= {
                    f"{prefix}/{name}/{c}": float(v) for c, v in zip(self.class_names, value, strict=True)
                }
            else:
                out[f"{prefix}/{name}"] = float(value)
        out[f"{prefix}/cross_entropy"] = float(self.cross_entropy.compute())
        return out

    def confusion_figure(self, title: str = "") -> plt.Figure:
        fig, ax = self.confmat.plot(labels=self.class_names)
        ax.set_title(title)
        fig.tight_layout()
        return fig

    def reset(self) -> None:
        self.scores.reset()
        self.confmat.reset()
        self.cross_entropy.reset()
