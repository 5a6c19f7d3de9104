"""ray_jobs/asha.py: ASHA's decisions, as Ray Tune's ASHAScheduler makes them, kept across a restore."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("ray.tune")

from ray import cloudpickle  # noqa: E402  (what Tune pickles its scheduler with)
from ray.tune.schedulers import ASHAScheduler  # noqa: E402

from ray_jobs.asha import ResumableASHA, read_records, rung_steps  # noqa: E402

METRIC = "dev/mse"
ROOT = Path(__file__).resolve().parents[1]


def trial(i: int):
    """What a scheduler reads of a Tune trial: its id and config."""
    return SimpleNamespace(trial_id=f"trial_{i:05d}", config={"w": i / 10, "r": 1 + i % 2})


def ours(tmp_path, name="asha.jsonl", **kw):
    return ResumableASHA(tmp_path / name, key_params=("r", "w"), time_attr="step", metric=METRIC, mode="min", **kw)


def rays(**kw):
    return ASHAScheduler(time_attr="step", metric=METRIC, mode="min", stop_last_trials=False, **kw)


def asynchronous_reports(seed: int, trials: int, max_t: int, every: int) -> list[tuple[int, int, float]]:
    """(trial, step, objective) in an interleaved order, each trial's steps ascending; each trial has its
    own level and noise, so rungs see both clear and close calls."""
    rng = random.Random(seed)
    pending = {i: [(s, rng.uniform(1, 3) + 2 / s + rng.gauss(0, 0.1)) for s in range(every, max_t + 1, every)]
               for i in range(trials)}
    order = []
    while pending:
        i = rng.choice(sorted(pending))
        step, value = pending[i].pop(0)
        order.append((i, step, value))
        if not pending[i]:
            del pending[i]
    return order


def replay(scheduler, reports, stopped: set[int]) -> list[tuple[int, int, str]]:
    """Feed reports to a scheduler as Tune would (a stopped trial reports no more); its decisions."""
    decisions = []
    for i, step, value in reports:
        if i in stopped:
            continue
        decision = scheduler.on_trial_result(None, trial(i), {"step": step, METRIC: value})
        decisions.append((i, step, decision))
        if decision == "STOP":
            stopped.add(i)
    return decisions


def test_rungs_are_grace_period_times_powers_of_the_reduction_factor():
    assert rung_steps(1, 16, 2) == [1, 2, 4, 8, 16]
    assert rung_steps(8, 20, 2) == [8, 16]
    assert rung_steps(2, 54, 3) == [2, 6, 18, 54]
    # NaN slipped past every comparison (a NaN factor gave one rung, then a percentile error at the
    # second trial) and an infinite max_t looped for ever: both refused up front
    for bad in ((0, 16, 2), (32, 16, 2), (1, 16, 1), (2, 16, math.nan), (2, math.nan, 2), (1, math.inf, 2)):
        with pytest.raises(ValueError, match="grace_period"):
            rung_steps(*bad)


@pytest.mark.parametrize("grace,max_t,rf,every", [(1, 16, 2, 1), (2, 54, 3, 2), (4, 32, 2, 3), (8, 16, 2, 2)])
@pytest.mark.parametrize("seed", range(4))
def test_decisions_equal_ray_tunes_asha(tmp_path, grace, max_t, rf, every, seed):
    """Uninterrupted, it stops the same trials at the same reports as Ray Tune's ASHAScheduler (one
    bracket, stop_last_trials=False), below max_t where a stop still means something."""
    reports = asynchronous_reports(seed, trials=12, max_t=max_t, every=every)
    reference, scheduler = rays(max_t=max_t, grace_period=grace, reduction_factor=rf), ours(
        tmp_path, max_t=max_t, grace_period=grace, reduction_factor=rf)
    for i in range(12):
        reference.on_trial_add(None, trial(i))
    expected = [d for d in replay(reference, reports, set()) if d[1] < max_t]
    got = [d for d in replay(scheduler, reports, set()) if d[1] < max_t]
    assert got == expected
    assert any(d == "STOP" for _, _, d in got), "a sequence that stops nothing shows nothing"


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("cut", [0.25, 0.5, 0.75])
def test_a_restored_scheduler_decides_as_the_uninterrupted_one(tmp_path, seed, cut):
    """Tune restores the scheduler it pickled when the sweep started. Ours, so restored, reads the rung
    records written before the interruption and decides every later report as if nothing had happened."""
    grace, max_t, rf = 2, 32, 2
    reports = asynchronous_reports(seed, trials=10, max_t=max_t, every=2)
    cut = int(len(reports) * cut)

    uninterrupted = replay(ours(tmp_path, "whole.jsonl", max_t=max_t, grace_period=grace, reduction_factor=rf),
                           reports, set())
    at_start = ours(tmp_path, max_t=max_t, grace_period=grace, reduction_factor=rf)
    pickled = cloudpickle.dumps(at_start)
    stopped: set[int] = set()
    before = replay(at_start, reports[:cut], stopped)
    after = replay(cloudpickle.loads(pickled), reports[cut:], stopped)
    assert before + after == uninterrupted
    assert read_records(tmp_path / "asha.jsonl") == read_records(tmp_path / "whole.jsonl")


def test_ray_tunes_own_asha_forgets_its_rungs_when_restored(tmp_path):
    """Why ray_jobs/asha.py exists: restored from its pickle at the sweep's start, Ray Tune's ASHA lets a
    trial through that the results reported before the interruption would have stopped."""
    kw = {"max_t": 8, "grace_period": 2, "reduction_factor": 2}
    ray_asha, our_asha = rays(**kw), ours(tmp_path, **kw)
    for t in (trial(0), trial(1)):
        ray_asha.on_trial_add(None, t)
    ray_pickle, our_pickle = cloudpickle.dumps(ray_asha), cloudpickle.dumps(our_asha)
    for scheduler in (ray_asha, our_asha):
        assert scheduler.on_trial_result(None, trial(0), {"step": 2, METRIC: 1.0}) == "CONTINUE"
    ray_restored, our_restored = cloudpickle.loads(ray_pickle), cloudpickle.loads(our_pickle)
    assert ray_restored.on_trial_result(None, trial(1), {"step": 2, METRIC: 5.0}) == "CONTINUE"
    assert our_restored.on_trial_result(None, trial(1), {"step": 2, METRIC: 5.0}) == "STOP"


def test_a_trial_resumed_from_before_its_stop_is_stopped_again(tmp_path):
    """A stop lost in the interrupt (Tune's state older than it) brings the trial back from an older
    checkpoint; when it reaches the rung again it gets the recorded answer, not a new comparison."""
    scheduler = ours(tmp_path, max_t=8, grace_period=2, reduction_factor=2)
    good, bad = trial(0), trial(1)
    assert scheduler.on_trial_result(None, good, {"step": 2, METRIC: 1.0}) == "CONTINUE"
    assert scheduler.on_trial_result(None, bad, {"step": 2, METRIC: 5.0}) == "STOP"
    restored = cloudpickle.loads(cloudpickle.dumps(ours(tmp_path, max_t=8, grace_period=2, reduction_factor=2)))
    assert restored.on_trial_result(None, bad, {"step": 2, METRIC: 0.5}) == "STOP"  # better now, same answer
    assert restored.on_trial_result(None, good, {"step": 3, METRIC: 9.0}) == "CONTINUE"  # still at rung 2: passed
    assert [r["stopped"] for r in read_records(tmp_path / "asha.jsonl")] == [False, True]


def test_a_trial_resumed_from_past_its_stop_is_stopped_again_where_its_results_end(tmp_path):
    """The stop was lost after the trial had checkpointed past it (the workers train on while Tune stops
    a trial): resumed there, it reports a later step, at the stop's rung or past the next, and is
    stopped again as the uninterrupted sweep stopped it; the stop is recorded at that step too, where
    the trial's results now end (the sweep's report counts a trial early-stopped only there; without it
    the trial stayed unfinished on every rerun). The rungs' records, and so their cutoffs, are unchanged."""
    scheduler = ours(tmp_path, max_t=8, grace_period=2, reduction_factor=2)
    good, bad = trial(0), trial(1)
    scheduler.on_trial_result(None, good, {"step": 2, METRIC: 1.0})
    assert scheduler.on_trial_result(None, bad, {"step": 2, METRIC: 5.0}) == "STOP"
    summary = scheduler.summary()
    for step in (3, 4):  # rung 2's step range, then past rung 4, which it never reached
        restored = cloudpickle.loads(cloudpickle.dumps(ours(tmp_path, max_t=8, grace_period=2, reduction_factor=2)))
        assert restored.on_trial_result(None, bad, {"step": step, METRIC: 0.5}) == "STOP"
        assert restored.summary() == summary
    rows = [r for r in read_records(tmp_path / "asha.jsonl") if r["config"] == bad.config]
    assert [(r["rung"], r["step"], r["stopped"]) for r in rows] == [(2, 2, True), (2, 3, True), (2, 4, True)]


def test_a_trial_stopped_again_past_a_higher_rung_is_not_recorded_there_when_tune_completes_it(tmp_path):
    """Tune follows a STOP with on_trial_complete and the same result. For a lost stop re-applied past
    a higher rung, that completion recorded the stopped trial's objective at the higher rung, as if it
    had been let through, and a later trial there was compared with it: the resumed sweep no longer
    decided as the uninterrupted one."""
    kw = {"max_t": 16, "grace_period": 2, "reduction_factor": 2}
    scheduler = ours(tmp_path, **kw)
    good, bad, late = trial(0), trial(1), trial(2)
    scheduler.on_trial_result(None, good, {"step": 2, METRIC: 1.0})
    assert scheduler.on_trial_result(None, bad, {"step": 2, METRIC: 5.0}) == "STOP"
    scheduler.on_trial_complete(None, bad, {"step": 2, METRIC: 5.0})
    restored = cloudpickle.loads(cloudpickle.dumps(ours(tmp_path, **kw)))
    resumed_past_rung_4 = {"step": 5, METRIC: 0.1}  # its workers trained on while the stop was lost
    assert restored.on_trial_result(None, bad, resumed_past_rung_4) == "STOP"
    restored.on_trial_complete(None, bad, resumed_past_rung_4)
    assert restored.summary()[1] == {"step": 4, "trials": 0, "cutoff": None, "stopped": []}
    assert restored.on_trial_result(None, late, {"step": 2, METRIC: 1.0}) == "CONTINUE"
    assert restored.on_trial_result(None, late, {"step": 4, METRIC: 0.5}) == "CONTINUE"  # first at rung 4
    rows = [(r["rung"], r["step"], r["stopped"]) for r in read_records(tmp_path / "asha.jsonl")
            if r["config"] == bad.config]
    assert rows == [(2, 2, True), (2, 5, True)]


def test_a_diverged_trial_is_stopped_and_does_not_move_the_cutoff(tmp_path):
    scheduler = ours(tmp_path, max_t=8, grace_period=2, reduction_factor=2)
    assert scheduler.on_trial_result(None, trial(0), {"step": 2, METRIC: math.nan}) == "STOP"  # first at its rung
    assert scheduler.cutoff(2) is None
    assert scheduler.on_trial_result(None, trial(1), {"step": 2, METRIC: 3.0}) == "CONTINUE"
    assert scheduler.on_trial_result(None, trial(2), {"step": 2, METRIC: math.inf}) == "STOP"
    assert scheduler.cutoff(2) == 3.0
    assert scheduler.on_trial_result(None, trial(3), {"step": 2, METRIC: 2.0}) == "CONTINUE"
    assert scheduler.cutoff(2) == pytest.approx(2.5)  # the median of the finite ones at rf=2


def test_max_mode_keeps_the_higher_half(tmp_path):
    scheduler = ResumableASHA(tmp_path / "a.jsonl", key_params=("r", "w"), time_attr="step", max_t=8,
                              grace_period=2, reduction_factor=2)
    assert scheduler.set_search_properties("acc", "max")  # what tune.TuneConfig(metric, mode) does
    assert scheduler.on_trial_result(None, trial(0), {"step": 2, "acc": 0.5}) == "CONTINUE"
    assert scheduler.on_trial_result(None, trial(1), {"step": 2, "acc": 0.9}) == "CONTINUE"
    assert scheduler.on_trial_result(None, trial(2), {"step": 2, "acc": 0.6}) == "STOP"
    assert not scheduler.set_search_properties("loss", None)  # a second, different metric is refused


def test_reports_without_the_metric_or_below_the_first_rung_continue_unrecorded(tmp_path):
    scheduler = ours(tmp_path, max_t=8, grace_period=2, reduction_factor=2)
    assert scheduler.on_trial_result(None, trial(0), {"step": 1, METRIC: 1.0}) == "CONTINUE"
    assert scheduler.on_trial_result(None, trial(0), {"step": 2, "train/loss": 1.0}) == "CONTINUE"
    assert read_records(tmp_path / "asha.jsonl") == []


def test_a_record_cut_off_by_a_killed_driver_is_dropped_and_the_file_stays_readable(tmp_path):
    scheduler = ours(tmp_path, max_t=8, grace_period=2, reduction_factor=2)
    scheduler.on_trial_result(None, trial(0), {"step": 2, METRIC: 1.0})
    records = tmp_path / "asha.jsonl"
    records.write_text(records.read_text() + '{"config": {"r": 2, "w": 0.1}, "ru')  # killed mid-write
    restored = cloudpickle.loads(cloudpickle.dumps(ours(tmp_path, max_t=8, grace_period=2, reduction_factor=2)))
    assert restored.on_trial_result(None, trial(1), {"step": 2, METRIC: 2.0}) == "STOP"  # compared with trial 0
    assert [r["config"] for r in read_records(records)] == [trial(0).config, trial(1).config]
    records.write_text('{"config": {}}\nnot json\n{"config": {}}\n')
    with pytest.raises(ValueError, match=r"asha.jsonl, line 2: not a JSON record"):
        read_records(records)


def test_mending_a_cut_off_record_never_loses_the_whole_ones_before_it(tmp_path):
    """The mend rewrote the whole file; a rewrite that failed part-way (here the file-size limit, as a
    full disk or a second kill would) left only the records written before that point."""
    records = tmp_path / "asha.jsonl"
    scheduler = ours(tmp_path, max_t=8, grace_period=2, reduction_factor=2)
    for i in range(40):
        scheduler.on_trial_result(None, trial(i), {"step": 2, METRIC: float(i % 3)})
    whole = read_records(records)
    records.write_text(records.read_text() + '{"config": {"r": 2, "w": 9.9}, "ru')  # killed mid-write
    script = textwrap.dedent(f"""
        import resource
        from ray_jobs.asha import ResumableASHA
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))  # far below the file's size
        ResumableASHA({str(records)!r}, key_params=("r", "w"), time_attr="step", metric="m", mode="min",
                      max_t=8, grace_period=2, reduction_factor=2).records()
    """)
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert read_records(records) == whole and records.read_text().endswith("}\n")
    # a last record cut off just before its newline is whole: kept, and the next one starts a line of its own
    records.write_text(records.read_text()[:-1])
    restored = ours(tmp_path, max_t=8, grace_period=2, reduction_factor=2)
    restored.on_trial_result(None, trial(40), {"step": 4, METRIC: 1.0})
    assert read_records(records)[:-1] == whole and read_records(records)[-1]["config"] == trial(40).config


def test_a_trial_config_without_the_key_params_is_named(tmp_path):
    scheduler = ours(tmp_path, max_t=8, grace_period=2, reduction_factor=2)
    with pytest.raises(KeyError, match=r"lacks \['w'\]"):
        scheduler.on_trial_result(None, SimpleNamespace(config={"r": 1}), {"step": 2, METRIC: 1.0})


def test_records_read_back_as_written(tmp_path):
    scheduler = ours(tmp_path, max_t=8, grace_period=2, reduction_factor=2)
    scheduler.on_trial_result(None, trial(3), {"step": 4, METRIC: 1.5})
    (row,) = [json.loads(line) for line in (tmp_path / "asha.jsonl").read_text().splitlines()]
    assert row == {"config": {"r": 2, "w": 0.3}, "rung": 4, "step": 4, "objective": 1.5, "stopped": False}
    assert "step 4: 1 trials" in scheduler.debug_string()


def test_the_summary_lists_each_rungs_trials_cutoff_and_stops(tmp_path):
    scheduler = ours(tmp_path, max_t=8, grace_period=2, reduction_factor=2)
    for i, value in enumerate((1.0, 3.0, 2.0)):
        scheduler.on_trial_result(None, trial(i), {"step": 2, METRIC: value})
    scheduler.on_trial_result(None, trial(0), {"step": 4, METRIC: 0.5})
    read_back = cloudpickle.loads(cloudpickle.dumps(ours(tmp_path, max_t=8, grace_period=2, reduction_factor=2)))
    assert read_back.summary() == [
        {"step": 2, "trials": 3, "cutoff": 2.0, "stopped": [trial(1).config]},  # 3.0 was worse than 1.0
        {"step": 4, "trials": 1, "cutoff": 0.5, "stopped": []},
        {"step": 8, "trials": 0, "cutoff": None, "stopped": []},
    ]


def test_a_sweep_restored_from_a_moved_work_dir_keeps_its_records_with_it(tmp_path):
    """Tune pickles the scheduler, its records file's absolute path with it, when the sweep starts. Restored
    from a work directory moved since (a renamed project folder, storage mounted elsewhere), it read no
    records and appended to the old path: FileNotFoundError, and the sweep ended in a TuneError on every
    rerun. The records now follow the experiment folder (real Tuner and Tuner.restore, the sweep's own
    scheduler from ray_jobs/tune.py; plain trainables instead of training runs)."""
    from ray import tune
    from test_faults import ensure_ray

    from meld.config import TuneConfig
    from ray_jobs.tune import ASHA_RECORDS, asha

    ensure_ray()
    tc = TuneConfig.from_dict({"slowness_weights": [0.0, 0.5], "reduction_factors": [1], "max_steps": 16,
                               "grace_period": 8, "asha_reduction": 2}, "tune")
    metric, interrupted = tc.metric, tmp_path / "interrupted"

    def trainable(config):  # 0.0 is the better trial; 0.5 errs before rung 8 once (a trial killed with its driver)
        worse = config["slowness_weight"] > 0
        if worse and not interrupted.exists():
            tune.report({"step": 4, metric: 9.0})
            interrupted.write_text("x")
            raise RuntimeError("interrupted")
        for step in (4, 8, 12, 16):
            tune.report({"step": step, metric: (5.0 if worse else 1.0) + 1.0 / step})

    old, new = tmp_path / "old" / "work", tmp_path / "new" / "work"
    name = "tune-meld"  # run_sweep's Tune experiment: <work dir>/ray_tune/tune-<system>
    first = tune.Tuner(
        trainable,
        param_space={"slowness_weight": tune.grid_search([0.0, 0.5]), "reduction_factor": 1},
        tune_config=tune.TuneConfig(metric=metric, mode="min", scheduler=asha(tc, old), max_concurrent_trials=1),
        run_config=tune.RunConfig(name=name, storage_path=str(old / "ray_tune"), verbose=0),
    ).fit()
    assert sorted(r.error is None for r in first) == [False, True]  # the interrupted sweep, as run_sweep resumes it
    assert {(r["config"]["slowness_weight"], r["rung"]) for r in read_records(old / ASHA_RECORDS)} == {(0.0, 8),
                                                                                                      (0.0, 16)}
    new.parent.mkdir()
    old.rename(new)
    resumed = tune.Tuner.restore(str(new / "ray_tune" / name), trainable, resume_errored=True).fit()
    assert [r.error for r in resumed] == [None, None]
    rows = {(r["config"]["slowness_weight"], r["rung"]): r["stopped"] for r in read_records(new / ASHA_RECORDS)}
    # the resumed trial was compared with the record written before the move, and stopped at rung 8
    assert rows == {(0.0, 8): False, (0.0, 16): False, (0.5, 8): True}
    assert not old.exists()  # nothing written to the old place
