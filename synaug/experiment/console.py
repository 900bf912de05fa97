"""The console of a grid: one progress display for all its steps, and each run's output in a log file of its own.

By default (no `synaug -v`), everything a classifier run or a generator step prints (Lightning's notices and test
table, warnings, progress bars, a traceback, C extensions and DataLoader workers writing to file descriptors 1
and 2) goes to `<out>/logs/<run>.log` (`to_log`), which is also logged to its MLflow run; the console shows one
display (`Progress`): the steps done of each kind, the time elapsed, an ETA and the last result. On a terminal it
is one line redrawn in place (tqdm); otherwise one `progress:` line per finished step. A run that fails prints
the end of its log and the log's path. With `-v` the runs print to the console, as any command does.
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from tqdm import tqdm

from synaug.cli import CHATTY

TAIL = 20  # lines of a failed run's log shown on the console


def log_file(logs: Path | None, run: str) -> Path | None:
    """Where run `run` writes its output: `cnn/none/real=1/none seed 0` -> `logs/cnn_none_real=1_none_seed_0.log`
    (None without `logs`: to the console)."""
    return None if logs is None else logs / (re.sub(r"[^\w.=@+:-]+", "_", run) + ".log")


@contextmanager
def to_log(path: Path | None, mode: str = "w") -> Iterator[None]:
    """While the block runs, everything this process writes goes to `path` (None: nothing changes): Python's
    stdout and stderr, the logging handlers that write to a console (Lightning's keeps the stream it found at import),
    and file descriptors 1 and 2 (C++ warnings, child processes). The libraries' INFO notices, which the console
    leaves out, are written there too: the log is what `-v` would have shown. An exception's traceback is written
    there before it propagates. `mode` "a" appends: a generator step resumed or found done keeps its training's
    log."""
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    levels = {name: logging.getLogger(name).level for name in CHATTY}
    previous = sys.stdout, sys.stderr
    for stream in previous:
        stream.flush()  # what the console was given before the block stays on the console
    saved, streams = (os.dup(1), os.dup(2)), {}
    with open(path, mode, buffering=1, encoding="utf-8", errors="replace") as f:
        try:
            os.dup2(f.fileno(), 1)
            os.dup2(f.fileno(), 2)
            sys.stdout = sys.stderr = f
            for h in _stream_handlers():  # not setStream: it flushes the old stream, which may be closed
                streams[h], h.stream = h.stream, f
            for name in CHATTY:
                logging.getLogger(name).setLevel(logging.INFO)
            yield
        except BaseException:
            traceback.print_exc(file=f)
            raise
        finally:
            f.flush()
            sys.stdout, sys.stderr = previous
            for h in _stream_handlers():  # also those made in the block (a library's first import): to stderr
                if h.stream is f:
                    h.stream = streams.get(h, previous[1])
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)
            for fd, copy in zip((1, 2), saved, strict=True):
                os.dup2(copy, fd)
                os.close(copy)


def _stream_handlers() -> list[logging.StreamHandler]:
    """The logging handlers that write to a console: plain StreamHandlers (a FileHandler is a subclass), each
    once: MLflow gives one handler to its own, SQLAlchemy's, alembic's and huey's loggers, and a handler met twice
    was saved as already pointing at the log, so it stayed on the closed file after the block."""
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    # loggerDict also holds placeholders, without handlers
    handlers = (h for lg in loggers for h in getattr(lg, "handlers", []) if type(h) is logging.StreamHandler)
    return list(dict.fromkeys(handlers))


def console():
    """The console as it is now, kept while `to_log` points descriptors 1 and 2 elsewhere: a copy of stdout's
    descriptor. A stream without one (a notebook's, pytest's capsys) writes past `to_log`'s descriptors anyway."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
        return sys.stdout
    sys.stdout.flush()
    return open(os.dup(fd), "w", buffering=1, encoding=sys.stdout.encoding, errors="replace")


class Progress:
    """One display for a whole grid: the steps done of each kind, the time elapsed, an ETA (from the measured or
    estimated seconds per step, else from the pace so far) and the last result. `live` (default: on a terminal)
    redraws one line in place; otherwise one `progress:` line per finished step."""

    UNIT = {
        "generator trainings": "generator_train_s",
        "generations": "generation_s",
        "classifier runs": "classifier_s",
    }

    def __init__(self, total: dict[str, int], costs: dict, live: bool | None = None):
        self.total, self.count, self.costs = dict(total), dict.fromkeys(total, 0), costs
        self.start, self.last, self.running = time.monotonic(), "", ""
        self.stream = console()
        self.live = self.stream.isatty() if live is None else live
        self.bar: tqdm | None = None

    def add(self, what: str, n: int) -> None:
        self.total[what], self.count[what] = n, 0

    def started(self, name: str) -> None:
        self.running = name
        if self.live:
            self._draw()

    def done(self, what: str, last: str = "") -> None:
        self.count[what] += 1
        self.last, self.running = last or self.last, ""
        if self.live:
            self._draw()
        else:
            print(f"progress: {self.line()}", file=self.stream, flush=True)

    def line(self) -> str:
        elapsed = time.monotonic() - self.start
        left = {k: self.total[k] - self.count[k] for k in self.total}
        per = {k: self.costs.get(self.UNIT[k], math.nan) for k in self.total}
        if all(not math.isnan(per[k]) for k in left if left[k]):
            eta = sum(left[k] * per[k] for k in left if left[k])
        else:
            done = sum(self.count.values())
            eta = elapsed / done * sum(left.values()) if done else math.nan
        counts = ", ".join(f"{k} {self.count[k]}/{self.total[k]}" for k in self.total if self.total[k])
        eta = "?" if math.isnan(eta) else f"{eta / 60:.1f} min"  # nothing measured, nothing done yet
        text = f"{counts or 'nothing to do'}; elapsed {elapsed / 60:.1f} min, ETA {eta}"
        return text + (f"; last: {self.last}" if self.last else "")

    def _draw(self) -> None:
        if self.bar is None:
            self.bar = tqdm(file=self.stream, bar_format="{desc}", dynamic_ncols=True)
        running = f"; running: {self.running}" if self.running else ""
        self.bar.set_description_str(self.line() + running, refresh=True)

    def aside(self):
        """A block that prints to the console between steps: the live line is cleared, then drawn again."""
        return tqdm.external_write_mode(file=self.stream) if self.bar is not None else nullcontext()

    def failed(self, name: str, log: Path | None) -> None:
        """A run failed: the end of its log and where it is (with `-v` its error is on the console already)."""
        self.close()
        if log is None:
            print(f"{name} failed", file=sys.stderr, flush=True)
            return
        tail = log.read_text(errors="replace").splitlines()[-TAIL:]
        body = "".join(f"  {line}\n" for line in tail)
        print(f"{name} failed; the end of its log ({log}):\n{body}", file=sys.stderr, end="", flush=True)

    def close(self) -> None:
        """Before the console gets anything else (the report): the live line stays as it last was."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.stream is not sys.stdout:  # the copy of stdout's descriptor
            self.stream.close()
