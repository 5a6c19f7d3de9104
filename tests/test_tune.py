"""The tune stage's pieces: its params section, the trials' overrides, the choice of the best trial, the plot.

The sweep itself (a real Ray Tune run of two trials over the Ray Train driver, its report, plot and
nested MLflow runs) is checked in tests/test_pipeline_e2e.py, where the DAG's tune stage runs it:
one Ray Tune run for both checks, ~90 s fewer on a slow 2-core machine."""

from __future__ import annotations

import pytest
from test_faults import TINY_PARAMS, make_tiny_data, tiny_config

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
