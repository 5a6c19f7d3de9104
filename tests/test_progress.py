"""What long work reports: progress bars that suit a log file, and training's pace."""

from __future__ import annotations

import io
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


def test_pace_counts_only_the_steps_this_process_ran(monkeypatch):
    clock = iter([100.0, 160.0])  # started at 100 s; step 30 logged at 160 s
    monkeypatch.setattr("ray_jobs.train.time.perf_counter", lambda: next(clock))
    pace = Pace(start_step=10, max_steps=1010)  # resumed at step 10
    assert pace.describe(10) == "" and pace.update(10) == {}
    assert pace.update(30) == {"train/s_per_step": 3.0}  # 60 s over 20 steps
    assert pace.describe(30) == "(3 s/step, 0:49:00 left)"  # 980 steps x 3 s
