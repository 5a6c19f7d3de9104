"""dvc.yaml's data and evaluation stages list their params key by key: every key that shapes the
output, and not the worker counts, whose change would otherwise rerun hours of LibriSpeech preparation,
DAC encoding or evaluation for the same results."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from meld.config import CodecLMConfig, CorpusConfig, EvaluateConfig, FeaturesConfig

ROOT = Path(__file__).resolve().parents[1]
DAG = yaml.safe_load((ROOT / "dvc.yaml").read_text())
# per section, the keys that set how many processes do the work, not what it gives: left out of the stage's params
PROCESS_COUNTS = {"corpus": {"num_workers"}, "features": {"num_workers"}, "codec_lm": {"encode_workers"},
                  "evaluate": {"score_workers", "decode_workers"}}


@pytest.mark.parametrize(("stage", "section", "config"), [("corpus", "corpus", CorpusConfig),
                                                          ("features", "features", FeaturesConfig)])
def test_a_data_stage_lists_every_key_of_its_section_but_the_worker_count(stage, section, config):
    listed = set(DAG["stages"][stage]["params"])
    keys = {f.name for f in dataclasses.fields(config)}
    own = {p for p in listed if p.startswith(f"{section}.")}
    assert own == {f"{section}.{k}" for k in keys - PROCESS_COUNTS[section]}
    # the corpus stage applies the features stage's rejection limit to LibriSpeech's unusable utterances
    assert listed - own == ({"features.max_rejected_fraction"} if stage == "corpus" else set())


def test_the_codes_stage_lists_the_codec_keys_but_the_worker_count():
    """Of a codec system's section, the codes stage uses the codec's keys (its model and train keys are
    the training stage's); `encode_workers` is left out like num_workers above."""
    listed = {p.removeprefix("${item}.") for p in DAG["stages"]["codes"]["do"]["params"] if p.startswith("${item}.")}
    keys = {f.name for f in dataclasses.fields(CodecLMConfig)}
    assert listed == keys - {"model", "train"} - PROCESS_COUNTS["codec_lm"]


@pytest.mark.parametrize("stage", ["evaluate", "evaluate_codec"])
def test_the_evaluate_stages_list_every_evaluate_key_but_the_process_counts(stage):
    """score_workers and decode_workers: the same transcripts, tokens and scores to float rounding
    (tests/test_evaluation.py, tests/test_decode_pool.py, the e2e DAG test)."""
    listed = set(DAG["stages"][stage]["do"]["params"])
    keys = {f.name for f in dataclasses.fields(EvaluateConfig)}
    assert listed == {f"evaluate.{k}" for k in keys - PROCESS_COUNTS["evaluate"]} | {"mlflow.experiment"}


def _listed_params() -> set[str]:
    """Every ``section.key`` or ``section`` a stage lists (not the per-system ``${item}`` ones)."""
    stages = [body.get("do", body) for body in DAG["stages"].values()]
    return {p for body in stages for p in body.get("params", []) if isinstance(p, str) and "${" not in p}


@pytest.mark.parametrize("params", [ROOT / "params.yaml", ROOT / "configs" / "paper.yaml"], ids=lambda p: p.name)
def test_each_shipped_params_file_holds_every_param_a_stage_lists(params):
    """DVC stops with "missing params" for a listed key the file lacks, even one the code has a default for."""
    values = yaml.safe_load(params.read_text())
    missing = []
    for name in sorted(_listed_params()):
        node = values
        for part in name.split("."):
            if not isinstance(node, dict) or part not in node:
                missing.append(name)
                break
            node = node[part]
    assert missing == []


@pytest.mark.parametrize("params", [ROOT / "params.yaml", ROOT / "configs" / "paper.yaml"], ids=lambda p: p.name)
def test_dvc_renders_the_dag_with_each_shipped_params_file(params, tmp_path):
    """`cp configs/paper.yaml params.yaml && dvc repro` must get past DVC's templating: a null where
    dvc.yaml interpolates a path (evaluate.stt_judge_model once) made DVC stop with "unexpected error"."""
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    shutil.copy(params, tmp_path / "params.yaml")
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    listed = subprocess.run([*dvc, "stage", "list"], cwd=tmp_path, capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr
    systems = yaml.safe_load(params.read_text())["systems"]
    assert all(f"evaluate@{s}" in listed.stdout for s in systems), listed.stdout
