from synaug.data.datamodule import ClassificationData
from synaug.data.images import BadImageError
from synaug.data.sources import DataError, ImageSource, load_source

__all__ = ["BadImageError", "ClassificationData", "DataError", "ImageSource", "load_source"]
