from pathlib import Path

import pytest
from jsonargparse import ActionConfigFile, ArgumentParser

from synaug.models.backbones import PACKAGED
from synaug.sampling import sample

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs" / "sample").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_example_configs_match_the_sample_signature(path):
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("-c", "--config", action=ActionConfigFile)
    parser.add_function_arguments(sample)
    cfg = parser.parse_args(["-c", str(path)])
    # Nothing can be downloaded on the lab machines: the examples use packaged weights or name a local file.
    assert cfg.checkpoint_path or (cfg.embedder in PACKAGED and cfg.pretrained is True)


def test_there_are_example_configs():
    assert {p.stem for p in CONFIGS} >= {"brain_efficientnet_lite0", "brain_clip_vit_b32"}
