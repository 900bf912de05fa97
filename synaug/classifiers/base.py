"""What every classifier shares: metrics on validation and test under synaug's names, and the confusion matrix
of the test set as an image in MLflow. Subclasses say how to train and how to turn a batch into probabilities."""

from __future__ import annotations

import lightning.pytorch as L
import torch

from synaug.metrics import ClassificationMetrics
from synaug.tracking import MLFlowLogger

# Under DDP each rank evaluates its shard of the split; `compute` gathers the metrics' states from every rank
# (torchmetrics), so each rank holds the whole split's values. Lightning is told they are synced: the maximum
# of equal values is exact, where a mean over three ranks could round.
SYNCED = {"sync_dist": True, "reduce_fx": "max"}


class Classifier(L.LightningModule):
    def __init__(self, num_classes: int, class_names: list[str] | None):
        super().__init__()
        self.val_metrics = ClassificationMetrics(num_classes, class_names)
        self.test_metrics = ClassificationMetrics(num_classes, class_names)

    def probs(self, x: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def validation_step(self, batch, batch_idx):
        x, y, row = batch
        self.val_metrics.update(self.probs(x, row), y)

    def test_step(self, batch, batch_idx):
        x, y, row = batch
        self.test_metrics.update(self.probs(x, row), y)

    def predict_step(self, batch, batch_idx):
        x, _, row = batch
        return self.probs(x, row)

    def on_validation_epoch_end(self):
        self.log_dict(self.val_metrics.compute("val"), prog_bar=False, **SYNCED)
        self.val_metrics.reset()

    def on_test_epoch_end(self):
        self.log_dict(self.test_metrics.compute("test"), **SYNCED)
        if isinstance(self.logger, MLFlowLogger):
            image = self.test_metrics.confusion_image("test")
            self.logger.experiment.log_image(self.logger.run_id, image, "test/confusion_matrix.png")
        self.test_metrics.reset()
