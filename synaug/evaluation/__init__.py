"""Judging synthetic images: `features` (the one feature extractor), `quality`, `explain` (Grad-CAM)."""
