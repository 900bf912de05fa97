"""Classification metrics (torchmetrics) under synaug's names, and the confusion matrix as an image."""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

DARK = (8, 48, 107)  # the darkest blue of matplotlib's Blues: a row's whole share


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

    def confusion_image(self, title: str = "", cell: int = 72) -> Image.Image:
        """The confusion matrix as an image: a row per true class, a column per predicted one, each cell its
        count and its share of the row, shaded by that share. Drawn with PIL, not matplotlib: every run logs one,
        and torchmetrics' figure took 0.13-0.18 s to draw and save (this: a few milliseconds)."""
        counts = self.confmat.compute().cpu().numpy().astype(int)
        share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
        font = ImageFont.load_default(size=13)
        width = max(font.getlength(n) for n in self.class_names)
        cell = max(cell, int(width) + 12)
        k, left, top, pad = len(self.class_names), int(width) + 20, 56, 8
        img = Image.new("RGB", (left + k * cell + pad, top + k * cell + 28), "white")
        draw = ImageDraw.Draw(img)
        draw.text((left + k * cell // 2, 4), title, fill="black", font=font, anchor="ma")
        draw.text((left + k * cell // 2, 22), "predicted", fill="black", font=font, anchor="ma")
        draw.text((pad, top + k * cell + 8), "rows: true class", fill="black", font=font)
        for j, name in enumerate(self.class_names):
            draw.text((left + j * cell + cell // 2, top - 6), name, fill="black", font=font, anchor="ms")
        for i, name in enumerate(self.class_names):
            y = top + i * cell
            draw.text((left - 8, y + cell // 2), name, fill="black", font=font, anchor="rm")
            for j in range(k):
                x, v = left + j * cell, float(share[i, j])
                fill = tuple(round(255 + v * (c - 255)) for c in DARK)  # white -> dark blue with the share
                draw.rectangle((x, y, x + cell - 2, y + cell - 2), fill=fill)
                draw.multiline_text(
                    (x + cell // 2, y + cell // 2),
                    f"{counts[i, j]}\n{v:.0%}",
                    fill="white" if v > 0.5 else "black",
                    font=font,
                    anchor="mm",
                    align="center",
                )
        return img

    def reset(self) -> None:
        self.scores.reset()
        self.confmat.reset()
        self.cross_entropy.reset()
