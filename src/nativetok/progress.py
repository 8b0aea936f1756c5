"""Progress of every long loop: a bar on a terminal, timed log lines in a batch job's log.

A bar redraws itself with carriage returns, and a log file keeps every redraw. So a bar shows only when its
stream is a terminal outside a SLURM batch job; elsewhere the same loop logs an INFO line at most every
`EVERY_SECONDS`, and one when it ends, e.g.

    tokenize (rank 0): 51200/1281167 (4.0%) | 1843 img/s | ETA 00:10:12
    tokenize (rank 0): 1281167/1281167 (100.0%) | 1840 img/s | done in 00:11:36

While a bar shows, log records are written above it (through `tqdm.write`) rather than over it. Training's
console (lit/console.py) follows the same policy with the same formatting helpers.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import ExitStack
from typing import Any, Iterable, Iterator, Optional, TextIO, Union

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

log = logging.getLogger(__name__)

EVERY_SECONDS = 30.0  # between two progress lines of one loop


def slurm_batch_job() -> bool:
    """Inside a SLURM job, but not an interactive `srun --pty` (which sets SLURM_PTY_PORT)."""
    return bool(os.environ.get("SLURM_JOB_ID")) and not os.environ.get("SLURM_PTY_PORT")


def on_terminal(stream: Optional[TextIO]) -> bool:
    """Whether a bar drawn on `stream` is seen as one: a terminal, and not a batch job a site gave a pty."""
    return stream is not None and stream.isatty() and not slurm_batch_job()


def duration(seconds: float) -> str:
    """`hh:mm:ss`, with `Nd ` in front from a day on."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    return (f"{days}d " if days else "") + f"{hours:02d}:{minutes:02d}:{secs:02d}"


def per_second(count: float, seconds: float, unit: str) -> str:
    """`1843 img/s`, or three significant digits below 100 (`0.512 batch/s`: a slow loop's rate is not 0)."""
    rate = count / max(seconds, 1e-9)
    return f"{rate:.0f} {unit}/s" if rate >= 100 else f"{rate:.3g} {unit}/s"


class Bar(tqdm):
    """tqdm that, while it shows, routes the console's log records through `tqdm.write`: a record printed
    straight to the terminal would land on the bar's line and be overwritten by its next redraw."""

    def __init__(self, *args: Any, **kwargs: Any):
        self._logs_above = ExitStack()  # before tqdm's own set-up, which may fail and then close the bar
        super().__init__(*args, **kwargs)
        if not self.disable:
            self._logs_above.enter_context(logging_redirect_tqdm())

    def close(self) -> None:
        super().close()
        self._logs_above.close()


class LogProgress:
    """A loop's progress as INFO lines: one at most every `every` seconds, and one when it ends (also when
    it stops early). It counts as a bar does: by iterating it, or by `update(n)` inside `with`."""

    def __init__(self, iterable: Optional[Iterable] = None, total: Optional[int] = None, desc: str = "",
                 unit: str = "it", every: float = EVERY_SECONDS):
        self.iterable = iterable
        self.total = len(iterable) if total is None and hasattr(iterable, "__len__") else total
        self.desc, self.unit, self.every = desc, unit, every
        self.n = 0
        self.start = self.last = time.monotonic()
        self.closed = False

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> "LogProgress":
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every and self.n != self.total:  # the end has its own line
            self.last = now
            log.info("%s", self.line(now))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            log.info("%s", self.line(time.monotonic(), final=True))

    def line(self, now: float, final: bool = False) -> str:
        elapsed = now - self.start
        if self.total is None:
            done = f"{self.n} {self.unit}"
        else:
            done = f"{self.n}/{self.total} ({100 * self.n / self.total if self.total else 100.0:.1f}%)"
        parts = [f"{self.desc}: {done}", per_second(self.n, elapsed, self.unit)]
        if final:
            parts.append(f"done in {duration(elapsed)}")
        elif self.total and self.n:
            parts.append(f"ETA {duration(elapsed / self.n * (self.total - self.n))}")
        return " | ".join(parts)


def track(iterable: Optional[Iterable] = None, *, total: Optional[int] = None, desc: str = "", unit: str = "it",
          disable: bool = False, leave: bool = True) -> Union[Bar, LogProgress]:
    """The progress of a loop over `iterable` (or of `update` calls toward `total`): a bar when stderr is a
    terminal (`on_terminal`), else timed log lines. `disable` shows nothing (e.g. on ranks other than 0);
    `leave=False` clears a bar when it ends."""
    if disable or on_terminal(sys.stderr):
        return Bar(iterable, total=total, desc=desc, unit=unit, disable=disable, leave=leave)
    return LogProgress(iterable, total, desc, unit)
