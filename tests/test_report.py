"""The report stage on hand-made metrics files: what it says when a split, an evaluation or a sweep
is not what it should be."""

from __future__ import annotations

import json

import pytest
import yaml

from pipeline import report


def _report(tmp_path, metrics_files: dict[str, dict], tune: dict | None = None, evaluate: dict | None = None) -> str:
    """summary.md of the report stage over metrics/<name>.json for each of ``metrics_files`` (the systems)."""
    (tmp_path / "metrics").mkdir()
    for name, metrics in metrics_files.items():
        (tmp_path / "metrics" / f"{name}.json").write_text(json.dumps(metrics))
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"systems": list(metrics_files), "codec_systems": [],
                                      **({"evaluate": evaluate} if evaluate is not None else {})}))
    argv = ["--params", str(params), "--metrics", str(tmp_path / "metrics"), "--out", str(tmp_path / "reports")]
    if tune is not None:
        (tmp_path / "tune.json").write_text(json.dumps(tune))
        argv += ["--tune", str(tmp_path / "tune.json")]
    assert report.main(argv) == 0
    return (tmp_path / "reports" / "summary.md").read_text()


def _run(tmp_path, metrics: dict, tune: dict | None = None, evaluate: dict | None = None) -> str:
    """The report of MELD's metrics file alone, as given."""
    return _report(tmp_path, {"meld": metrics}, tune, evaluate)


def _summary(tmp_path, systems: dict[str, dict], tune: dict | None = None) -> str:
    """The report of several systems' finished evaluations ({system: its metrics beyond the usual keys})."""
    return _report(tmp_path, {name: {"system": name, "ablations": {}, "complete": True, **m}
                              for name, m in systems.items()}, tune)


def test_a_split_without_eligible_utterances_is_named_not_dropped(tmp_path):
    summary = _run(tmp_path, {"system": "meld", "task": "tts", "splits": {"test": {}}, "ablations": {},
                              "complete": True})
    assert "| meld | test | no utterance within evaluate.min_seconds..max_seconds |" in summary


@pytest.mark.parametrize(("evaluate", "said"), [(None, "(3 s prompt"), ({"prompt_seconds": 1.5}, "(1.5 s prompt")])
def test_the_introduction_states_the_evaluations_prompt_length(tmp_path, evaluate, said):
    summary = _run(tmp_path, {"system": "meld", "task": "tts", "splits": {}, "complete": True}, evaluate=evaluate)
    assert said in summary.splitlines()[2]


def test_an_evaluation_that_stopped_early_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="meld.json holds an evaluation that stopped before its last split"):
        _run(tmp_path, {"system": "meld", "task": "tts", "splits": {"test": {}}, "complete": False})


def test_an_early_stopped_best_trial_says_so(tmp_path):
    best = {"config": {"slowness_weight": 0.2, "reduction_factor": 2}, "objective": 0.41, "status": "early_stopped",
            "steps": 8}
    summary = _run(tmp_path, {"system": "meld", "task": "tts", "splits": {}, "complete": True},
                   tune={"best": best, "best_config": best["config"], "best_objective": 0.41})
    assert "objective 0.41 (stopped early by ASHA at step 8: no trial trained the full budget)" in summary


def test_the_sweep_section_lists_the_asha_rungs_trials_reached(tmp_path):
    best = {"config": {"slowness_weight": 0.0, "reduction_factor": 2}, "objective": 0.57, "status": "completed",
            "steps": 16}
    rungs = [{"step": 8, "trials": 8, "cutoff": 0.99224, "stopped": [{"reduction_factor": 2, "slowness_weight": 0.1}] * 3},
             {"step": 16, "trials": 5, "cutoff": 0.9834, "stopped": []}, {"step": 32, "trials": 0, "cutoff": None,
                                                                             "stopped": []}]
    summary = _run(tmp_path, {"system": "meld", "task": "tts", "splits": {}, "complete": True},
                   tune={"best": best, "scheduler": {"name": "asha", "rungs": rungs}})
    assert "ASHA rungs: step 8: 8 trials, 3 stopped (cutoff 0.9922); step 16: 5 trials, 0 stopped (cutoff 0.9834)\n" \
        in summary
    (tmp_path / "fifo").mkdir()
    fifo = _run(tmp_path / "fifo", {"system": "meld", "task": "tts", "splits": {}, "complete": True},
                tune={"best": best, "scheduler": {"name": "fifo"}})
    assert "ASHA rungs" not in fifo


def test_the_sim_column_says_over_how_many_generations_it_averages(tmp_path):
    """SIM leaves out generations under the 0.5 s floor (all of them without a prompt): the table
    shows the count beside the mean, and the text says what the floor is."""
    split = {"utterances": 2, "generations": 4, "sim": 0.61, "sim_generations": 3, "duration_ratio": 1.0}
    summary = _run(tmp_path, {"system": "meld", "task": "tts", "splits": {"test": split}, "ablations": {},
                              "complete": True})
    head, row = [line for line in summary.splitlines() if line.startswith("| ")][:2]
    cells = dict(zip(head.split(" | "), row.split(" | ")))
    assert cells["SIM"] == "0.610" and cells["SIM n"] == "3/4"
    assert "at least 0.5 s" in summary and "SIM n = those / all generations" in summary


def test_the_comparison_plot_draws_each_system_and_split_against_its_ground_truth():
    import matplotlib.pyplot as plt

    def split(wer, sim, gt_wer, gt_sim):
        return {"wer": wer, "sim": sim, "longest_silence_s": 0.5, "duration_ratio": 1.1,
                "wer_ground_truth_vocoded": gt_wer, "sim_ground_truth_continuation": gt_sim,
                "ground_truth_longest_silence_s": 0.3}

    # codec_lm's ground truth goes through its codec, not the vocoder: references of its own
    metrics = [
        {"system": "meld", "splits": {"test": split(0.2, 0.8, 0.1, 0.9), "test_unseen": split(0.3, 0.7, 0.15, 0.85)},
         "ablations": {"meld (latent zeroed)": {"test": split(0.4, 0.6, 0.1, 0.9)}}},
        {"system": "codec_lm", "splits": {"test": split(0.25, 0.75, 0.3, 0.7)}, "ablations": {}},
        {"system": "melle", "unavailable": "not trained"},
    ]
    points = report.plot_points(metrics)
    assert [(p["system"], p["split"]) for p in points] == [
        ("meld", "test"), ("meld", "test_unseen"), ("meld (latent zeroed)", "test"), ("codec_lm", "test")]
    fig = report.comparison_figure(points)
    wer_panel, sim_panel = fig.axes[0], fig.axes[1]
    systems = ["meld", "meld (latent zeroed)", "codec_lm"]
    assert [t.get_text() for t in wer_panel.get_yticklabels()] == systems
    for panel, key, reference in ((wer_panel, "wer", "wer_ground_truth_vocoded"),
                                  (sim_panel, "sim", "sim_ground_truth_continuation")):
        assert sorted(bar.get_width() for bar in panel.patches) == sorted(p[key] for p in points)
        # each bar's own system's ground truth, on the bar's own row: (reference, row) per point
        ticks = sorted((round(x, 6), round(y)) for line in panel.get_lines()
                       for x, y in zip(line.get_xdata(), line.get_ydata()))
        assert ticks == sorted((p[reference], systems.index(p["system"])) for p in points)
    # the bars of one split share its colour, and the two splits differ
    colours = {p["split"]: set() for p in points}
    for bar, (_, split_name) in zip(wer_panel.patches, [(p["system"], p["split"]) for p in points
                                                        if p["split"] == "test"] + [("meld", "test_unseen")]):
        colours[split_name].add(bar.get_facecolor())
    assert all(len(c) == 1 for c in colours.values()) and colours["test"] != colours["test_unseen"]
    plt.close(fig)


def test_dvc_plots_draws_one_bar_per_system_and_split_for_each_number(tmp_path):
    """dvc.yaml's top-level plots read report_plots.json through real `dvc plots show`: every panel's number
    as a bar per (system, split), labelled by both, and the comparison figure itself. Declared as a plain
    stage plot, DVC drew a smoothed line of the last key over the row index."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    repo = tmp_path / "repo"
    (repo / "reports").mkdir(parents=True)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=repo, check=True)
    dvc_yaml = yaml.safe_load((root / "dvc.yaml").read_text())
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"plots": dvc_yaml["plots"]}))
    split = {"wer": 0.2, "sim": 0.7, "longest_silence_s": 0.4, "duration_ratio": 1.1,
             "wer_ground_truth_vocoded": 0.1, "sim_ground_truth_continuation": 0.8, "ground_truth_longest_silence_s": 0.3}
    metrics = [{"system": "meld", "splits": {"dev": split, "test": {**split, "wer": 0.3}}, "ablations": {}},
               {"system": "melle", "splits": {"dev": {**split, "sim": 0.6}}, "ablations": {}}]
    points = report.plot_points(metrics)
    (repo / "reports" / "report_plots.json").write_text(json.dumps(points))
    (repo / "reports" / "plots").mkdir()
    report.comparison_figure(points).savefig(repo / "reports" / "plots" / "tts_comparison.png")
    shown = subprocess.run([sys.executable, "-m", "dvc", "plots", "show", "--json"], cwd=repo, check=True,
                           capture_output=True, text=True)
    data = json.loads(shown.stdout)["data"]
    assert "reports/plots/tts_comparison.png" in data
    bars = {name: plot[0]["content"] for name, plot in data.items() if "by system and split" in name}
    assert {c["encoding"]["x"]["field"] for c in bars.values()} == {metric for metric, _, _ in report.PANELS}
    for content in bars.values():
        assert content["mark"]["type"] == "bar" and content["encoding"]["y"]["field"] == "system_split"
        x = content["encoding"]["x"]["field"]
        got = {(v["system_split"], v[x]) for v in content["data"]["values"]}
        assert got == {(f"{p['system']} / {p['split']}", p[x]) for p in points}


# what a first reading of the report got wrong: a real-time factor under 0.0005, silence means that
# differ below the shown precision, a NaN metric, a best trial that failed, an errored trial in the
# sweep plot, a comparison plot whose WER panel has no ground-truth tick


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


def test_the_sweep_grid_puts_each_trial_in_its_frame_rate_row_and_slowness_column():
    """The paper's Table 6 as a grid; a cell whose trial did not train the full budget says why and where."""
    def trial(w, r, objective, status, steps):
        return {"config": {"slowness_weight": w, "reduction_factor": r}, "objective": objective,
                "status": status, "steps": steps}

    trials = [trial(0.0, 1, 0.91, "completed", 16), trial(0.2, 1, 0.87654, "completed", 16),
              trial(0.0, 2, 1.2, "early_stopped", 8), trial(0.2, 2, float("nan"), "error", 3)]
    head, rule, r1, r2 = report.sweep_table(trials, "dev/mse_post_greedy")
    assert head == "| dev/mse_post_greedy by frame rate | slowness 0 | slowness 0.2 |" and rule == "|---|---|---|"
    assert r1 == "| r=1 (62.5 Hz) | 0.91 | 0.8765 |"
    assert r2 == "| r=2 (31.25 Hz) | 1.2 (stopped by ASHA at step 8) | – (failed at step 3) |"
    assert report.sweep_table([], "m") == []


# a second review: metrics files that are not what evaluate writes, numbers outside the TTS cells,
# names that break a Markdown row, a TTS system with no split


def _main(tmp_path, metrics_text: str, tune_text: str | None = None) -> None:
    """The report stage over metrics/meld.json holding ``metrics_text`` (and tune.json ``tune_text``)."""
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "meld.json").write_text(metrics_text)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"systems": ["meld"], "codec_systems": []}))
    argv = ["--params", str(tmp_path / "params.yaml"), "--metrics", str(tmp_path / "metrics"),
            "--out", str(tmp_path / "reports")]
    if tune_text is not None:
        (tmp_path / "tune.json").write_text(tune_text)
        argv += ["--tune", str(tmp_path / "tune.json")]
    report.main(argv)


FINISHED = json.dumps({"system": "meld", "task": "tts", "splits": {}, "ablations": {}, "complete": True})


@pytest.mark.parametrize(("metrics_text", "tune_text", "bad_file", "said"), [
    ('{"system": "meld", "splits": {"test": {"wer": 0.1', None, "meld.json", "is not JSON"),  # cut off
    ("", None, "meld.json", "is not JSON"),
    ("[]", None, "meld.json", "holds a JSON list, not an evaluation's metrics"),
    ('{"splits": {}}', None, "meld.json", "names no system"),
    (FINISHED, '{"best": ', "tune.json", "is not JSON"),
    (FINISHED, "null", "tune.json", "holds a JSON null, not the sweep's report"),
], ids=["cut-off", "empty", "list", "no-system", "tune-cut-off", "tune-null"])
def test_an_unreadable_metrics_or_sweep_file_ends_the_stage_in_one_line_naming_it(
        tmp_path, metrics_text, tune_text, bad_file, said):
    """A cut-off, empty or foreign file ended the stage in a JSONDecodeError, AttributeError or KeyError
    traceback; now one line says which file, what is wrong with it and which stage writes it."""
    with pytest.raises(SystemExit) as stop:
        _main(tmp_path, metrics_text, tune_text)
    message = str(stop.value.code)
    assert message.startswith("report: ") and "\n" not in message
    assert bad_file in message and said in message
    assert ("evaluate@meld" if bad_file == "meld.json" else "tune stage") in message
    assert not (tmp_path / "reports" / "summary.md").exists()


def _table(summary: str, head_starts: str) -> list[list[str]]:
    """The Markdown table whose head starts with ``head_starts``, as rows of cells (an escaped '|' kept
    inside its cell, as Markdown reads it)."""
    lines = summary.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(head_starts))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip().replace("\\|", "|") for c in line.replace("\\|", "\0").strip("|").split("|")])
    return [[c.replace("\0", "|") for c in row] for row in rows]


def test_a_nan_or_missing_stt_wer_or_duration_total_is_said_not_printed_as_a_number(tmp_path):
    """The STT tables printed a NaN WER as "nan%" and crashed on a None one; "gen. min / GT min" printed
    NaN as "nan" and a missing total as "0.00", as if nothing had been generated."""
    stt = {"test": {"wer": float("nan"), "per_speaker": {"a": float("nan"), "b": 0.25}}, "dev": {"wer": None}}
    summary = _summary(tmp_path, {
        "meld": {"task": "joint", "stt": stt,
                 "splits": {"test": {"generated_minutes": float("nan"), "ground_truth_minutes": 0.5}, "dev": {"sim": 0.5}}}})
    assert "nan" not in summary.replace("NaN", "")
    assert _tts_row(summary, "meld", "test")["gen. min / GT min"] == "NaN / 0.50"
    assert _tts_row(summary, "meld", "dev")["gen. min / GT min"] == "– / –"
    head, _, row = _table(summary, "| system | task mode |")
    assert dict(zip(head, row)) == {"system": "meld", "task mode": "joint", "decoding": "beam search",
                                    "WER dev": "–", "WER test": "NaN"}
    head, _, *rows = _table(summary, "| split | speaker |")
    assert rows == [["test", "a", "NaN"], ["test", "b", "25.0%"]]


def test_a_pipe_or_newline_in_a_name_stays_in_its_cell(tmp_path):
    """A speaker or split name with '|' split its cell in two and one with a newline ended the row: every
    later number of the row sat under another column's head."""
    stt = {"test|a": {"wer": 0.1, "per_speaker": {"spk|1": 0.1, "spk\n2": 0.2}}}
    summary = _summary(tmp_path, {"meld": {"task": "joint", "stt": stt,
                                           "splits": {"test|a": {"wer": 0.3, "rtf": 0.5}}}})
    for head_starts in ("| system | split |", "| system | task mode |", "| split | speaker |"):
        head, _, *rows = _table(summary, head_starts)
        assert rows and all(len(row) == len(head) for row in rows)
    head, _, *rows = _table(summary, "| split | speaker |")
    assert rows == [["test|a", "spk 2", "20.0%"], ["test|a", "spk|1", "10.0%"]]
    head, _, row = _table(summary, "| system | split |")[:3]
    assert dict(zip(head, row))["split"] == "test|a" and dict(zip(head, row))["RTF"] == "0.5"


def test_a_tts_system_evaluated_on_no_split_is_named_and_an_stt_one_is_left_to_its_table(tmp_path):
    """With evaluate.splits: [] a TTS system's metrics hold no split: it vanished from the report without a
    word. An STT-only system has its rows in the STT table."""
    summary = _summary(tmp_path, {"meld": {"task": "tts", "splits": {}},
                                  "meld_stt": {"task": "stt", "splits": {}, "stt": {"test": {"wer": 0.2}}}})
    _, _, *rows = _table(summary, "| system | split |")
    named = {row[0]: row[2] for row in rows}
    assert named["meld"] == "no TTS split evaluated (evaluate.splits is empty)" and "meld_stt" not in named


def test_the_introduction_says_codec_lms_audio_goes_through_its_codec(tmp_path):
    """Codec-LM has no vocoder: its generations and ground truth are decoded by its DAC codec, and the
    introduction said "through the vocoder" of every row."""
    summary = _summary(tmp_path, {"meld": {"task": "tts", "splits": {}}})
    intro = " ".join(summary.split("## TTS")[0].split())
    assert "(Codec-LM's: through its DAC codec)" in intro and "through the same vocoder or codec" in intro


def test_an_unfinished_codec_evaluation_names_the_codec_stage_to_rerun(tmp_path):
    """Codec-LM is evaluated by evaluate_codec@codec_lm; the message named evaluate@codec_lm, a stage
    that does not exist."""
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "codec_lm.json").write_text(json.dumps({"system": "codec_lm", "splits": {}, "complete": False}))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"systems": [], "codec_systems": ["codec_lm"]}))
    with pytest.raises(SystemExit, match=r"stopped before its last split \(rerun evaluate_codec@codec_lm\)"):
        report.main(["--params", str(tmp_path / "params.yaml"), "--metrics", str(tmp_path / "metrics"),
                     "--out", str(tmp_path / "reports")])


def test_the_stt_table_says_how_each_system_was_decoded(tmp_path):
    """Its heading said "beam search" whatever evaluate.stt_beam_size was (1 is greedy); each row now
    says its own beam and CTC weight, as the evaluation recorded them."""
    stt = {"test": {"wer": 0.5}}
    summary = _summary(tmp_path, {
        "meld_stt": {"task": "stt", "stt": stt, "stt_beam_size": 1, "stt_ctc_weight": 0.0},
        "meld_joint": {"task": "joint", "stt": stt, "stt_beam_size": 5, "stt_ctc_weight": 0.7}})
    head, _, *rows = _table(summary, "| system | task mode |")
    decoding = {row[0]: dict(zip(head, row))["decoding"] for row in rows}
    assert decoding == {"meld_stt": "greedy", "meld_joint": "beam 5, CTC weight 0.7"}
    assert "## STT (beam search)" not in summary
