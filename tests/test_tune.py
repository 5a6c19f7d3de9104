"""The tune stage's pieces: its params section, the trials' overrides, the choice of the best trial, the
plot, and an interrupted sweep resuming (a real Ray Tune run, stopped with SIGINT and run again).

The sweep's report, plot and nested MLflow runs are checked in tests/test_pipeline_e2e.py, where
the DAG's tune stage runs it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_faults import (
    TINY_PARAMS,
    _wait_for_train_actors_of_other_jobs_to_end,
    ensure_ray,
    make_tiny_data,
    tiny_config,
)

from meld.config import ConfigError, TuneConfig
from ray_jobs.tune import best_trial, plot_trials, trial_overrides


def _row(r: int, w: float, objective: float | None, status: str = "completed", steps: int = 4) -> dict:
    return {
        "trial": f"t-r{r}-sw{w}",
        "config": {"slowness_weight": w, "reduction_factor": r},
        "objective": objective,
        "steps": steps,
        "status": status,
        "history": [],
        "mlflow_run_id": None,
    }


def test_tune_section_rejects_unknown_keys_and_bad_values():
    assert TuneConfig.from_dict(TINY_PARAMS["tune"], "tune").reduction_factors == (1, 2)
    with pytest.raises(ConfigError, match="unknown key"):
        TuneConfig.from_dict({"slowness_weight": [0.1]}, "tune")
    with pytest.raises(ConfigError, match="scheduler"):
        TuneConfig.from_dict({"scheduler": "pbt"}, "tune")
    with pytest.raises(ConfigError, match="MELD system"):
        TuneConfig.from_dict({"system": "melle"}, "tune")
    with pytest.raises(ConfigError, match="metric"):
        TuneConfig.from_dict({"metric": "loss/ce"}, "tune")  # CE of different codebooks is not comparable


def test_trial_overrides_set_the_knobs_and_keep_the_other_loss_weights(tmp_path_factory, tmp_path):
    data = make_tiny_data(tmp_path_factory)
    tc = TuneConfig.from_dict({**TINY_PARAMS["tune"], "max_steps": 6, "eval_every": 3}, "tune")
    over = trial_overrides(tc, reduction_factor=1, slowness_weight=0.5)
    from ray_jobs.train import build_config

    cfg = build_config(
        TINY_PARAMS,
        system="meld",
        features=data / "features",
        bpe=data / "bpe" / "bpe.model",
        codebook=data / "codebook",
        out=tmp_path,
        overrides=over,
    )
    assert cfg["reduction_factor"] == 1 and cfg["model_kwargs"]["frame_dim"] == 80
    assert cfg["train"]["loss_weights"] == {"ce": 1.0, "mse_pre": 1.0, "mse_post": 1.0, "slowness": 0.5}
    assert cfg["train"]["max_steps"] == 6 and cfg["train"]["checkpoint_every"] == 3
    assert cfg["codebook"].endswith("r1.npy") and cfg["eval_store"].endswith("dev")
    base = tiny_config(data, tmp_path)
    # a trial never resumes another configuration's checkpoints
    assert base["fingerprint"] != cfg["fingerprint"]


def test_best_trial_compares_full_budgets_only():
    trials = [
        _row(1, 0.0, 1.30),
        _row(2, 0.0, 1.10, "early_stopped", steps=2),
        _row(1, 0.5, 1.25),
        _row(2, 0.5, None, "error", steps=0),
    ]
    assert best_trial(trials)["trial"] == "t-r1-sw0.5"
    assert best_trial([_row(2, 0.0, 1.1, "early_stopped", 2)])["trial"] == "t-r2-sw0.0"
    assert best_trial([_row(2, 0.5, None, "error", 0)]) is None
    # a diverged trial's NaN is no score (min() would return it when it came first)
    assert best_trial([_row(1, 0.0, float("nan")), _row(2, 0.0, 1.3)])["trial"] == "t-r2-sw0.0"


def test_plot_has_one_line_per_frame_rate(tmp_path):
    import matplotlib.image

    trials = [
        _row(r, w, 1.0 + 0.1 * r + w, "completed" if w < 0.5 else "early_stopped")
        for r in (1, 2)
        for w in (0.0, 0.2, 0.5)
    ]
    path = tmp_path / "plots" / "tune.png"
    fig = plot_trials(trials, "dev/mse_post_greedy", path)
    assert matplotlib.image.imread(path).shape[0] > 100
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["r=1 (62.5 Hz)", "r=2 (31.2 Hz)"]
    lines = [line for line in ax.get_lines() if line.get_linestyle() == "-"]
    assert [list(line.get_xdata()) for line in lines] == [[0.0, 0.2, 0.5]] * 2
    assert [list(line.get_ydata()) for line in lines] == [
        [1.0 + 0.1 * r + w for w in (0.0, 0.2, 0.5)] for r in (1, 2)
    ]
    markers = [line for line in ax.get_lines() if line.get_marker() == "o"]
    hollow = sorted(m.get_xdata()[0] for m in markers if m.get_markerfacecolor() == "none")
    assert hollow == [0.5, 0.5]  # the early-stopped trials (w = 0.5) at both frame rates


def _sweep_cmd(tmp_path: Path, data: Path) -> list[str]:
    return [sys.executable, "-m", "pipeline.tune", "--params", str(tmp_path / "params.yaml"),
            "--features", str(data / "features"), "--bpe", str(data / "bpe" / "bpe.model"),
            "--codebook", str(data / "codebook"), "--out", str(tmp_path / "tune.json"),
            "--plot", str(tmp_path / "tune.png"), "--work-dir", str(tmp_path / "work"),
            "--project-root", str(tmp_path)]


def _wait_until_unchanged(read, quiet_s: float, deadline_s: float) -> None:
    end, last, since = time.time() + deadline_s, read(), time.time()
    while time.time() - since < quiet_s:
        assert time.time() < end, "the trials' checkpoint folders kept changing after the sweep was stopped"
        time.sleep(0.5)
        now = read()
        if now != last:
            last, since = now, time.time()


def _checkpoint_files(trial_dir: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted((trial_dir / "checkpoints").glob("step-*.pt"))}


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["ctrl-c", "kill"])
def test_an_interrupted_sweep_resumes_where_it_stopped(tmp_path_factory, tmp_path, stop):
    """Ctrl-C (SIGINT: Tune saves its state and returns) or SIGKILL of the driver's process group (a
    lost driver: only Tune's periodic state is left) while the second of two trials trains. No report
    is written; the same command again keeps the finished trial (not retrained) and continues the
    other from its checkpoint, under the same MLflow runs."""
    from mlflow.tracking import MlflowClient

    from ray_jobs.tune import trial_name

    data = make_tiny_data(tmp_path_factory)
    ensure_ray()
    import ray

    max_steps = 16  # the second trial's remaining steps leave the interrupt time to land mid-trial
    # ASHA's rungs at steps 8 and 16: the finished trial's records there are written before the interrupt
    # (step 2 of the other), and the resumed trial is judged against them at step 8
    tune = {**TINY_PARAMS["tune"], "scheduler": "asha", "grace_period": 8, "asha_reduction": 2,
            "max_steps": max_steps, "eval_every": 2, "max_concurrent_trials": 1, "max_failures": 0}
    train = {**TINY_PARAMS["train"], "hold_steps": max_steps - 3}  # a schedule as long as the trials (1 + 13 + 2)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({**TINY_PARAMS, "tune": tune, "train": train}))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "PYTHONUNBUFFERED": "1",
           "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "MLFLOW_TRACKING_URI": uri}
    trials = tmp_path / "work" / "trials"
    names = [trial_name("meld", r, 0.2) for r in (1, 2)]

    def second_trial_checkpointed() -> bool:  # one trial at max_steps, the other with a checkpoint below it
        done = [n for n in names if f"step-{max_steps}.pt" in _checkpoint_files(trials / n)]
        started = [n for n in names if n not in done and _checkpoint_files(trials / n)]
        return bool(done and started)

    log1 = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(_sweep_cmd(tmp_path, data), cwd=tmp_path, env=env, stdout=log1,
                             stderr=subprocess.STDOUT, start_new_session=True)
    try:
        end = time.time() + 300
        while not second_trial_checkpointed():
            assert first.poll() is None, "the sweep ended before it was interrupted"
            assert time.time() < end, "timed out waiting for the second trial's first checkpoint"
            time.sleep(0.2)
        if stop == "ctrl-c":
            first.send_signal(signal.SIGINT)
        else:
            os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=180)
    finally:
        if first.poll() is None:
            first.kill()
        log1.close()
    log = (tmp_path / "first.log").read_text()
    if stop == "ctrl-c":
        assert first.returncode == 130, log[-4000:]
        assert "run the same command again to resume it" in log
    assert first.returncode != 0 and not (tmp_path / "tune.json").exists()
    _wait_for_train_actors_of_other_jobs_to_end(deadline_s=120)
    # the state API can call a killed job's workers dead a moment before their processes stop writing
    _wait_until_unchanged(lambda: [_checkpoint_files(trials / n) for n in names], quiet_s=5.0, deadline_s=120)
    finished = next(n for n in names if f"step-{max_steps}.pt" in _checkpoint_files(trials / n))
    stopped = next(n for n in names if n != finished)
    kept_finished = _checkpoint_files(trials / finished)
    kept_stopped = max(int(f[5:-3]) for f in _checkpoint_files(trials / stopped))
    assert kept_stopped < max_steps
    parent = json.loads((tmp_path / "work" / "sweep.json").read_text())["parent_run_id"]
    run_ids = {n: (trials / n / "checkpoints" / "mlflow_run_id").read_text().strip() for n in names}

    second = subprocess.run(_sweep_cmd(tmp_path, data), cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    log = second.stdout + second.stderr
    assert second.returncode == 0, log[-4000:]
    assert "resuming the interrupted sweep" in log
    report = json.loads((tmp_path / "tune.json").read_text())
    assert report["mlflow_parent_run_id"] == parent
    assert sorted(t["trial"] for t in report["trials"]) == sorted(names)
    from ray_jobs.asha import read_records

    rows = {(trial_name("meld", r["config"]["reduction_factor"], r["config"]["slowness_weight"]), r["rung"]): r
            for r in read_records(tmp_path / "work" / "asha.jsonl")}
    assert sorted(rows) == sorted([(finished, 8), (finished, 16), (stopped, 8)] + [(stopped, 16)] * (
        not rows[(stopped, 8)]["stopped"])), rows
    # the resumed trial was compared with the finished trial's result from before the interruption
    assert rows[(stopped, 8)]["stopped"] == (rows[(stopped, 8)]["objective"] > rows[(finished, 8)]["objective"])
    rung8 = report["scheduler"]["rungs"][0]  # the report shows the rung the decision was made at
    assert rung8["step"] == 8 and rung8["trials"] == 2 and bool(rung8["stopped"]) == rows[(stopped, 8)]["stopped"]
    assert rows[(stopped, 8)]["step"] == 8  # judged at the rung's own step, whatever step it resumed from
    status = {t["trial"]: (t["status"], t["steps"]) for t in report["trials"]}
    assert status[finished] == ("completed", max_steps)
    # every evaluation once, though the resumed trial reported its checkpoint's step again and a killed
    # driver loses the results Tune received since it last saved them
    for t in report["trials"]:
        assert [s for s, _ in t["history"]] == list(range(2, t["steps"] + 1, 2)), t
    assert status[stopped] == (("early_stopped", 8) if rows[(stopped, 8)]["stopped"] else ("completed", max_steps))
    assert {t["trial"]: t["mlflow_run_id"] for t in report["trials"]} == run_ids  # the same runs, continued
    assert _checkpoint_files(trials / finished) == kept_finished  # the finished trial was not trained again
    client = MlflowClient(uri)
    assert "train/resume_step" not in client.get_run(run_ids[finished]).data.metrics
    resumed = client.get_metric_history(run_ids[stopped], "train/resume_step")
    assert [int(m.value) for m in resumed] == [kept_stopped], resumed  # from its checkpoint, not from step 0
    assert client.get_run(parent).info.status == "FINISHED"
    first_attempt, second_attempt = report["attempts"]
    assert first_attempt["seconds"] > 0 and second_attempt["seconds"] > 0
    assert first_attempt.get("estimated", False) == (stop == "kill")  # a killed driver could not say when it ended
    assert report["wall_seconds"] == pytest.approx(first_attempt["seconds"] + second_attempt["seconds"], abs=0.1)
    children = client.search_runs([client.get_run(parent).info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(r.info.run_id for r in children) == sorted(run_ids.values())


def test_no_concurrency_limit_runs_as_many_trials_as_the_cluster_holds():
    """tune.max_concurrent_trials 0 ("no limit"): Tune reserves only a trial's driver, so on a 2-CPU
    machine it started two drivers and no Train worker could ever start. The sweep runs as many trials
    as the cluster holds, workers and driver each, and at least one; a limit that is given is kept."""
    from ray_jobs.tune import trial_concurrency, trial_resources

    def tune(**kw) -> TuneConfig:
        return TuneConfig.from_dict({**TINY_PARAMS["tune"], "max_concurrent_trials": 0, **kw}, "tune")

    for tc, cluster in [(tune(), {"CPU": 2.0}), (tune(), {"CPU": 16.0}), (tune(num_workers_per_trial=2), {"CPU": 7.0}),
                        (tune(num_workers_per_trial=2, gpus_per_worker=1.0), {"CPU": 64.0, "GPU": 5.0}),
                        (tune(gpus_per_worker=0.3), {"CPU": 64.0, "GPU": 1.5})]:
        n, need = trial_concurrency(tc, cluster), trial_resources(tc)
        assert need["CPU"] == tc.num_workers_per_trial * tc.cpus_per_worker + 1  # the workers and the driver
        assert all(n * v <= cluster[k] + 1e-9 for k, v in need.items()), (tc, cluster, n)  # all of them start
        assert any((n + 1) * v > cluster[k] for k, v in need.items()), (tc, cluster, n)  # one more would not
    assert trial_concurrency(tune(num_workers_per_trial=4), {"CPU": 2.0}) == 1  # a local cluster is made that big
    assert trial_concurrency(tune(max_concurrent_trials=3), {"CPU": 2.0}) == 3


def test_a_given_limit_the_cluster_cannot_hold_is_warned_about_naming_both():
    """A given tune.max_concurrent_trials is kept (a cluster may grow), but one above what a joined
    cluster holds can start a driver on every CPU and leave none for any worker: the sweep says so."""
    from ray_jobs.tune import concurrency_warning, trial_resources, trials_that_fit

    def tune(**kw) -> TuneConfig:
        return TuneConfig.from_dict({**TINY_PARAMS["tune"], **kw}, "tune")

    tc = tune(max_concurrent_trials=2)
    need = trial_resources(tc)["CPU"]
    roomy = {"CPU": 2 * need}
    assert trials_that_fit(tc, roomy) == 2 and concurrency_warning(tc, roomy) is None
    assert concurrency_warning(tune(max_concurrent_trials=0), {"CPU": 1.0}) is None  # sized to fit already
    tight = {"CPU": 2 * need - 1}
    said = concurrency_warning(tc, tight)
    assert said.startswith(f"tune.max_concurrent_trials 2: the cluster's {tight} hold 1 trial(s)")
    assert "set it to 0" in said


def test_a_trial_budget_the_data_does_not_fit_is_refused_before_ray_starts(tmp_path_factory, tmp_path):
    """A trial's frame budget (tune.frames_per_batch / r) below its longest utterance is refused, naming the
    trial, before Ray starts (ray_jobs/train.py's check_frame_budget; it failed in every trial's workers)."""
    from ray_jobs.tune import sweep_fingerprint

    data = make_tiny_data(tmp_path_factory)
    params = {**TINY_PARAMS, "tune": {**TINY_PARAMS["tune"], "frames_per_batch": 100}}
    with pytest.raises(ConfigError, match=r"tune trial tune-meld-r1-sw0.2: .* longer than the frame budget \(100\)"):
        sweep_fingerprint(params, TuneConfig.from_dict(params["tune"], "tune"), features=str(data / "features"),
                          bpe=str(data / "bpe" / "bpe.model"), codebook=str(data / "codebook"), work_dir=tmp_path,
                          project_root=str(tmp_path))


def test_sweep_time_counts_every_attempt_and_estimates_a_killed_one(tmp_path):
    """A resumed sweep's wall time is the sum of its attempts; an attempt that died without closing
    itself ends at the last file it wrote."""
    from ray_jobs.tune import close_attempt, record_attempt

    state_file = tmp_path / "sweep.json"
    state_file.write_text(json.dumps({"fingerprint": "f", "parent_run_id": "r"}))
    record_attempt(state_file, 1000.0)
    checkpoint = tmp_path / "trials" / "t" / "step-2.pt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"x")
    os.utime(checkpoint, (1040.0, 1040.0))
    os.utime(state_file, (1000.0, 1000.0))
    attempts = record_attempt(state_file, 2000.0)  # the first attempt was killed: nobody closed it
    assert attempts[0] == {"started": 1000.0, "seconds": 40.0, "estimated": True}
    assert attempts[1] == {"started": 2000.0}
    attempts = close_attempt(state_file, 2030.5)
    assert [a["seconds"] for a in attempts] == [40.0, 30.5]
    assert json.loads(state_file.read_text())["attempts"] == attempts
    assert json.loads(state_file.read_text())["fingerprint"] == "f"  # the rest of the state is kept


def test_other_inputs_make_another_sweep(tmp_path_factory, tmp_path):
    """The fingerprint that decides between resuming and starting over follows the sweep's inputs."""
    from ray_jobs.tune import sweep_fingerprint

    data = make_tiny_data(tmp_path_factory)

    def fp(params: dict) -> str:
        tc = TuneConfig.from_dict(params["tune"], "tune")
        return sweep_fingerprint(params, tc, features=str(data / "features"), bpe=str(data / "bpe" / "bpe.model"),
                                 codebook=str(data / "codebook"), work_dir=tmp_path, project_root=str(tmp_path))

    base = fp(TINY_PARAMS)
    assert fp(TINY_PARAMS) == base
    assert fp({**TINY_PARAMS, "tune": {**TINY_PARAMS["tune"], "slowness_weights": [0.2, 0.5]}}) != base
    assert fp({**TINY_PARAMS, "tune": {**TINY_PARAMS["tune"], "max_steps": 3}}) != base
    assert fp({**TINY_PARAMS, "train": {**TINY_PARAMS["train"], "lr": 0.002}}) != base  # every trial trains anew
    assert fp({**TINY_PARAMS, "model": {**TINY_PARAMS["model"], "d_model": 16}}) != base
    with pytest.raises(FileNotFoundError, match="dev split"):
        sweep_fingerprint(TINY_PARAMS, TuneConfig.from_dict(TINY_PARAMS["tune"], "tune"), features=str(tmp_path),
                          bpe=str(data / "bpe" / "bpe.model"), codebook=str(data / "codebook"), work_dir=tmp_path,
                          project_root=str(tmp_path))


def test_asha_stops_are_recorded_and_tell_early_stopped_from_unfinished(tmp_path):
    """Tune ends a trial ASHA stopped and a trial an interrupt stopped alike; the scheduler's own record
    (with the step) is what tells them apart, and only a report at that step counts as the stop."""
    from types import SimpleNamespace

    import pandas as pd

    from ray_jobs.asha import ResumableASHA
    from ray_jobs.tune import ASHA_RECORDS, collect_trials

    tc = TuneConfig.from_dict({**TINY_PARAMS["tune"], "max_steps": 4, "slowness_weights": [0.0, 0.5, 0.9, 1.5]},
                              "tune")
    asha = ResumableASHA(tmp_path / ASHA_RECORDS, key_params=("reduction_factor", "slowness_weight"),
                         time_attr="step", metric=tc.metric, mode="min", max_t=tc.max_steps, grace_period=1,
                         reduction_factor=2)

    def trial(w: float):
        return SimpleNamespace(trial_id=f"t{w}", config={"reduction_factor": 1, "slowness_weight": w})

    good, bad = trial(0.0), trial(0.5)
    assert asha.on_trial_result(None, good, {"step": 1, tc.metric: 1.0}) == "CONTINUE"
    assert asha.on_trial_result(None, bad, {"step": 1, tc.metric: 5.0}) == "STOP"  # the worse half at rung 1

    def result(w: float, steps: list[int], error=None):
        frame = pd.DataFrame({"step": steps, tc.metric: [1.0] * len(steps)})
        return SimpleNamespace(config={"reduction_factor": 1, "slowness_weight": w}, error=error,
                               metrics_dataframe=frame)

    grid = [result(0.0, [1, 2, 3, 4]), result(0.5, [1]), result(0.9, [1, 2]), result(1.5, [1], RuntimeError("boom"))]
    status = {t["config"]["slowness_weight"]: t["status"] for t in collect_trials(grid, tc, tmp_path)}
    assert status == {0.0: "completed", 0.5: "early_stopped", 0.9: "unfinished", 1.5: "error"}
    # a stop that Tune's restored state lost: the trial trained on past it, then was interrupted
    grid[1] = result(0.5, [1, 2, 3])
    assert collect_trials(grid, tc, tmp_path)[1]["status"] == "unfinished"
    # resumed from its step-3 checkpoint, it reports step 3 again and is stopped again: early-stopped there
    assert asha.on_trial_result(None, bad, {"step": 3, tc.metric: 5.0}) == "STOP"
    assert collect_trials(grid, tc, tmp_path)[1]["status"] == "early_stopped"


def test_a_trial_whose_objective_turns_nan_ends_where_it_reported_it(tmp_path):
    """ASHA stops a trial whose objective is NaN and records the stop at that step; the history leaves NaN
    out, so the trial read as ending earlier, "unfinished", and the sweep ended in SweepInterrupted on
    every run. A NaN at the last step read the same instead of completed. Both now end at the step
    they reported, with no objective (so never the best)."""
    from types import SimpleNamespace

    import pandas as pd

    from ray_jobs.asha import ResumableASHA
    from ray_jobs.tune import ASHA_RECORDS, best_trial, collect_trials

    tc = TuneConfig.from_dict({**TINY_PARAMS["tune"], "max_steps": 4, "slowness_weights": [0.0, 0.5, 0.9]}, "tune")
    asha = ResumableASHA(tmp_path / ASHA_RECORDS, key_params=("reduction_factor", "slowness_weight"),
                         time_attr="step", metric=tc.metric, mode="min", max_t=tc.max_steps, grace_period=2,
                         reduction_factor=2)
    trial = SimpleNamespace(trial_id="t0.5", config={"reduction_factor": 1, "slowness_weight": 0.5})
    assert asha.on_trial_result(None, trial, {"step": 2, tc.metric: float("nan")}) == "STOP"

    def result(w: float, steps: list[int], values: list[float]):
        frame = pd.DataFrame({"step": steps, tc.metric: values})
        return SimpleNamespace(config={"reduction_factor": 1, "slowness_weight": w}, error=None,
                               metrics_dataframe=frame)

    nan = float("nan")
    grid = [result(0.0, [2, 4], [1.0, 0.9]), result(0.5, [2], [nan]), result(0.9, [2, 4], [0.5, nan])]
    trials = collect_trials(grid, tc, tmp_path)
    assert [(t["status"], t["steps"], t["objective"]) for t in trials] == [
        ("completed", 4, 0.9), ("early_stopped", 2, None), ("completed", 4, None)]
    assert best_trial(trials)["config"]["slowness_weight"] == 0.0  # 0.9's earlier 0.5 does not make it best


def test_an_stt_only_system_cannot_be_swept(tmp_path_factory, tmp_path):
    from ray_jobs.tune import sweep_fingerprint

    data = make_tiny_data(tmp_path_factory)
    params = {**TINY_PARAMS, "meld": {"model": {}, "train": {"task": "stt"}}}
    with pytest.raises(ValueError, match="tune.system meld trains STT only"):
        sweep_fingerprint(params, TuneConfig.from_dict(params["tune"], "tune"), features=str(data / "features"),
                          bpe=str(data / "bpe" / "bpe.model"), codebook=str(data / "codebook"), work_dir=tmp_path,
                          project_root=str(tmp_path))


def test_a_non_finite_objective_is_never_written_into_the_report(tmp_path):
    """An infinite objective (an overflowed dev error) was kept where NaN was left out: the trial's objective
    and history were `Infinity` in tune.json, which is not JSON. And the steps that held NaN in Tune's results
    are exactly the ones filled in from the trial's MLflow history, which logged the same NaN there. Both are
    no score: left out of the history, unknown (null) where the trial ends on one."""
    from types import SimpleNamespace

    import pandas as pd
    from mlflow.tracking import MlflowClient

    from ray_jobs.tune import collect_trials

    tc = TuneConfig.from_dict({**TINY_PARAMS["tune"], "max_steps": 4, "eval_every": 1,
                               "slowness_weights": [0.0, 0.5], "reduction_factors": [1]}, "tune")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    nan, inf = float("nan"), float("inf")
    # the trial that recovered from a NaN at step 2 logged it to MLflow, as rank 0 does before each checkpoint
    run_id = client.create_run(client.create_experiment("tune")).info.run_id
    for step, value in [(1, 1.0), (2, nan), (3, 0.8), (4, 0.7)]:
        client.log_metric(run_id, tc.metric, value, step=step)
    id_file = tmp_path / "trials" / "tune-meld-r1-sw0.5" / "checkpoints" / "mlflow_run_id"
    id_file.parent.mkdir(parents=True)
    id_file.write_text(run_id)

    def result(w: float, steps: list[int], values: list[float]):
        return SimpleNamespace(config={"reduction_factor": 1, "slowness_weight": w}, error=None,
                               metrics_dataframe=pd.DataFrame({"step": steps, tc.metric: values}))

    grid = [result(0.0, [1, 2, 3, 4], [1.0, 0.9, 0.8, inf]), result(0.5, [1, 2, 3, 4], [1.0, nan, 0.8, 0.7])]
    trials = collect_trials(grid, tc, tmp_path, client)
    text = json.dumps(trials)
    json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in the report: not JSON"))
    by_weight = {t["config"]["slowness_weight"]: t for t in trials}
    assert (by_weight[0.0]["status"], by_weight[0.0]["steps"], by_weight[0.0]["objective"]) == ("completed", 4, None)
    assert [s for s, _ in by_weight[0.0]["history"]] == [1, 2, 3]
    assert [s for s, _ in by_weight[0.5]["history"]] == [1, 3, 4] and by_weight[0.5]["objective"] == 0.7
    assert best_trial(trials)["config"]["slowness_weight"] == 0.5  # the overflowed trial is never the best


def test_a_work_dir_holding_other_files_is_refused_and_kept(tmp_path):
    """A sweep that starts over deletes its work directory: given `--work-dir ray_results` (which holds the
    training runs' Ray state) or the project root, it deleted them. Such a folder is refused before Ray starts,
    and nothing in it is touched; a sweep's own folder, or a new one, is accepted."""
    from ray_jobs.tune import check_work_dir, run_sweep

    shared = tmp_path / "ray_results"
    (shared / "train-meld").mkdir(parents=True)
    (shared / "train-meld" / "checkpoint.pt").write_bytes(b"weights")
    (shared / "tune").mkdir()
    with pytest.raises(ConfigError, match=r"--work-dir .*ray_results holds train-meld, tune, which no sweep wrote"):
        run_sweep(TINY_PARAMS, features=str(tmp_path / "features"), bpe=str(tmp_path / "bpe.model"),
                  codebook=str(tmp_path / "codebook"), out=tmp_path / "tune.json", plot=tmp_path / "tune.png",
                  work_dir=shared, project_root=str(tmp_path))
    assert (shared / "train-meld" / "checkpoint.pt").read_bytes() == b"weights"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        check_work_dir(tmp_path / "file")
    sweep = shared / "tune"
    for name in ("ray_tune", "ray_train", "trials"):
        (sweep / name).mkdir()
    for name in ("sweep.json", "asha.jsonl", ".meld-shared-storage-check-0123"):
        (sweep / name).write_text("{}")
    check_work_dir(sweep)  # what a sweep writes (and a storage probe's marker a kill left behind)
    check_work_dir(tmp_path / "new")


def test_a_trial_no_node_can_hold_is_refused_before_the_work_dir_is_touched(tmp_path_factory, tmp_path, monkeypatch):
    """tune.gpus_per_worker on a cluster with no GPU: Tune kept the trial pending for ever. Refused in one
    ConfigError naming the settings and what the cluster has, before an earlier sweep's state is cleared."""
    from ray_jobs.tune import check_a_trial_fits, run_sweep

    ensure_ray()  # a fixed 2-CPU cluster, no GPU
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data = make_tiny_data(tmp_path_factory)
    work = tmp_path / "work"
    (work / "trials").mkdir(parents=True)
    (work / "sweep.json").write_text(json.dumps({"fingerprint": "another sweep", "parent_run_id": "r"}))
    params = {**TINY_PARAMS, "tune": {**TINY_PARAMS["tune"], "gpus_per_worker": 1.0}}
    with pytest.raises(ConfigError, match=r"one tune trial needs \{'CPU': \d+(\.\d+)?, 'GPU': 1\.0\} .*"
                                          r"tune.gpus_per_worker 1\.0.* the Ray cluster has \{'CPU': .*'GPU': 0\.0\}: "
                                          r".*or set tune.gpus_per_worker: 0"):
        run_sweep(params, features=str(data / "features"), bpe=str(data / "bpe" / "bpe.model"),
                  codebook=str(data / "codebook"), out=tmp_path / "tune.json", plot=tmp_path / "tune.png",
                  work_dir=work, project_root=str(tmp_path))
    assert json.loads((work / "sweep.json").read_text())["fingerprint"] == "another sweep"
    tc = TuneConfig.from_dict({**TINY_PARAMS["tune"], "num_workers_per_trial": 2, "cpus_per_worker": 2}, "tune")
    with pytest.raises(ConfigError, match=r"needs \{'CPU': 5\} .* can grow to at most \{'CPU': 4\.0\}: lower "
                                          r"tune.num_workers_per_trial or tune.cpus_per_worker \(Ray Tune"):
        check_a_trial_fits(tc, {"CPU": 4.0}, can_grow=True)
    check_a_trial_fits(tc, {"CPU": 5.0}, can_grow=False)


@pytest.mark.parametrize("state", ["[1, 2]", '"sweep"', '{"fingerprint": "f"}', '{"fingerprint": "f", "parent_run_id": 3}'])
def test_a_sweep_state_that_is_not_a_sweeps_starts_the_sweep_over(tmp_path, caplog, state):
    """A sweep.json edited by hand, or written by something else, ended the sweep in an AttributeError or
    KeyError; it is now treated as no state (the sweep starts over), with a warning naming the file."""
    from ray_jobs.tune import _resumable_parent

    (tmp_path / "sweep.json").write_text(state)
    with caplog.at_level("WARNING", logger="meld.tune"):
        assert _resumable_parent(tmp_path, "f", tmp_path / "ray_tune", mlflow=None, experiment_name="e") is None
    assert f"{tmp_path / 'sweep.json'} is not a sweep's state" in caplog.text


@pytest.mark.slow
def test_a_diverging_trial_errs_alone_and_a_moved_sweep_resumes_with_new_run_settings(
        tmp_path_factory, tmp_path, monkeypatch, caplog):
    """A trial whose loss turns non-finite reports {"step", "nonfinite_step"} and no objective (ray_jobs/train.py);
    Tune's strict metric check raised on it in its controller, and the whole sweep ended in a TuneError, on every
    rerun. Now that trial errs with the reason, the other finishes and is the best. Run again from a moved work
    directory with other run-only settings (tune.max_failures, tune.max_concurrent_trials), the sweep resumes:
    the finished trial is kept, not retrained (they were in the fingerprint, and a change deleted it). A real
    sweep (run_sweep, Ray Tune, ASHA, Ray Train, MLflow)."""
    from ray_jobs.tune import run_sweep, trial_name

    data = make_tiny_data(tmp_path_factory)
    ensure_ray()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    # a slowness weight of 1e300 makes the first step's loss inf; r=2 alone keeps the sweep to two trials
    tune = {**TINY_PARAMS["tune"], "slowness_weights": [0.2, 1e300], "reduction_factors": [2], "max_steps": 2,
            "eval_every": 1, "grace_period": 1, "max_concurrent_trials": 1, "max_failures": 0}
    good, diverged = trial_name("meld", 2, 0.2), trial_name("meld", 2, 1e300)

    def sweep(work: Path, **run_only) -> dict:
        params = {**TINY_PARAMS, "tune": {**tune, **run_only}}
        return run_sweep(params, features=str(data / "features"), bpe=str(data / "bpe" / "bpe.model"),
                         codebook=str(data / "codebook"), out=tmp_path / "tune.json", plot=tmp_path / "tune.png",
                         work_dir=work, project_root=str(tmp_path))

    def check(report: dict) -> None:
        rows = {t["trial"]: t for t in report["trials"]}
        assert (rows[good]["status"], rows[good]["steps"]) == ("completed", 2)
        assert rows[diverged]["status"] == "error" and rows[diverged]["objective"] is None
        assert "NonFiniteLoss" in rows[diverged]["error"] and "non-finite" in rows[diverged]["error"]
        assert report["best"]["trial"] == good
        assert json.loads((tmp_path / "tune.json").read_text())["trials"] == report["trials"]

    work = tmp_path / "old" / "work"
    check(sweep(work))
    kept = _checkpoint_files(work / "trials" / good)
    assert kept
    moved = tmp_path / "new" / "work"
    moved.parent.mkdir()
    work.rename(moved)
    # max_concurrent_trials 0 runs as many trials as fit, one on the 2-CPU test cluster: had the change started
    # the sweep over, a limit above that would leave no CPU for any trial's worker, and the test would hang
    with caplog.at_level("INFO", logger="meld.tune"):
        check(sweep(moved, max_failures=1, max_concurrent_trials=0))
    assert "resuming the interrupted sweep" in caplog.text and "deleting" not in caplog.text
    assert _checkpoint_files(moved / "trials" / good) == kept  # the finished trial was not trained again
    assert "tune.max_failures 0 -> 1 since the sweep started" in caplog.text


def test_run_only_tune_keys_keep_the_sweep_and_a_change_that_restarts_it_is_named(tmp_path_factory, tmp_path,
                                                                                  caplog):
    """tune.max_concurrent_trials, max_failures, cpus_per_worker and gpus_per_worker say how trials run, not
    what they train; in the fingerprint, a change of one deleted every finished trial after an INFO line.
    They are left out; a change that does start the sweep over is a warning naming what changed."""
    from ray_jobs.tune import _resumable_parent, sweep_fingerprint

    data = make_tiny_data(tmp_path_factory)

    def fp(**tune) -> str:
        params = {**TINY_PARAMS, "tune": {**TINY_PARAMS["tune"], **tune}}
        return sweep_fingerprint(params, TuneConfig.from_dict(params["tune"], "tune"), features=str(data / "features"),
                                 bpe=str(data / "bpe" / "bpe.model"), codebook=str(data / "codebook"),
                                 work_dir=tmp_path, project_root=str(tmp_path))

    base = fp()
    for key, value in [("max_concurrent_trials", 3), ("max_failures", 5), ("cpus_per_worker", 2),
                       ("gpus_per_worker", 0.5)]:
        assert TINY_PARAMS["tune"].get(key) != value
        if key == "gpus_per_worker":  # CPU -> GPU trains otherwise: train.use_gpu in every trial's fingerprint
            assert fp(gpus_per_worker=0.5) != base and fp(gpus_per_worker=0.5) == fp(gpus_per_worker=1.0)
        else:
            assert fp(**{key: value}) == base, key
    assert fp(max_steps=3) != base

    from ray_jobs.tune import sweep_inputs

    def inputs(**tune) -> dict:
        params = {**TINY_PARAMS, "tune": {**TINY_PARAMS["tune"], **tune}}
        return sweep_inputs(params, TuneConfig.from_dict(params["tune"], "tune"), features=str(data / "features"),
                            bpe=str(data / "bpe" / "bpe.model"), codebook=str(data / "codebook"),
                            work_dir=tmp_path, project_root=str(tmp_path))

    (tmp_path / "sweep.json").write_text(json.dumps({"fingerprint": base, "parent_run_id": "r", "inputs": inputs()}))
    with caplog.at_level("INFO", logger="meld.tune"):
        assert _resumable_parent(tmp_path, fp(max_steps=3), tmp_path / "ray_tune", mlflow=None, experiment_name="e",
                                 inputs=inputs(max_steps=3)) is None
    (record,) = [r for r in caplog.records if "started with other inputs" in r.getMessage()]
    assert record.levelname == "WARNING"
    changed = record.getMessage().split("(changed: ")[1]
    # the section's key, and the trials whose training settings it changes (max_steps is train.max_steps)
    assert changed.startswith("tune.max_steps 2 -> 3; the model/train settings, input data or training code of "
                              "trial(s) tune-meld-r1-sw0.2, tune-meld-r2-sw0.2"), changed


def test_a_resumed_sweep_says_that_it_keeps_the_concurrency_it_started_with(caplog):
    """Tuner.restore brings back the TuneConfig pickled at the sweep's start: a new tune.max_concurrent_trials
    (or a cluster that now holds another number of trials) does not apply to a resumed sweep. It is said,
    with the remedy; the run-only settings that do apply are named at INFO."""
    from ray_jobs.tune import _say_run_settings_changed

    started = {"max_concurrent_trials": 4, "max_failures": 1, "cpus_per_worker": 1, "gpus_per_worker": 0.0,
               "trials_at_once": 4}
    with caplog.at_level("INFO", logger="meld.tune"):
        _say_run_settings_changed(started, {**started, "max_concurrent_trials": 2, "trials_at_once": 2,
                                            "cpus_per_worker": 2})
    said = {r.getMessage(): r.levelname for r in caplog.records}
    assert said == {
        "tune.cpus_per_worker 1 -> 2 since the sweep started: the trials that start or resume now use 2": "INFO",
        "the resumed sweep starts its remaining trials 4 at a time, as when it started: Ray Tune keeps the limit a "
        "sweep began with (tune.max_concurrent_trials 2 here would be 2). --restart applies it, and retrains "
        "every trial":
            "WARNING"}
    caplog.clear()
    _say_run_settings_changed(started, dict(started))
    assert caplog.records == []
