"""What long work reports: progress bars that suit a log file, and training's pace."""

from __future__ import annotations

import io
import re
import sys

from meld.progress import LOG_INTERVAL_S, progress
from ray_jobs.train import Pace


def test_progress_bars_redraw_rarely_and_in_ascii_into_a_log_file(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal, as under dvc, Ray or CI
    bar = progress(range(3), desc="x")
    assert bar.mininterval == LOG_INTERVAL_S and bar.ascii is True
    assert list(bar) == [0, 1, 2]
    bar = progress(range(3), mininterval=1.0)  # an explicit choice wins
    assert bar.mininterval == 1.0
    bar.close()


def test_each_redraw_into_a_log_file_is_a_line_of_its_own(monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    assert list(progress(range(3), desc="x", mininterval=0, miniters=1)) == [0, 1, 2]
    lines = log.getvalue().split("\n")
    assert "\r" not in log.getvalue() and lines[-1] == ""  # whole lines, the last one ended
    counts = [int(re.search(r"(\d+)/3 \[", line).group(1)) for line in lines[:-1]]  # "x: 33%|###3 | 1/3 [..."
    assert counts[0] == 0 and counts[-1] == 3 and counts == sorted(counts) and len(counts) >= 4  # every redraw
    assert sys.stdout.getvalue() == ""  # where data goes


def test_pace_counts_only_the_steps_this_process_ran(monkeypatch):
    clock = iter([100.0, 160.0])  # started at 100 s; step 30 logged at 160 s
    monkeypatch.setattr("ray_jobs.train.time.perf_counter", lambda: next(clock))
    pace = Pace(start_step=10, max_steps=1010)  # resumed at step 10
    assert pace.describe(10) == "" and pace.update(10) == {}
    assert pace.update(30) == {"train/s_per_step": 3.0}  # 60 s over 20 steps
    assert pace.describe(30) == "(3 s/step, 0:49:00 left)"  # 980 steps x 3 s
