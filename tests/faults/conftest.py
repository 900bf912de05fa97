"""The reliability figures: every test here records what it tried (a bad input and the message it got, a fault
injected and what survived it, a payload refused) through `figures`, and the run ends with their table, the
numbers quoted in the README's "Reliability" section: `pytest tests/faults -q -rA`."""

from collections import defaultdict

import pytest

RECORDS: dict[str, list[tuple[str, str]]] = defaultdict(list)


@pytest.fixture
def figures(tmp_path):
    def record(kind: str, what: str, outcome: str) -> None:
        line = outcome.strip().splitlines()[-1] if outcome.strip() else outcome
        RECORDS[kind].append((what, line.replace(f"{tmp_path}/", "")))

    return record


def pytest_terminal_summary(terminalreporter):
    if not RECORDS:
        return
    tr = terminalreporter
    tr.section("reliability figures")
    for kind, rows in RECORDS.items():
        tr.write_line(f"{kind}: {len(rows)}")
        for what, outcome in rows:
            tr.write_line(f"  {what}: {outcome[:160]}")
