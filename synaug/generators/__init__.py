"""Generators trained on the user's own images.

The generation command is `synaug.generators.generate.generate`; it is not re-exported here, where its name
would shadow its module.
"""

from synaug.generators.diffusion import PRESETS, build_unet, sample
from synaug.generators.diffusion_module import ClassConditionalDiffusion, load_generator
from synaug.generators.export import GeneratorMeta

__all__ = [
    "PRESETS",
    "ClassConditionalDiffusion",
    "GeneratorMeta",
    "build_unet",
    "load_generator",
    "sample",
]
