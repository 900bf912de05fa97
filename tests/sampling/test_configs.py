from pathlib import Path

import pytest
from jsonargparse import ActionConfigFile, ArgumentParser

from synaug.sampling import sample

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs" / "sample").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_example_configs_match_the_sample_signature(path):
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("-c", "--config", action=ActionConfigFile)
    parser.add_function_arguments(sample)
    cfg = parser.parse_args(["-c", str(path)])
    # The examples name local weight files: nothing can be downloaded on the lab machines.
    assert cfg.checkpoint_path


def test_there_are_example_configs():
    assert {p.stem for p in CONFIGS} >= {"brain_efficientnet_b0", "brain_clip_vit_b32"}
