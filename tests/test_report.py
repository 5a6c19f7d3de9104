"""The report stage on hand-made metrics files: what it says when a split, an evaluation or a sweep
is not what it should be."""

from __future__ import annotations

import json

import pytest
import yaml

from pipeline import report


def _run(tmp_path, metrics: dict, tune: dict | None = None) -> str:
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "meld.json").write_text(json.dumps(metrics))
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"systems": ["meld"], "codec_systems": []}))
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


def test_an_evaluation_that_stopped_early_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="meld.json holds an evaluation that stopped before its last split"):
        _run(tmp_path, {"system": "meld", "task": "tts", "splits": {"test": {}}, "complete": False})


def test_an_early_stopped_best_trial_says_so(tmp_path):
    best = {"config": {"slowness_weight": 0.2, "reduction_factor": 2}, "objective": 0.41, "status": "early_stopped",
            "steps": 8}
    summary = _run(tmp_path, {"system": "meld", "task": "tts", "splits": {}, "complete": True},
                   tune={"best": best, "best_config": best["config"], "best_objective": 0.41})
    assert "objective 0.41 (stopped early by ASHA at step 8: no trial trained the full budget)" in summary
