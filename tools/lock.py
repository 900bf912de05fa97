"""The locked dependency set: `requirements/lock.txt`, used as a pip constraints file.

    python tools/lock.py compile   # regenerate the lock from pyproject.toml (needs uv: pip install uv)
    python tools/lock.py check     # fail when the lock and pyproject.toml disagree (CI runs this)

The lock pins everything `pip install -e '.[dev]'` resolves, for every Python the project supports
(`uv pip compile --universal`), except torch, torchvision and what only they pull in (triton, the nvidia-*
CUDA libraries, sympy, ...): those come from wherever the user's pip finds torch (a CPU index, a CUDA index,
a local wheel), and pinning them here would make a CPU-only or a different-CUDA machine fail to find torch.
"""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "lock.txt"
EXTRA = "dev"  # dev includes test; faiss-cpu is a base dependency (a GPU faiss replaces it by hand)
TORCH = {"torch", "torchvision", "triton"}


def uv_compile(out: Path, omit: list[str]) -> None:
    cmd = [
        "uv",
        "pip",
        "compile",
        "pyproject.toml",
        "--extra",
        EXTRA,
        "--universal",
        "--quiet",
        "-o",
        str(out.relative_to(ROOT)),
    ]
    cmd += [a for p in sorted(omit) for a in ("--no-emit-package", p)]
    subprocess.run(cmd, cwd=ROOT, check=True)


def parse(text: str) -> tuple[dict[str, list[tuple[Version, str | None]]], dict[str, set[str]]]:
    """Pins ({name: [(version, marker)]}) and the `# via` graph ({name: {parents}}) of a uv lock file."""
    pins: dict[str, list] = {}
    via: dict[str, set[str]] = {}
    current = None
    for line in text.splitlines():
        if m := re.match(r"^([A-Za-z0-9_.\-]+)==([^ ;]+)(?:\s*;\s*(.+))?$", line):
            current = canonicalize_name(m[1])
            pins.setdefault(current, []).append((Version(m[2]), m[3]))
            via.setdefault(current, set())
        elif current and (m := re.match(r"^\s+#\s+(?:via\s+)?([A-Za-z0-9_.\-]+)", line)) and m[1] != "via":
            via[current].add(canonicalize_name(m[1]))
    return pins, via


def torch_only(via: dict[str, set[str]]) -> set[str]:
    """torch's family and every package reached through it alone."""
    family = set(TORCH)
    while True:
        more = {p for p, parents in via.items() if p not in family and parents and parents <= family}
        if not more:
            return family
        family |= more


def compile_lock() -> None:
    LOCK.parent.mkdir(exist_ok=True)
    full = LOCK.with_suffix(".full.txt")
    uv_compile(full, [])
    family = torch_only(parse(full.read_text())[1])
    full.unlink()
    uv_compile(LOCK, sorted(family))
    print(
        f"wrote {LOCK.relative_to(ROOT)}, leaving out {len(family)} torch-only packages: {', '.join(sorted(family))}"
    )


def requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[Requirement]:
    """pyproject's requirements for the locked extra, following self-references (synaug[test] -> ...)."""
    project = tomllib.loads(pyproject.read_text())["project"]
    extras, todo, seen = project["optional-dependencies"], [EXTRA], set()
    reqs = [Requirement(r) for r in project["dependencies"]]
    while todo:
        extra = todo.pop()
        seen.add(extra)
        for r in map(Requirement, extras[extra]):
            if canonicalize_name(r.name) == canonicalize_name(project["name"]):
                todo += [e for e in r.extras if e not in seen]
            else:
                reqs.append(r)
    return reqs


def disagreements(lock: Path = LOCK, pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """Where the lock and pyproject.toml disagree: a requirement missing from the lock, a pin outside its range,
    torch pinned."""
    pins, _ = parse(lock.read_text())
    problems = []
    for req in requirements(pyproject):
        name = canonicalize_name(req.name)
        if name in TORCH:
            if name in pins:
                problems.append(f"{name} is pinned in the lock; torch comes from the user's own index")
        elif name not in pins:
            problems.append(f"{req} is in pyproject.toml but missing from the lock")
        else:
            for version, marker in pins[name]:
                if not req.specifier.contains(version, prereleases=True):
                    where = f" ({marker})" if marker else ""
                    problems.append(f"lock pins {name}=={version}{where}, outside pyproject's {req}")
    return problems


def check() -> int:
    problems = disagreements()
    for p in problems:
        print(f"lock check: {p}", file=sys.stderr)
    if problems:
        print("regenerate the lock: python tools/lock.py compile", file=sys.stderr)
        return 1
    pins, _ = parse(LOCK.read_text())
    active = sum(1 for v in pins.values() for _, m in v if m is None or Marker(m).evaluate())
    print(
        f"lock check: {len(requirements())} requirements agree with {LOCK.relative_to(ROOT)} ({active} pins here)"
    )
    return 0


if __name__ == "__main__":
    match sys.argv[1:]:
        case ["compile"]:
            compile_lock()
        case ["check"]:
            sys.exit(check())
        case _:
            sys.exit(__doc__)
