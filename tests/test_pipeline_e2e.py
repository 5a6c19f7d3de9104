"""The whole DAG on a debug-sized params file, for real: DVC, a local Ray cluster, MLflow.

Runs in a copy of the project's code in a temporary folder, so the repository's own
outputs are never touched. Checks: every stage's outputs (the sweep included), no file written outside
the stages' outs, a second `dvc repro` reruns nothing, and a training parameter change reruns only
train -> evaluate -> report. The first repro's stages join the test session's Ray cluster (as under
``ray job submit``); the third starts its own, as a plain ``dvc repro`` does.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_faults import ensure_ray

from meld.config import EvaluateConfig

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _defaults(config) -> dict:
    """A config section's every key at its default, as YAML can hold it (lists, not tuples)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config().to_dict().items()}


DEBUG_PARAMS = {
    # the joint MELD is TTS and STT in one model, so one train and one evaluate stage cover both tasks
    # (and it is the STT judge); meld and meld_stt differ from it only in the task parameter
    "systems": ["meld_joint", "mel_lm"],
    "codec_systems": [],  # the codec stages are tested in test_codes.py
    "corpus": {
        "name": "mini", "seed": 1, "train_voices": ["flite-rms", "flite-slt", "espeak-m3"],
        "held_out_voices": ["flite-awb"], "utterances_per_voice": {"train": 8, "dev": 1, "test": 2, "test_unseen": 2},
        "min_words": 8, "max_words": 12, "num_workers": 2,
        # dvc.yaml lists the corpus keys one by one (not num_workers), and DVC wants each in the file
        "librispeech_root": "data/librispeech", "librispeech_download": False,
        "librispeech_subsets": ["train-clean-100", "dev-clean", "test-clean"],
    },
    "features": {"num_workers": 1, "max_seconds": 20.0, "min_seconds": 0.3, "max_rejected_fraction": 0.05},
    "codebook": {"size": 16, "reduction_factors": [1, 2], "niter": 5, "max_vectors": 20000, "seed": 0},
    "bpe": {"vocab_size": 60},
    "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "d_ff": 64, "dropout": 0.0, "encoder_hidden": 32,
              "encoder_dropout": 0.5, "recon_hidden": 32, "postnet_channels": 16, "postnet_kernel": 5,
              "postnet_layers": 3, "postnet_dropout": 0.0, "q_temperature": 1.0, "reduction_factor": 2},
    # one Ray Train worker per stage (~12 s less per run on a slow 2-core machine than two): DDP
    # across workers is tested in test_faults.py and test_ddp_parameters.py; here it is the DAG
    "train": {"num_workers": 1, "use_gpu": False, "max_steps": 4, "frames_per_batch": 800, "lr": 0.001,
              "weight_decay": 0.0, "warmup_steps": 1, "hold_steps": 2, "decay_steps": 2, "grad_clip": 10.0,
              "bf16": False, "seed": 0, "checkpoint_every": 2, "log_every": 1,
              "loss_weights": {"ce": 1.0, "mse_pre": 1.0, "mse_post": 1.0, "slowness": 0.2}, "task": "tts",
              "stt_warmup_steps": 0},
    "meld_joint": {"model": {}, "train": {"task": "joint", "stt_warmup_steps": 2}},
    "mel_lm": {"args": {"stop_pos_weight": 1.0, "stop_threshold": 0.5}, "model": {},
               "train": {"task": "tts", "loss_weights": {"mse_pre": 1.0, "mse_post": 1.0, "slowness": 0.2, "stop": 1.0}}},
    # two trials, one per frame rate: the sweep's report, plot and MLflow runs are checked here
    "tune": {"system": "meld_joint", "slowness_weights": [0.5], "reduction_factors": [1, 2], "max_steps": 2,
             "eval_every": 1, "frames_per_batch": 800, "num_workers_per_trial": 1, "cpus_per_worker": 1,
             "max_concurrent_trials": 1, "scheduler": "asha", "grace_period": 1, "asha_reduction": 2,
             "metric": "dev/mse_pre_greedy", "max_failures": 0},
    # dvc.yaml lists the evaluate keys one by one too (not the process counts): DVC wants each in the file
    "evaluate": {**_defaults(EvaluateConfig),
                 "splits": ["test_unseen"], "utterances_per_split": 1, "generations": 1, "prompt_seconds": 1.0,
                 "min_seconds": 1.5, "max_seconds": 12.0, "max_length_factor": 1.5, "audio_samples": 1,
                 "ablations": False, "batch_size": 2, "score_workers": 1, "stt_splits": ["test"], "stt_beam_size": 2,
                 "stt_judge_model": "models/meld_joint/model.pt"},
    "codec_lm": {"codec_weights": None},
    "mlflow": {"experiment": "e2e"},
}


def _stages_run(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def _repro(cwd: Path, env: dict) -> str:
    proc = subprocess.run([str(BIN / "dvc"), "repro"], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    return out


def _status(cwd: Path, env: dict) -> str:
    return subprocess.run([str(BIN / "dvc"), "status"], cwd=cwd, env=env, capture_output=True, text=True).stdout


def _stage_drivers() -> dict[str, tuple[str, str]]:
    """{job id: (stage script, --system)} of the pipeline stages that ran as Ray drivers on this session's cluster."""
    import ray
    from ray.util.state import list_jobs

    found = {}
    # the session cluster by address: another local cluster (a parallel test process's) may be up
    for job in list_jobs(address=ray.get_runtime_context().gcs_address, limit=1000):
        m = re.search(r"-m pipeline\.(\w+)(?:.* --system (\S+))?", job.entrypoint or "")
        if job.type.name == "DRIVER" and m:
            found[job.job_id] = m.groups(default="")
    return found


@pytest.mark.slow
def test_whole_dag_runs_and_reruns_only_what_changed(tmp_path):
    work = tmp_path / "project"
    work.mkdir()
    for name in ("meld", "pipeline", "ray_jobs"):
        shutil.copytree(ROOT / name, work / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", work / "dvc.yaml")
    (work / "params.yaml").write_text(yaml.safe_dump(DEBUG_PARAMS))
    # The first repro's Ray stages join the test session's cluster, as stages under `ray job submit`
    # do (a local cluster start costs ~15 s of a slow 2-core CI machine, four times over); the third
    # repro starts its own, as a plain `dvc repro` does. After ensure_ray, os.environ also carries the
    # cluster's RAY_AUTH_MODE, which a joining client needs.
    ensure_ray()
    import ray

    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONPATH": str(work),
           "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}", "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    # stages write bytecode into the code folders they depend on, as on a user's machine: the project's
    # .dvcignore must keep the caches out of the folders' hashes, or the second repro reruns stages
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    subprocess.run([str(BIN / "dvc"), "init", "--no-scm", "-q"], cwd=work, env=env, check=True)
    shutil.copy(ROOT / ".dvcignore", work / ".dvcignore")

    drivers_before = _stage_drivers()
    first = _repro(work, {**env, "RAY_ADDRESS": ray.get_runtime_context().gcs_address})
    assert _stages_run(first) == {"corpus", "features", "codebook", "bpe", "train@meld_joint", "evaluate@meld_joint",
                                  "train@mel_lm", "evaluate@mel_lm", "tune", "report"}
    metrics = json.loads((work / "metrics" / "meld_joint.json").read_text())
    assert metrics["task"] == "joint" and metrics["complete"] is True
    split = metrics["splits"]["test_unseen"]  # its TTS ...
    # an untrained tiny model may sample <EOS> at once (ratio 0, seen in a clean clone): what is
    # checked here is that the generation was scored, not how long it was
    assert split["generations"] == 1 and math.isfinite(split["duration_ratio"]) and split["duration_ratio"] >= 0
    assert "wer" in split and 0.0 <= split["wer_ground_truth_vocoded"] <= 1.5
    assert metrics["stt_judge_model"] == "models/meld_joint/model.pt"
    assert metrics["stt_judge_beam_size"] == DEBUG_PARAMS["evaluate"]["stt_beam_size"]
    assert 0.0 <= split["wer_meld_stt_judge"] and 0.0 <= split["wer_ground_truth_meld_stt_judge"]
    stt = metrics["stt"]  # ... and its STT, with how it was decoded
    assert stt["test"]["ref_words"] > 0 and set(stt) == {"test"}
    assert metrics["stt_beam_size"] == DEBUG_PARAMS["evaluate"]["stt_beam_size"]
    test_speakers = {json.loads(line)["speaker"] for line in
                     (work / "data" / "features" / "test" / "index.jsonl").read_text().splitlines()}
    assert set(stt["test"]["per_speaker"]) == test_speakers  # every test speaker scored on its own
    mel_lm = json.loads((work / "metrics" / "mel_lm.json").read_text())
    assert mel_lm["task"] == "tts" and "stt" not in mel_lm and mel_lm["splits"]["test_unseen"]["generations"] == 1
    assert (work / "models" / "meld_joint" / "model.pt").is_file()
    summary = (work / "reports" / "summary.md").read_text()
    assert "| meld_joint | test_unseen |" in summary and "| mel_lm | test_unseen |" in summary
    assert all(f"| test | {spk} |" in summary for spk in test_speakers)  # the STT-by-speaker table
    assert f"| meld_joint | joint | beam {DEBUG_PARAMS['evaluate']['stt_beam_size']}" in summary
    assert "## Ray Tune sweep" in summary and (work / "reports" / "tune.png").stat().st_size > 0
    sweep = json.loads((work / "reports" / "tune.json").read_text())
    trials = sweep["trials"]
    assert [t["config"] for t in trials] == [{"slowness_weight": 0.5, "reduction_factor": 1},
                                            {"slowness_weight": 0.5, "reduction_factor": 2}]
    assert all(t["status"] in ("completed", "early_stopped") for t in trials), trials
    # the first trial always runs to max_t (ASHA has nothing to compare it with yet)
    assert trials[0]["status"] == "completed" and trials[0]["steps"] == 2
    assert all(t["objective"] > 0 and t["history"][-1] == [t["steps"], t["objective"]] for t in trials)
    done = [t for t in trials if t["status"] == "completed"]
    assert sweep["best"] == min(done, key=lambda t: t["objective"]) and sweep["best_config"] == sweep["best"]["config"]
    assert sweep["objective"]["metric"] == "dev/mse_pre_greedy" and sweep["scheduler"]["name"] == "asha"
    assert [(r["step"], r["trials"]) for r in sweep["scheduler"]["rungs"]][0] == (1, 2)  # both trials reached rung 1

    assert _files_no_stage_owns(work) == []

    second = _repro(work, env)
    assert _stages_run(second) == set(), second[-2000:]

    params = yaml.safe_load((work / "params.yaml").read_text())
    params["mel_lm"]["train"]["lr"] = 0.002  # a training parameter of one system only
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    third = _repro(work, env)
    assert _stages_run(third) == {"train@mel_lm", "evaluate@mel_lm", "report"}
    # the first repro's train and tune drivers ran on the session's cluster, the third's on a cluster of its own
    ran_here = sorted(stage for job, stage in _stage_drivers().items() if job not in drivers_before)
    assert ran_here == [("train", "mel_lm"), ("train", "meld_joint"), ("tune", "")], ran_here
    # MELD's own training settings are also the sweep's starting point, so they make the sweep stale too
    params["meld_joint"]["train"]["lr"] = 0.002
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    status = _status(work, env)
    assert "train@meld_joint:" in status and "tune:" in status and "train@mel_lm:" not in status, status
    # the evaluation's process counts change how fast, not what (the sharded run below shows it), so no
    # stage is stale for them; any other evaluate key makes every evaluation stale, and nothing else
    del params["meld_joint"]["train"]["lr"]
    params["evaluate"].update(score_workers=2, decode_workers=2)
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    status = _status(work, env)
    assert "up to date" in status, status
    params["evaluate"]["top_k"] = 5
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    status = _status(work, env)
    stale = set(re.findall(r"^(\S+):$", status, re.M))
    assert stale == {"evaluate@meld_joint", "evaluate@mel_lm"}, status
    params["evaluate"].update(top_k=DEBUG_PARAMS["evaluate"]["top_k"], score_workers=1, decode_workers=1)
    (work / "params.yaml").write_text(yaml.safe_dump(params))

    import mlflow

    from meld.training import load_checkpoint

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    runs = {r.info.run_name: r for r in mlflow.search_runs(experiment_names=["e2e"], output_format="list")}
    run = runs["train-meld_joint"]  # the training run, with its evaluation's TTS and STT metrics
    assert "loss/total" in run.data.metrics and "eval/test_unseen/duration_ratio" in run.data.metrics
    assert "eval/stt/test/wer" in run.data.metrics
    exported = load_checkpoint(work / "models" / "meld_joint" / "model.pt")
    assert run.data.params["model.reduction_factor"] == str(exported["extra"]["reduction_factor"])  # filter by frame rate
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "eval/test_unseen/duration_ratio")
    assert {m.step for m in history} == {exported["step"]}  # beside the dev metrics of the step evaluated
    assert run.data.tags["eval.splits"] == str(DEBUG_PARAMS["evaluate"]["splits"])  # how it was evaluated
    artifacts = [a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "model")]
    assert artifacts == ["model/model.pt"]  # the model the run produced
    # where each run comes from, for filtering in the UI: the stage and system, DVC's stage name, and a
    # digest of the params file that the runs of one repro share (its evaluation, in the same repro, too)
    tags = run.data.tags
    assert (tags["meld.stage"], tags["meld.system"], tags["meld.dvc_stage"]) == ("train", "meld_joint", "train@meld_joint")
    assert tags["eval.params_sha256"] == tags["meld.params_sha256"] and tags["eval.dvc_stage"] == "evaluate@meld_joint"
    parent = runs["tune-meld_joint"]  # the sweep's parent run, one child run per trial
    assert parent.data.tags["meld.stage"] == "tune" and parent.data.tags["meld.dvc_stage"] == "tune"
    assert parent.data.tags["meld.params_sha256"] == tags["meld.params_sha256"]
    assert all(runs[t["trial"]].data.tags["meld.params_sha256"] == tags["meld.params_sha256"] for t in trials)
    mel_lm_runs = mlflow.search_runs(experiment_names=["e2e"], filter_string="tags.`meld.system` = 'mel_lm'",
                                     order_by=["start_time ASC"], output_format="list")
    # retrained after the lr edit: a new run, under the edited params' digest; the first one under the first's
    assert [r.data.tags["meld.params_sha256"] == tags["meld.params_sha256"] for r in mel_lm_runs] == [True, False]
    assert parent.info.run_id == sweep["mlflow_parent_run_id"]
    assert parent.data.metrics["best/objective"] == pytest.approx(sweep["best"]["objective"])
    for t in trials:
        child = runs[t["trial"]]
        assert child.info.run_id == t["mlflow_run_id"] and child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.params["tune.reduction_factor"] == str(t["config"]["reduction_factor"])
        assert "dev/mse_pre_greedy" in child.data.metrics and child.info.status != "RUNNING"

    # The evaluation sharded over two Ray actors (evaluate.decode_workers, as over a cluster's GPUs)
    # scores what the stage's own process did: TTS, its STT judge and the STT test split. The same
    # tokens and texts; frames to float rounding, as the stage ran 2 torch threads and an actor runs 1
    # (test_decode_pool.py shows bit-equality at equal thread counts)
    sharded = yaml.safe_load((work / "params.yaml").read_text())
    sharded["evaluate"]["decode_workers"] = 2
    (work / "sharded.yaml").write_text(yaml.safe_dump(sharded))
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.evaluate", "--params", "sharded.yaml", "--system", "meld_joint",
         "--model", "models/meld_joint/model.pt", "--features", "data/features", "--corpus", "data/corpus",
         "--out", str(tmp_path / "sharded"), "--metrics", str(tmp_path / "sharded.json")],
        cwd=work, env={**env, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}, capture_output=True, text=True,
        timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert "decoding sharded over 2 Ray actors" in proc.stderr
    assert ("evaluate", "meld_joint") in _stage_drivers().values()  # it ran on the session's cluster
    rows = [json.loads(line) for line in (work / "eval" / "meld_joint" / "generations.jsonl").read_text().splitlines()]
    pool_rows = [json.loads(line) for line in (tmp_path / "sharded" / "generations.jsonl").read_text().splitlines()]
    _assert_same_to_rounding(pool_rows, rows)
    by_stage, by_pool = (json.loads(p.read_text()) for p in (work / "metrics" / "meld_joint.json", tmp_path / "sharded.json"))
    for m in (by_stage, by_pool):
        for split in m["splits"].values():
            split.pop("rtf")  # wall time
    _assert_same_to_rounding(by_pool, by_stage)


# what a repro may write outside the stages' outs: the code (its bytecode), DVC's own files, MLflow's
# store and artifacts, and the sweep's work directory (kept between runs so that a stopped sweep resumes)
NOT_AN_OUT = ("meld", "pipeline", "ray_jobs", ".dvc", "mlartifacts", "ray_results",
              "params.yaml", "dvc.yaml", "dvc.lock", ".dvcignore", "mlflow.db")


def _files_no_stage_owns(work: Path) -> list[str]:
    """Files under the project that no stage lists as an out: DVC neither caches nor checks them, so a
    stage writing one leaves it stale after the next change (or another stage's out then holds it)."""
    lock = yaml.safe_load((work / "dvc.lock").read_text())["stages"]
    owned = [out["path"] for stage in lock.values() for out in stage.get("outs", [])]
    stray = []
    for path in sorted(p.relative_to(work).as_posix() for p in work.rglob("*") if p.is_file()):
        if path.split("/")[0] not in NOT_AN_OUT and not any(path == o or path.startswith(o + "/") for o in owned):
            stray.append(path)
    return stray


def _assert_same_to_rounding(got, want, where: str = "") -> None:
    """Equal structure, strings, ints and booleans; floats within 1e-6 relative (NaN equals NaN)."""
    assert type(got) is type(want), f"{where}: {got!r} vs {want!r}"
    if isinstance(want, dict):
        assert got.keys() == want.keys(), where
        for k in want:
            _assert_same_to_rounding(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert len(got) == len(want), where
        for i, (a, b) in enumerate(zip(got, want)):
            _assert_same_to_rounding(a, b, f"{where}[{i}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-6, abs=1e-9, nan_ok=True), where
    else:
        assert got == want, where
