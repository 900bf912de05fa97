"""The reliability figures: every test here records what it tried (a bad input and the message it got, a fault
injected and what survived it, a payload refused) through `figures`; the run ends with their table (written by
tests/conftest.py, also across xdist workers), the numbers quoted in the README's "Reliability" section:
`pytest tests/faults -q -rA`."""

import json

import pytest


@pytest.fixture
def figures(figures_file, tmp_path):
    def record(kind: str, what: str, outcome: str) -> None:
        line = outcome.strip().splitlines()[-1] if outcome.strip() else outcome
        row = {"kind": kind, "what": what, "outcome": line.replace(f"{tmp_path}/", "")}
        with open(figures_file, "a") as f:  # one line per write: workers append safely
            f.write(json.dumps(row) + "\n")

    return record
