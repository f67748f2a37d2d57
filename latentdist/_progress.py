"""Progress bars that suit where their output goes.

The rule: on a terminal, an ordinary tqdm bar; in a notebook, tqdm's notebook widget; anywhere
else (a log file, CI, ``nohup``) no carriage-return updates at all, but one plain line at most
every ``LOG_INTERVAL_S`` seconds (and a last line when a bar that is kept closes). Every command
turns bars off with ``--no-progress``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from typing import Any

from tqdm.std import tqdm

LOG_INTERVAL_S = 10.0  # seconds between progress lines when standard error is not a terminal


class _Discard:
    """A stream that drops what tqdm writes itself (carriage returns, clears, newlines)."""

    def write(self, s: str) -> int:
        return len(s)

    def flush(self) -> None:
        pass


class LogBar(tqdm):
    """tqdm for logs: a newline-terminated line at most every ``interval`` seconds.

    The first line comes ``interval`` seconds after the start (short bars write nothing but their
    last line, and transient ``leave=False`` bars not even that).
    """

    def __init__(self, *args: Any, file: Any = None, interval: float | None = None, **kw: Any):
        self._log = file if file is not None else sys.stderr
        self._interval = LOG_INTERVAL_S if interval is None else interval
        self._last_line = time.monotonic()
        kw.setdefault("ncols", 100)
        kw.setdefault(
            "mininterval", 0.0
        )  # the interval above throttles; tqdm's own would hide updates
        super().__init__(*args, file=_Discard(), **kw)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if msg is not None:  # tqdm clearing or overriding the bar: nothing to log
            return True
        now, closing = time.monotonic(), self.disable  # close() disables before its last display
        if not closing and now - self._last_line < self._interval:
            return True
        self._last_line = now
        self._log.write(str(self).replace("\r", "").strip() + "\n")
        self._log.flush()
        return True


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _in_notebook() -> bool:
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    try:
        shell = ipython.get_ipython()
    except AttributeError:
        return False
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def progress_bar(iterable: Iterable | None = None, **kw: Any) -> tqdm:
    """A tqdm bar by the module's rule: terminal bar, notebook widget, or throttled log lines.

    Takes tqdm's arguments (``disable=True`` for ``--no-progress``); ``file`` defaults to stderr.
    """
    stream = kw.pop("file", None) or sys.stderr
    if kw.get("disable"):
        return tqdm(iterable, file=stream, **kw)
    if _in_notebook():
        from tqdm.auto import tqdm as auto_tqdm  # the widget when ipywidgets is installed

        return auto_tqdm(iterable, **kw)
    if _is_terminal(stream):
        return tqdm(iterable, file=stream, **kw)
    kw.pop("dynamic_ncols", None)
    return LogBar(iterable, file=stream, **kw)
