"""Progress bars that suit where their output goes.

On a terminal, a live tqdm bar. In a log file (``dvc repro``, Ray, CI and ``make run > log`` capture
stderr) tqdm's ten redraws a second would pile up into megabytes of carriage returns over a long
stage, so there it redraws every :data:`LOG_INTERVAL_S` seconds in plain ASCII: a line of count,
rate and ETA twice a minute, each ended by a newline (tqdm's own redraws start with a carriage
return and end with none, so a reader that goes by lines, as ``ray job logs --follow`` and ``tail``
piped into ``grep`` do, saw nothing until the bar closed, then every redraw as one line).
"""

from __future__ import annotations

import sys

LOG_INTERVAL_S = 30.0


class _Lines:
    """A stream for tqdm that writes each redraw as a line of its own, and drops the blank redraws
    (the clearing of a closed bar, a closed bar's lone newline)."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> None:
        line = text.strip("\r\n").rstrip()
        if line:
            self._stream.write(line + "\n")

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name):  # encoding, fileno, ...: the stream's own
        if name == "_stream":  # not yet set (a copy being made): no endless lookup
            raise AttributeError(name)
        return getattr(self._stream, name)


def progress(iterable=None, **kwargs):
    """``tqdm(iterable, **kwargs)`` with a redraw interval (and ASCII) chosen for the output.

    Explicit ``mininterval`` / ``ascii`` arguments win.
    """
    from tqdm import tqdm

    interactive = sys.stderr.isatty()
    kwargs.setdefault("mininterval", 0.5 if interactive else LOG_INTERVAL_S)
    kwargs.setdefault("ascii", not interactive)
    if not interactive:
        # tqdm's monitor thread redraws a bar not drawn for `maxinterval` (10 s) with its count as of the
        # last redraw: in a log, a line with a stale count between the periodic ones
        kwargs.setdefault("maxinterval", kwargs["mininterval"])
        kwargs.setdefault("file", _Lines(sys.stderr))
    return tqdm(iterable, **kwargs)
