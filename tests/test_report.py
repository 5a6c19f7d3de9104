"""The report stage on hand-made metrics files: what it says when a split, an evaluation or a sweep
is not what it should be."""

from __future__ import annotations

import json

import pytest
import yaml

from pipeline import report


def _run(tmp_path, metrics: dict, tune: dict | None = None, evaluate: dict | None = None) -> str:
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "meld.json").write_text(json.dumps(metrics))
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"systems": ["meld"], "codec_systems": [],
                                      **({"evaluate": evaluate} if evaluate is not None else {})}))
    argv = ["--params", str(params), "--metrics", str(tmp_path / "metrics"), "--out", str(tmp_path / "reports")]
    if tune is not None:
        (tmp_path / "tune.json").write_text(json.dumps(tune))
        argv += ["--tune", str(tmp_path / "tune.json")]
    assert report.main(argv) == 0
    return (tmp_path / "reports" / "summary.md").read_text()


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
