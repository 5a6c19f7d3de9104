"""Progress bars that suit where their output goes.

On a terminal, a live tqdm bar. In a log file (``dvc repro``, Ray, CI and ``make run > log`` capture
stderr) tqdm's ten redraws a second would pile up into megabytes of carriage returns over a long
stage, so there it redraws every :data:`LOG_INTERVAL_S` seconds in plain ASCII: a line of count,
rate and ETA twice a minute.
"""

from __future__ import annotations

import sys

LOG_INTERVAL_S = 30.0


def progress(iterable=None, **kwargs):
    """``tqdm(iterable, **kwargs)`` with a redraw interval (and ASCII) chosen for the output.

    Explicit ``mininterval`` / ``ascii`` arguments win.
    """
    from tqdm import tqdm

    interactive = sys.stderr.isatty()
    kwargs.setdefault("mininterval", 0.5 if interactive else LOG_INTERVAL_S)
    kwargs.setdefault("ascii", not interactive)
    return tqdm(iterable, **kwargs)
