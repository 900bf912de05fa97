from synaug.models.backbones import WeightsUnavailableError, create_backbone, weights_id

__all__ = ["WeightsUnavailableError", "create_backbone", "weights_id"]
