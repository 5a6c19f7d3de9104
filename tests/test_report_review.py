"""What the report and the sweep's plot say in the cases a first reading got wrong: a real-time factor
under 0.0005, silence means that differ below the shown precision, a NaN metric, a best trial that failed,
an errored trial in the sweep plot, a comparison plot whose WER panel has no ground-truth tick."""

from __future__ import annotations

import json

import yaml

from pipeline import report


def _summary(tmp_path, systems: dict[str, dict], tune: dict | None = None) -> str:
    (tmp_path / "metrics").mkdir()
    for name, m in systems.items():
        (tmp_path / "metrics" / f"{name}.json").write_text(json.dumps({"system": name, "ablations": {}, "complete": True,
                                                                        **m}))
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"systems": list(systems), "codec_systems": []}))
    argv = ["--params", str(params), "--metrics", str(tmp_path / "metrics"), "--out", str(tmp_path / "reports")]
    if tune is not None:
        (tmp_path / "tune.json").write_text(json.dumps(tune))
        argv += ["--tune", str(tmp_path / "tune.json")]
    assert report.main(argv) == 0
    return (tmp_path / "reports" / "summary.md").read_text()


def _tts_row(summary: str, system: str, split: str) -> dict[str, str]:
    lines = [line for line in summary.splitlines() if line.startswith("| ")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    for line in lines[1:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[:2] == [system, split]:
            return dict(zip(head, cells))
    raise AssertionError(f"no row {system} / {split}")


def test_a_small_real_time_factor_is_not_rounded_to_zero(tmp_path):
    """A GPU decodes 10 s of speech in milliseconds: an RTF of 0.00042 read "0.000", as if free, and two
    systems 3x apart read the same."""
    summary = _summary(tmp_path, {"meld": {"task": "tts", "splits": {"test": {"rtf": 0.00042}, "dev": {"rtf": 0.0013}}}})
    assert _tts_row(summary, "meld", "test")["RTF"] == "0.00042"
    assert _tts_row(summary, "meld", "dev")["RTF"] == "0.0013"


def test_the_silence_verdict_agrees_with_the_numbers_it_shows(tmp_path):
    """Means of 10 ms multiples over a few generations differ by 5 ms: shown to 0.01 s they read
    "MELD 0.12 s vs mel_lm 0.12 s: MELD generates more prolonged silence"."""
    split = {"ground_truth_longest_silence_s": 0.1}
    summary = _summary(tmp_path, {
        "meld": {"task": "tts", "splits": {"test": {**split, "longest_silence_s": 0.125},
                                           "test_unseen": {**split, "longest_silence_s": 0.3000000001}}},
        "mel_lm": {"task": "tts", "splits": {"test": {**split, "longest_silence_s": 0.12},
                                             "test_unseen": {**split, "longest_silence_s": 0.3}}},
    })
    assert "- test: MELD 0.125 s vs mel_lm 0.120 s: MELD generates more prolonged silence" in summary
    # a float-rounding difference is no difference
    assert "- test_unseen: MELD 0.300 s vs mel_lm 0.300 s: MELD generates the same prolonged silence" in summary


def test_a_nan_metric_is_said_as_such_and_never_compared(tmp_path):
    """A NaN in a metrics file (evaluate's means skip NaN today; a hand-merged or older file) read "nan%" in
    the table, "the same prolonged silence" in the statement (NaN is neither less nor more), and made
    report_plots.json invalid JSON (NaN); a None ground-truth silence crashed the report."""
    split = {"ground_truth_longest_silence_s": None}
    summary = _summary(tmp_path, {
        "meld": {"task": "tts", "splits": {"test": {**split, "wer": float("nan"), "longest_silence_s": float("nan")},
                                           "dev": {**split, "longest_silence_s": 0.2}}},
        "melle": {"task": "tts", "splits": {"test": {**split, "longest_silence_s": 0.5},
                                            "dev": {**split, "longest_silence_s": 0.5}}},
    })
    assert _tts_row(summary, "meld", "test")["WER"] == "NaN"
    assert "nan%" not in summary and "| nan |" not in summary
    assert "- test:" not in summary  # nothing to compare
    # a missing ground-truth silence is said, not a crash on None
    assert "- dev: MELD 0.200 s vs melle 0.500 s: MELD generates less prolonged silence (ground truth –)" in summary

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    points = json.loads((tmp_path / "reports" / "report_plots.json").read_text(), parse_constant=refuse)
    assert {(p["system"], p["split"]): p["wer"] for p in points}[("meld", "test")] is None


def test_a_best_trial_that_failed_is_not_said_to_be_stopped_by_asha(tmp_path):
    """With no trial at the full budget the best may be one whose training failed; the summary said ASHA
    stopped it. It also names the objective the number is of."""
    best = {"config": {"slowness_weight": 0.2, "reduction_factor": 2}, "objective": 0.41, "status": "error",
            "steps": 8, "error": "RuntimeError: boom"}
    summary = _summary(tmp_path, {"meld": {"task": "tts", "splits": {}}},
                       tune={"best": best, "objective": {"metric": "dev/mse_pre_greedy", "mode": "min"}})
    line = next(line for line in summary.splitlines() if line.startswith("best trial"))
    assert "ASHA" not in line
    assert "its training failed after step 8" in line and "no trial trained the full budget" in line
    assert "dev/mse_pre_greedy 0.41 (lower is better)" in line


def test_the_sweep_plot_does_not_draw_a_failed_trial_as_stopped_by_asha(tmp_path):
    from ray_jobs.tune import plot_trials

    def row(w, objective, status, steps):
        return {"trial": f"t-r1-sw{w}", "config": {"slowness_weight": w, "reduction_factor": 1},
                "objective": objective, "steps": steps, "status": status}

    trials = [row(0.0, 1.0, "completed", 16), row(0.1, 1.2, "early_stopped", 8), row(0.2, 1.1, "error", 8)]
    fig = plot_trials(trials, "dev/mse_pre_greedy", tmp_path / "tune.png")
    (ax,) = fig.axes
    points = [line for line in ax.get_lines() if line.get_linestyle() in ("None", "none", "")]
    hollow_circles = [p.get_xdata()[0] for p in points if p.get_marker() == "o" and p.get_markerfacecolor() == "none"]
    assert hollow_circles == [0.1]  # ASHA's stop only
    crosses = [p.get_xdata()[0] for p in points if p.get_marker() == "x"]
    assert crosses == [0.2]
    notes = {t.get_text() for t in ax.texts}
    assert "8" in notes and "error at 8" in notes
    assert "x: failed" in ax.get_title()


def test_the_comparison_legend_names_the_ground_truth_tick_whatever_panel_draws_it():
    """The legend was read from the WER panel alone: with no WER (every judged speaker excluded), the
    black ticks of the SIM and silence panels went unexplained."""
    split = {"sim": 0.5, "sim_ground_truth_continuation": 0.8, "longest_silence_s": 0.4,
             "ground_truth_longest_silence_s": 0.2, "duration_ratio": 1.0}
    fig = report.comparison_figure(report.plot_points([{"system": "meld", "splits": {"test": split}, "ablations": {}}]))
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["test", "ground truth (each row's own)"]


def test_a_missing_value_in_the_comparison_plot_is_marked_not_drawn_as_zero():
    """A split with no WER (every generation's speaker excluded from WER) and a split with WER 0 both
    left an empty bar slot: the missing one now says n/a on its own row and split."""
    split = {"sim": 0.5, "longest_silence_s": 0.4, "duration_ratio": 1.0}
    fig = report.comparison_figure(report.plot_points([
        {"system": "meld", "splits": {"test": {**split, "wer": 0.0}, "test_unseen": split}, "ablations": {}}]))
    wer_panel = fig.axes[0]
    marks = [(t.get_text().strip(), round(t.get_position()[1], 2)) for t in wer_panel.texts]
    assert marks == [("n/a", 0.2)]  # meld's row (0), the second split's half (+0.2); not the WER-0 one
    assert sorted(bar.get_width() for bar in wer_panel.patches) == [0.0]
