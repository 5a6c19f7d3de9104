"""The tune stage: a real Ray Tune sweep over the Ray Train driver on a debug-sized project, and its pieces."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_faults import TINY_PARAMS, ensure_ray, make_tiny_data, tiny_config

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


def test_plot_has_one_line_per_frame_rate(tmp_path):
    import matplotlib.image

    trials = [
        _row(r, w, 1.0 + 0.1 * r + w, "completed" if w < 0.5 else "early_stopped")
        for r in (1, 2)
        for w in (0.0, 0.2, 0.5)
    ]
    path = tmp_path / "plots" / "tune.png"
    plot_trials(trials, "dev/mse_post_greedy", path)
    assert matplotlib.image.imread(path).shape[0] > 100


@pytest.mark.slow
def test_sweep_writes_report_plot_and_nested_mlflow_runs(tmp_path_factory, tmp_path, monkeypatch):
    import mlflow

    from ray_jobs.tune import run_sweep

    data = make_tiny_data(tmp_path_factory)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    ensure_ray()
    params = {**TINY_PARAMS, "mlflow": {"experiment": "tune-test"}}
    out, plot = tmp_path / "reports" / "tune.json", tmp_path / "reports" / "plots" / "tune.png"
    report = run_sweep(
        params,
        features=str(data / "features"),
        bpe=str(data / "bpe" / "bpe.model"),
        codebook=str(data / "codebook"),
        out=out,
        plot=plot,
        work_dir=tmp_path / "work",
        project_root=str(tmp_path),
    )
    print(f"sweep of {len(report['trials'])} trials: {report['wall_seconds']} s")

    assert json.loads(out.read_text()) == report
    trials = report["trials"]
    assert [t["config"] for t in trials] == [
        {"slowness_weight": 0.2, "reduction_factor": 1},
        {"slowness_weight": 0.2, "reduction_factor": 2},
    ]
    assert all(t["status"] in ("completed", "early_stopped") for t in trials), trials
    # the first trial always runs to max_t (ASHA has nothing to compare it with yet)
    assert trials[0]["status"] == "completed" and trials[0]["steps"] == 2
    assert all(t["objective"] > 0 and t["history"][-1] == [t["steps"], t["objective"]] for t in trials)
    done = [t for t in trials if t["status"] == "completed"]
    assert report["best"] == min(done, key=lambda t: t["objective"])
    assert report["objective"]["metric"] == "dev/mse_post_greedy" and report["scheduler"]["name"] == "asha"
    assert Path(plot).stat().st_size > 0

    mlflow.set_tracking_uri(uri)
    runs = {
        r.info.run_name: r for r in mlflow.search_runs(experiment_names=["tune-test"], output_format="list")
    }
    parent = runs["tune-meld"]
    assert parent.info.run_id == report["mlflow_parent_run_id"]
    assert parent.data.metrics["best/objective"] == pytest.approx(report["best"]["objective"])
    for t in trials:
        child = runs[t["trial"]]
        assert child.info.run_id == t["mlflow_run_id"]
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.params["tune.reduction_factor"] == str(t["config"]["reduction_factor"])
        assert "dev/mse_post_greedy" in child.data.metrics and child.info.status != "RUNNING"
