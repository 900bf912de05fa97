"""Shared by the generator tests: one intra-op thread each, one tiny Stable Diffusion pipeline, and a guard that
nothing lands in the working directory (exports and checkpoints belong under the trainer's root)."""

from pathlib import Path

import pytest
import torch
from helpers.sd_dummy import save_dummy_pipeline  # tests/ is on sys.path (pytest rootdir-less import)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Several test processes share two cores: more than one intra-op thread each makes them spin-wait.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _writes_nothing_in_the_working_directory():
    before = set(Path.cwd().iterdir())
    yield
    new = {q.name for q in set(Path.cwd().iterdir()) - before}
    assert not new & {"generator", "checkpoints", "lightning_logs", "outputs", "runs"}, new


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> str:
    """A tiny Stable Diffusion pipeline folder, as `save_pretrained` writes one."""
    return str(save_dummy_pipeline(tmp_path_factory.mktemp("sd")))
