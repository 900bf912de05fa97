from synaug.classifiers.finetune import ImageClassifier
from synaug.classifiers.frozen import FeatureClassifier

__all__ = ["FeatureClassifier", "ImageClassifier"]
