"""The locked install: requirements/lock.txt agrees with pyproject.toml, and the installed set is consistent."""

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("lock", ROOT / "tools" / "lock.py")
lock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lock)


def test_committed_lock_agrees_with_pyproject():
    assert lock.disagreements() == []


def test_lock_leaves_torch_to_the_users_index():
    pins, _ = lock.parse(lock.LOCK.read_text())
    assert not {"torch", "torchvision", "triton"} & pins.keys()
    assert not [p for p in pins if p.startswith("nvidia-")]


def test_disagreements_are_named(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(
        '[project]\nname = "x"\ndependencies = ["numpy>=99", "torch>=2.4"]\n'
        '[project.optional-dependencies]\ndev = ["x[test]"]\ntest = ["not-in-the-lock>=1"]\n'
    )
    pinned = tmp_path / "lock.txt"
    pinned.write_text("numpy==2.4.6 ; python_full_version < '3.12'\n    # via x\ntorch==2.14.1\n")
    problems = lock.disagreements(pinned, pyproject)
    assert any("numpy==2.4.6" in p and "outside" in p for p in problems)
    assert any("not-in-the-lock>=1" in p and "missing" in p for p in problems)
    assert any(p.startswith("torch is pinned") for p in problems)


def test_installed_environment_is_consistent():
    result = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
