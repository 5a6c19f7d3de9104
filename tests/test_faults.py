"""Fault tolerance of the training driver, for real: a local Ray cluster, DDP workers, MLflow.

(a) a training worker process dies mid-run -> FailureConfig restarts the worker group, which resumes
    from the last checkpoint (not from step 0) and finishes at max_steps;
(b) the train stage is killed after a checkpoint -> rerunning it resumes from that checkpoint;
(c) a truncated newest checkpoint is detected and the previous one is used;
(d) a NaN loss stops every rank with a clear message and keeps the last good checkpoint;
(e) (a)'s resumed run ends bit-identical to an uninterrupted run of the same configuration;
(f) what is refused or warned about before Ray starts (a frame budget the data does not fit, a run
    past its learning-rate schedule), and what the MLflow runs say after an interruption.

The worker-death and NaN-weights cases use the worker's test hooks (``config["test_hooks"]``, see
ray_jobs/train.py); nothing else here reaches inside the code under test.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

# A debug-sized project (like tests/test_pipeline_e2e.py's DEBUG_PARAMS), built once per test session
# by the data stages' own main() functions; shared by test_faults, test_tune and test_ray_submit.
TINY_PARAMS = {
    "systems": ["meld"],
    "corpus": {
        "name": "mini",
        "seed": 3,
        "train_voices": ["flite-rms", "flite-slt", "espeak-m3"],
        "held_out_voices": ["flite-awb"],
        "utterances_per_voice": {"train": 6, "dev": 1, "test": 0, "test_unseen": 0},
        "min_words": 6,
        "max_words": 10,
        "num_workers": 2,
    },
    "features": {"num_workers": 1, "max_seconds": 20.0, "min_seconds": 0.3, "max_rejected_fraction": 0.05},
    "codebook": {"size": 16, "reduction_factors": [1, 2], "niter": 5, "max_vectors": 20000, "seed": 0},
    "bpe": {"vocab_size": 50},
    "model": {
        "d_model": 32,
        "n_layers": 2,
        "n_heads": 2,
        "d_ff": 64,
        "dropout": 0.0,
        "encoder_hidden": 32,
        "encoder_dropout": 0.5,
        "recon_hidden": 32,
        "postnet_channels": 16,
        "postnet_kernel": 5,
        "postnet_layers": 3,
        "postnet_dropout": 0.0,
        "q_temperature": 1.0,
        "reduction_factor": 2,
    },
    "train": {
        "num_workers": 2,
        "use_gpu": False,
        "max_steps": 4,
        "frames_per_batch": 700,
        "lr": 0.001,
        "weight_decay": 0.0,
        "warmup_steps": 1,
        "hold_steps": 2,
        "decay_steps": 2,
        "grad_clip": 10.0,
        "bf16": False,
        "seed": 0,
        "checkpoint_every": 2,
        "log_every": 1,
        "loss_weights": {"ce": 1.0, "mse_pre": 1.0, "mse_post": 1.0, "slowness": 0.2},
        "task": "tts",
        "stt_warmup_steps": 0,
    },
    "meld": {"model": {}, "train": {"task": "tts"}},
    "tune": {
        "system": "meld",
        "slowness_weights": [0.2],
        "reduction_factors": [1, 2],
        "max_steps": 2,
        "eval_every": 1,
        "grace_period": 1,
        "num_workers_per_trial": 1,
        "cpus_per_worker": 1,
        "max_concurrent_trials": 1,
    },
    "mlflow": {"experiment": "faults"},
}


def make_tiny_data(tmp_path_factory) -> Path:
    """Corpus, features (train + dev), codebooks for r=1 and r=2, and BPE, under one folder (cached)."""
    root = tmp_path_factory.getbasetemp() / "meld-tiny-data"
    if (root / "DONE").is_file():
        return root
    from pipeline import bpe, codebook, corpus, features

    root.mkdir(parents=True, exist_ok=True)
    params = str(root / "params.yaml")
    (root / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS))
    corpus.main(["--params", params, "--out", str(root / "corpus")])
    features.main(["--params", params, "--corpus", str(root / "corpus"), "--out", str(root / "features")])
    codebook.main(["--params", params, "--features", str(root / "features"), "--out", str(root / "codebook")])
    bpe.main(["--params", params, "--corpus", str(root / "corpus"), "--out", str(root / "bpe")])
    (root / "DONE").write_text("ok")
    return root


def ensure_ray() -> None:
    """One local 2-CPU Ray cluster for the whole test session (a start costs ~15 s on 2 cores);
    it shuts down when the test process exits."""
    from ray_jobs.cluster import init_ray

    init_ray(num_cpus=2)


def tiny_config(data: Path, out: Path, params: dict | None = None, **train) -> dict:
    from ray_jobs.train import build_config

    return build_config(
        params or TINY_PARAMS,
        system="meld",
        features=data / "features",
        bpe=data / "bpe" / "bpe.model",
        codebook=data / "codebook",
        out=out,
        project_root=out,
        overrides={"train": train},
        threads_per_worker=1,
    )


def metric_history(tracking_uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    return [
        (m.step, m.value)
        for m in sorted(
            MlflowClient(tracking_uri).get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp)
        )
    ]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tiny_data(tmp_path_factory)


@pytest.fixture
def tracking(tmp_path, monkeypatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # build_config passes it on to the workers
    return uri


@pytest.fixture(scope="module")
def crashed_run(data, tmp_path_factory):
    """(a)'s run: 2 DDP workers; rank 1's process exits right after step 2 was checkpointed."""
    ensure_ray()
    from ray_jobs.train import run_training

    out = tmp_path_factory.mktemp("crash")
    uri = f"sqlite:///{out / 'mlflow.db'}"
    config = tiny_config(data, out / "model")
    config["mlflow_tracking_uri"] = uri
    marker = out / "crashed"
    config["test_hooks"] = {"crash_after_step": 2, "crash_rank": 1, "crash_marker": str(marker)}
    reports = out / "reports.jsonl"
    t0 = time.time()
    result = run_training(config, num_workers=2, use_gpu=False, storage_path=str(out / "ray"), max_failures=1,
                          callbacks=[_report_recorder(reports)])
    print(f"(a) run with one worker kill: {time.time() - t0:.1f} s")
    return {"config": config, "result": result, "marker": marker, "uri": uri, "out": out, "data": data,
            "reports": [json.loads(line) for line in reports.read_text().splitlines()]}


def _report_recorder(path: Path):
    """A Ray Train callback (it runs in the Train controller) appending rank 0's reports, and a line
    ``{"failed_ranks": [...]}`` where the worker group failed, to ``path``. Defined in here so that
    Ray pickles the class itself, not a reference to this test module."""
    from ray.train import UserCallback

    class RecordReports(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            with open(path, "a") as f:
                f.write(json.dumps(metrics[0]) + "\n")

        def after_exception(self, run_context, worker_exceptions):
            with open(path, "a") as f:
                f.write(json.dumps({"failed_ranks": sorted(worker_exceptions)}) + "\n")

    return RecordReports()


@pytest.mark.slow
def test_killed_worker_resumes_from_checkpoint(crashed_run):
    from meld.training import latest_good_checkpoint

    config, uri = crashed_run["config"], crashed_run["uri"]
    assert crashed_run["marker"].read_text() == "2"  # the worker process really died after step 2
    assert crashed_run["result"].metrics["step"] == config["train"]["max_steps"] == 4
    ckpt_dir = Path(config["checkpoint_dir"])
    assert latest_good_checkpoint(ckpt_dir)["step"] == 4
    # each report's checkpoint was staged beside it (a hard link, not a copy into /tmp) and the staging
    # folders are gone, the crashed attempt's included (pruned at the next checkpoint)
    assert not list(ckpt_dir.glob(".ray-staging-*")), sorted(p.name for p in ckpt_dir.iterdir())
    run_id = (ckpt_dir / "mlflow_run_id").read_text().strip()
    # the restarted worker group resumed the same MLflow run from the step-2 checkpoint ...
    assert metric_history(uri, run_id, "train/resume_step") == [(2, 2.0)]
    # ... and went on from there: every step logged once (a restart from 0 would log steps 1-2 twice)
    steps = [s for s, _ in metric_history(uri, run_id, "loss/total")]
    print(f"(a) steps logged: {steps}; killed after step 2, resumed at step 2, finished at step {steps[-1]}")
    assert steps == [1, 2, 3, 4]
    from mlflow.tracking import MlflowClient

    assert MlflowClient(uri).get_run(run_id).info.status == "FINISHED"  # the retry ended the run it resumed
    # the retry first reported its checkpoint's step again, with the dev metrics of the same weights: a Tune
    # trial whose report there was lost in the interrupt is judged at that rung's own step, not a later one
    reports = crashed_run["reports"]
    failed = max(i for i, r in enumerate(reports) if "failed_ranks" in r)
    retried = reports[failed + 1:]
    assert [r["step"] for r in retried] == [2, 4], reports
    dev = metric_history(uri, run_id, "dev/mse_pre_greedy")
    assert [s for s, _ in dev] == [2, 4]  # logged once per step: MLflow had the step-2 value already
    assert retried[0]["dev/mse_pre_greedy"] == pytest.approx(dev[0][1], rel=1e-5)



@pytest.mark.slow
def test_a_finished_run_started_again_reports_its_final_metrics(crashed_run, tmp_path, tracking):
    """Started again on its own finished checkpoints, a run trains nothing but reports its last step's
    metrics once more: a Tune trial resumed after an interrupt that lost its final report needs them
    (without them the sweep counted the trial unfinished on every rerun)."""
    from ray_jobs.train import run_training

    ckpts = tmp_path / "model" / "checkpoints"
    shutil.copytree(crashed_run["config"]["checkpoint_dir"], ckpts)
    (ckpts / "mlflow_run_id").unlink()  # a run of its own in this test's store
    config = tiny_config(crashed_run["data"], tmp_path / "model")
    assert config["fingerprint"] == crashed_run["config"]["fingerprint"]
    before = sorted(p.name for p in ckpts.glob("step-*.pt"))
    result = run_training(config, num_workers=1, use_gpu=False, storage_path=str(tmp_path / "ray"), max_failures=0)
    assert result.metrics["step"] == config["train"]["max_steps"] == 4
    first = crashed_run["result"].metrics
    assert result.metrics["dev/mse_pre_greedy"] == pytest.approx(first["dev/mse_pre_greedy"], rel=1e-5)
    assert sorted(p.name for p in ckpts.glob("step-*.pt")) == before  # nothing trained, nothing saved

@pytest.mark.slow
def test_truncated_checkpoint_is_skipped(crashed_run, tmp_path):
    import torch

    from meld.training import latest_good_checkpoint, load_checkpoint
    from ray_jobs.train import run_training

    config = dict(crashed_run["config"])
    ckpt_dir = tmp_path / "checkpoints"
    shutil.copytree(config["checkpoint_dir"], ckpt_dir)
    (ckpt_dir / "mlflow_run_id").unlink()  # a run of its own, not (a)'s
    config["checkpoint_dir"] = str(ckpt_dir)
    config.pop("test_hooks")
    newest = ckpt_dir / "step-4.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a partial write
    assert latest_good_checkpoint(ckpt_dir)["step"] == 2

    # a fresh Ray storage, so only the folder's checkpoints are there to resume from
    run_training(config, num_workers=2, use_gpu=False, storage_path=str(tmp_path / "ray"), max_failures=0)
    rewritten = load_checkpoint(newest)
    assert rewritten["step"] == 4  # rewritten whole, with the weights (a)'s resumed run ended with
    original = load_checkpoint(Path(crashed_run["config"]["checkpoint_dir"]) / "step-4.pt")["model"]
    assert all(torch.equal(rewritten["model"][k], original[k]) for k in original)
    run_id = (ckpt_dir / "mlflow_run_id").read_text().strip()
    assert metric_history(crashed_run["uri"], run_id, "train/resume_step") == [(2, 2.0)]


@pytest.mark.slow
def test_init_from_starts_a_new_run_from_finished_weights(crashed_run, tmp_path):
    import torch

    from meld.training import latest_good_checkpoint, load_checkpoint
    from ray_jobs.train import run_training

    source = Path(crashed_run["config"]["checkpoint_dir"]) / "step-4.pt"
    # lr 0: AdamW leaves every weight where it started, so the run's weights must be the source's
    config = tiny_config(crashed_run["data"], tmp_path / "model", init_from=str(source), max_steps=2, lr=0.0)
    config["mlflow_tracking_uri"] = crashed_run["uri"]
    run_training(config, num_workers=1, use_gpu=False, storage_path=str(tmp_path / "ray"), max_failures=0)
    ckpt = latest_good_checkpoint(Path(config["checkpoint_dir"]))
    assert ckpt["step"] == 2  # a new run: steps 1-2, not the source's step 4 onwards
    start = load_checkpoint(source)["model"]
    # every weight as the source left it (the postnet's batch-norm statistics move with any forward pass)
    weights = [k for k in start if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert len(weights) > 20 and all(torch.equal(ckpt["model"][k], start[k]) for k in weights)
    fresh = tiny_config(crashed_run["data"], tmp_path / "fresh", max_steps=2, lr=0.0)
    assert fresh["fingerprint"] != config["fingerprint"]  # another starting point: its checkpoints are not resumed


def test_init_from_refuses_a_missing_or_misfitting_model(crashed_run, tmp_path):
    source = Path(crashed_run["config"]["checkpoint_dir"]) / "step-4.pt"
    with pytest.raises(FileNotFoundError, match="train.init_from: .*nowhere.pt does not exist"):
        tiny_config(crashed_run["data"], tmp_path / "a", init_from=str(tmp_path / "nowhere.pt"))
    # one of the run's own checkpoints: the new configuration would set it aside before loading it
    with pytest.raises(ValueError, match="train.init_from: .*step-4.pt is one of this run's own checkpoints.*cp "):
        tiny_config(crashed_run["data"], source.parent.parent, init_from=str(source))
    # the model the run exports: overwritten at its end, every rerun fine-tuned the fine-tuned model again
    (tmp_path / "c").mkdir()
    shutil.copyfile(source, tmp_path / "c" / "model.pt")
    with pytest.raises(ValueError, match="train.init_from: .*c/model.pt is the model this run exports .*copy it out "):
        tiny_config(crashed_run["data"], tmp_path / "c", init_from=str(tmp_path / "c" / "model.pt"))
    wider = {**TINY_PARAMS, "model": {**TINY_PARAMS["model"], "d_ff": TINY_PARAMS["model"]["d_ff"] * 2}}
    with pytest.raises(ValueError, match=r"does not fit this meld model \(\d+ weights differ: backbone\..*fc"):
        tiny_config(crashed_run["data"], tmp_path / "b", params=wider, init_from=str(source))


def test_the_init_from_weights_are_part_of_the_configuration(data, tmp_path):
    """train.init_from counts by its bytes, not its path: overwritten with other weights, the file starts
    another run (with the path alone, the rerun resumed the finished run and exported its old weights)."""
    import torch

    from meld.models.builders import build_model
    from meld.training import save_checkpoint

    kwargs = tiny_config(data, tmp_path / "model")["model_kwargs"]
    init = tmp_path / "init.pt"

    def fingerprint_from(seed: int) -> str:
        torch.manual_seed(seed)
        save_checkpoint(init, system="meld", model=build_model("meld", kwargs), model_kwargs=kwargs)
        return tiny_config(data, tmp_path / "model", init_from=str(init))["fingerprint"]

    first = fingerprint_from(0)
    assert fingerprint_from(0) == first  # the same weights written again: the same run, which resumes
    assert fingerprint_from(1) != first


def test_a_frame_budget_the_data_does_not_fit_stops_the_stage_before_ray_starts(data, tmp_path, capsys):
    """An utterance longer than train.frames_per_batch, or fewer batches than workers, failed inside
    every Ray worker, was retried and ended in a 100-line WorkerGroupError; build_config cuts the
    batches the workers would and refuses the budget, and the stage says so in one line."""
    from meld.config import ConfigError, run_stage
    from meld.store import FeatureStore, TrainingData, load_stats
    from meld.text import BPETokenizer
    from ray_jobs.train import main

    config = tiny_config(data, tmp_path / "model")
    # the workers' own lengths (frames grouped by the reduction factor)
    longest = max(TrainingData(FeatureStore(config["train_store"]), load_stats(config["stats"]),
                               BPETokenizer(config["bpe_model"]), config["reduction_factor"]).lengths())
    tiny_config(data, tmp_path / "model", frames_per_batch=longest)  # the longest utterance fits exactly
    too_long = rf"utterance\(s\) are longer than the frame budget \({longest - 1}\).* counts {longest} frames"
    with pytest.raises(ConfigError, match=too_long):
        tiny_config(data, tmp_path / "model", frames_per_batch=longest - 1)
    with pytest.raises(ConfigError, match=r"only \d+ batches of \d+ frames for 64 workers"):
        tiny_config(data, tmp_path / "model", num_workers=64)

    params = {**TINY_PARAMS, "train": {**TINY_PARAMS["train"], "frames_per_batch": longest - 1}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    argv = ["--params", str(tmp_path / "params.yaml"), "--system", "meld", "--features", str(data / "features"),
            "--bpe", str(data / "bpe" / "bpe.model"), "--codebook", str(data / "codebook"), "--out",
            str(tmp_path / "out"), "--project-root", str(tmp_path), "--ray-storage", str(tmp_path / "ray")]
    assert run_stage("train", lambda: main(argv)) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("train: ") and re.search(too_long, line)
    assert not (tmp_path / "ray").exists() and not (tmp_path / "out").exists()  # no Ray Train run began


def test_a_system_section_that_cannot_train_stops_the_stage_before_ray_starts(data, tmp_path):
    """A system other than meld needs its own section, its task must be one it takes (a params file
    without a meld_joint section trained the joint model as TTS alone), and its args must build it: a
    misspelt key failed in every Ray worker."""
    from meld.config import ConfigError
    from ray_jobs.train import build_config

    def build(system, params):
        return build_config(params, system=system, features=data / "features", bpe=data / "bpe" / "bpe.model",
                            codebook=data / "codebook", out=tmp_path / system, project_root=tmp_path)

    with pytest.raises(ConfigError, match=r"no 'melle' section; every system but meld needs one"):
        build("melle", TINY_PARAMS)  # it would train with MELD's loss weights, its KL at weight 1
    with pytest.raises(ConfigError, match=r"meld_joint trains task joint, but its train.task is 'tts'"):
        build("meld_joint", {**TINY_PARAMS, "meld_joint": {"model": {}}})
    with pytest.raises(ConfigError, match=r"mel_lm trains task tts, but its train.task is 'stt'"):
        build("mel_lm", {**TINY_PARAMS, "mel_lm": {"train": {"task": "stt"}}})
    misspelt = {**TINY_PARAMS, "meld": {"args": {"stt_ctcc": True}, "train": {"task": "tts"}}}
    with pytest.raises(ConfigError, match=r"params section 'meld': meld cannot be built .*stt_ctcc"):
        build("meld", misspelt)
    assert build("meld", {**TINY_PARAMS, "meld": {"args": {"stt_ctc": True}}})["model_kwargs"]["stt_ctc"] is True


def test_utterances_the_frame_budget_leaves_out_are_said_and_listed_for_mlflow_and_model_pt(data, tmp_path, capsys,
                                                                                            tracking):
    """Within train.max_skipped_fraction, utterances longer than the budget are left out of training
    (DESIGN: skipped, counted and listed with the reason), named on stderr, counted and listed in the
    run's MLflow record; export_model keeps the list in model.pt (checked where a test exports one:
    test_a_run_resumed_from_rays_copy_leaves_its_checkpoint_in_the_folder)."""

    from meld.config import ConfigError
    from meld.store import FeatureStore, TrainingData, load_stats
    from meld.text import BPETokenizer

    config = tiny_config(data, tmp_path / "model")
    assert config["skipped_too_long"] == []
    lengths = TrainingData(FeatureStore(config["train_store"]), load_stats(config["stats"]),
                           BPETokenizer(config["bpe_model"]), config["reduction_factor"]).lengths()
    budget = sorted(lengths)[-3]  # the two longest (or more, on ties) no longer fit
    capsys.readouterr()
    config = tiny_config(data, tmp_path / "model", frames_per_batch=budget, max_skipped_fraction=1.0)
    ids = [row["id"] for row in FeatureStore(config["train_store"]).index]
    expected = [ids[i] for i, n in enumerate(lengths) if n > budget]
    assert len(expected) >= 2 and [row["id"] for row in config["skipped_too_long"]] == expected
    assert all(row["frames"] > budget and f"({budget} frames per batch)" in row["reason"]
               for row in config["skipped_too_long"])
    err = capsys.readouterr().err
    assert f"{len(expected)} of {len(lengths)} utterance(s) left out" in err and expected[0] in err
    # the left-out share is what the check allows: the same budget at the default 1 % stops the stage
    with pytest.raises(ConfigError, match=f"{len(expected)} of {len(lengths)} utterance"):
        tiny_config(data, tmp_path / "model", frames_per_batch=budget)

    count, listed = _left_out_as_logged(config, lengths, budget, tracking, tmp_path, "skipped_too_long")
    assert count == len(expected) and listed == config["skipped_too_long"]


def test_dev_utterances_the_frame_budget_leaves_unscored_are_said_and_listed_for_mlflow(data, tmp_path, capsys,
                                                                                          tracking):
    """A dev utterance longer than the frame budget cannot be scored (it was dropped without a word):
    the driver names it before Ray starts and the run counts and lists it in MLflow; the batches
    scored hold every other dev utterance, each batch within the budget."""

    from meld.store import FeatureStore, grouped_lengths
    from ray_jobs.train import dev_batches

    config = tiny_config(data, tmp_path / "model")
    assert config["dev_skipped_too_long"] == []
    dev = FeatureStore(config["eval_store"])
    lengths = grouped_lengths(dev.lengths, config["reduction_factor"])
    budget = sorted(lengths)[-2]  # the longest (and any tied with it above the budget) no longer fits
    expected = [row["id"] for row, n in zip(dev.index, lengths) if n > budget]
    assert 1 <= len(expected) < len(lengths)
    capsys.readouterr()
    config = tiny_config(data, tmp_path / "model", frames_per_batch=budget, max_skipped_fraction=1.0)
    assert [row["id"] for row in config["dev_skipped_too_long"]] == expected
    assert all(row["frames"] > budget for row in config["dev_skipped_too_long"])
    err = capsys.readouterr().err
    assert f"{len(expected)} of {len(lengths)} dev utterance(s) not scored" in err and expected[0] in err
    assert "the dev metrics are over the others" in err
    batches, skipped = dev_batches(lengths, budget)
    assert [dev.index[i]["id"] for i in skipped] == expected
    assert sorted(i for b in batches for i in b) == [i for i, n in enumerate(lengths) if n <= budget]
    assert all(max(lengths[i] for i in b) * len(b) <= budget for b in batches)
    # a budget below every dev utterance: nothing is scored, and the driver says what the metrics will be
    shortest_train = min(grouped_lengths(FeatureStore(config["train_store"]).lengths, config["reduction_factor"]))
    assert shortest_train < min(lengths)  # so that the train split still has batches at that budget
    tiny_config(data, tmp_path / "model", frames_per_batch=min(lengths) - 1, max_skipped_fraction=1.0)
    assert "every dev metric is NaN" in capsys.readouterr().err

    train_lengths = grouped_lengths(FeatureStore(config["train_store"]).lengths, config["reduction_factor"])
    count, listed = _left_out_as_logged(config, train_lengths, budget, tracking, tmp_path, "dev_skipped_too_long")
    assert count == len(expected) and listed == config["dev_skipped_too_long"]


def _left_out_as_logged(config: dict, lengths: list[int], budget: int, tracking: str, tmp_path: Path,
                        name: str) -> tuple[float, list]:
    """The count (``data/<name>``) and the list (``data/<name>.json``) a new training run of ``config``
    logs to MLflow."""
    from mlflow.tracking import MlflowClient

    from meld.store import FrameBudgetSampler
    from ray_jobs.train import _open_mlflow_run

    run_config = {**config, "experiment": "faults", "project_root": str(tmp_path), "run_name": "train-meld"}
    sampler = FrameBudgetSampler(lengths, budget, max_skipped_fraction=1.0)
    mlflow = _open_mlflow_run(run_config, tmp_path / "ckpts", resumed_at=None, sampler=sampler)
    run_id = mlflow.active_run().info.run_id
    mlflow.end_run()
    client = MlflowClient(tracking)
    listed = json.loads(Path(client.download_artifacts(run_id, f"data/{name}.json", str(tmp_path))).read_text())
    return client.get_run(run_id).data.metrics[f"data/{name}"], listed


def test_a_run_past_its_learning_rate_schedule_is_warned_about(data, tmp_path, caplog):
    """Past warm-up + hold + decay the learning rate is 0: the steps there train nothing, which only a
    flat loss would show; the driver says so before the run starts."""
    from meld.training import lr_factor

    train = TINY_PARAMS["train"]
    end = train["warmup_steps"] + train["hold_steps"] + train["decay_steps"]
    schedule = (train["warmup_steps"], train["hold_steps"], train["decay_steps"])
    assert lr_factor(end - 1, *schedule) > 0 == lr_factor(end, *schedule)  # step end + 1 trains at rate 0
    caplog.set_level("WARNING", logger="meld.train")
    tiny_config(data, tmp_path / "model", max_steps=end)
    assert not caplog.records
    tiny_config(data, tmp_path / "model", max_steps=end + 3)
    assert "its last 3 steps train at learning rate 0" in caplog.text


def test_the_logged_learning_rate_is_the_one_the_step_trained_with():
    """train_step's ``lr`` is the rate of the update it made (it was the next step's: step 1 of a 4-step
    warm-up showed peak/2). AdamW's first update moves a weight by the rate wherever the gradient is far
    above eps, so the first step's largest move is the rate that step used."""
    from conftest import tiny_batch, tiny_meld

    from meld.training import build_optimizer, build_scheduler, lr_factor, train_step

    model, _ = tiny_meld()
    batch = tiny_batch()
    peak, schedule = 1e-2, (4, 2, 4)  # warm-up, hold, decay steps
    opt = build_optimizer(model, peak, weight_decay=0.0)
    sched = build_scheduler(opt, *schedule)
    before = [p.detach().clone() for p in model.parameters()]

    def step() -> float:
        return train_step(model, opt, sched, batch, task="tts", loss_weights={}, grad_clip=10.0)["lr"]

    logged = [step()]
    moved = max(float((p.detach() - b).abs().max()) for p, b in zip(model.parameters(), before))
    assert logged[0] == pytest.approx(moved, rel=1e-3)
    assert logged[0] == pytest.approx(peak / schedule[0])  # step 1 of the warm-up
    logged += [step() for _ in range(sum(schedule) - 1)]
    assert logged == pytest.approx([peak * lr_factor(s, *schedule) for s in range(sum(schedule))])


def test_logging_and_checkpoint_frequency_leave_the_configuration_the_same(data, tmp_path):
    """A run whose log_every or checkpoint_every changed resumes its checkpoints; one whose
    trajectory changed (the learning rate) does not."""
    base = tiny_config(data, tmp_path / "model")["fingerprint"]
    assert tiny_config(data, tmp_path / "model", log_every=7, checkpoint_every=3)["fingerprint"] == base
    assert tiny_config(data, tmp_path / "model", lr=0.002)["fingerprint"] != base


def test_other_input_bytes_make_another_configuration(data, tmp_path):
    """The fingerprint reads the inputs' bytes (train index, statistics, BPE model, codebook), not
    their sizes: a codebook refitted with another seed has the same size and must not resume."""
    import numpy as np

    from ray_jobs.train import build_config

    def fingerprint_with(codebook: Path) -> str:
        return build_config(TINY_PARAMS, system="meld", features=data / "features", bpe=data / "bpe" / "bpe.model",
                            codebook=codebook, out=tmp_path / "model", project_root=tmp_path,
                            threads_per_worker=1)["fingerprint"]

    other = tmp_path / "codebook"
    shutil.copytree(data / "codebook", other)
    assert fingerprint_with(other) == fingerprint_with(data / "codebook")
    r = TINY_PARAMS["model"]["reduction_factor"]
    codes = np.load(other / f"r{r}.npy")
    np.save(other / f"r{r}.npy", codes[::-1].copy())  # same shape and bytes count, other order
    assert fingerprint_with(other) != fingerprint_with(data / "codebook")


def test_the_code_fingerprint_follows_the_code_training_runs(tmp_path):
    """A change to a module training imports makes another configuration (its checkpoints are not
    resumed); a change to code it does not run (the evaluation, the CLI) leaves an interrupted run
    resumable. On a copy of the repository's code, so the files can be edited."""
    from ray_jobs.train import _code_digest

    root = Path(__file__).resolve().parents[1]
    for package in ("meld", "pipeline", "ray_jobs"):
        shutil.copytree(root / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    assert _code_digest() == _code_digest(tmp_path)  # the same bytes: the same digest, wherever they lie
    base = _code_digest(tmp_path)

    def edited(path: str) -> str:
        with open(tmp_path / path, "a") as f:
            f.write("\n# edited\n")
        return _code_digest(tmp_path)

    assert edited("meld/evaluation/scoring.py") == base
    assert edited("meld/cli/synthesize.py") == base
    assert edited("meld/generate.py") == base
    changed = edited("meld/models/backbone.py")  # imported inside the model modules
    assert changed != base
    assert edited("ray_jobs/train.py") != changed


@pytest.mark.slow
def test_another_configuration_sets_the_old_checkpoints_aside(crashed_run, tmp_path):
    """A changed parameter starts a new run and moves the old checkpoints to stale/<fingerprint>/,
    where they stay loadable; files that are not step-<N>.pt are left alone."""
    from meld.training import load_checkpoint, step_checkpoints
    from ray_jobs.train import run_training

    out = tmp_path / "model"
    ckpt_dir = out / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    for n in (2, 4):
        shutil.copy(Path(crashed_run["config"]["checkpoint_dir"]) / f"step-{n}.pt", ckpt_dir)
    (ckpt_dir / "step-best.pt").write_bytes(b"a user's own copy")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(crashed_run["uri"])
    # the old checkpoints' run, which a kill left RUNNING
    killed = client.create_run(client.get_experiment_by_name("faults").experiment_id).info.run_id
    (ckpt_dir / "mlflow_run_id").write_text(killed)
    config = tiny_config(crashed_run["data"], out, max_steps=2, lr=0.002)
    config["mlflow_tracking_uri"] = crashed_run["uri"]
    old = crashed_run["config"]["fingerprint"]
    assert config["fingerprint"] != old
    run_training(config, num_workers=1, use_gpu=False, storage_path=str(tmp_path / "ray"), max_failures=0)
    new = (ckpt_dir / "mlflow_run_id").read_text().strip()
    assert new != killed and client.get_run(new).info.status == "FINISHED"
    # nothing would ever end the old run: the new one does, naming itself
    assert client.get_run(killed).info.status == "KILLED" and client.get_run(killed).data.tags["replaced_by"] == new
    assert [n for n, _ in step_checkpoints(ckpt_dir)] == [2]  # the new run's, trained from step 1
    assert load_checkpoint(ckpt_dir / "step-2.pt")["extra"]["fingerprint"] == config["fingerprint"]
    stale = ckpt_dir / "stale" / old
    assert [n for n, _ in step_checkpoints(stale)] == [2, 4]
    assert load_checkpoint(stale / "step-4.pt")["extra"]["fingerprint"] == old
    assert (ckpt_dir / "step-best.pt").read_bytes() == b"a user's own copy"


def test_a_resumed_run_drops_its_failure_tag(tmp_path, tracking):
    """An interrupted run (the driver tags it ``failure: SystemExit: 1``, FAILED) resumed and finished must
    not read as failed: the tag becomes ``resumed_after``. A run killed before its first checkpoint is not
    resumed: the next one ends it as KILLED, not left RUNNING."""
    from mlflow.tracking import MlflowClient

    from meld.store import FrameBudgetSampler
    from ray_jobs.train import _open_mlflow_run

    config = {"experiment": "faults", "project_root": str(tmp_path), "run_name": "train-meld", "system": "meld",
              "train": TINY_PARAMS["train"], "model_kwargs": {}, "reduction_factor": 1}
    ckpts, sampler, client = tmp_path / "checkpoints", FrameBudgetSampler([3, 4], 8), MlflowClient(tracking)
    mlflow = _open_mlflow_run(config, ckpts, resumed_at=None, sampler=sampler)
    first = mlflow.active_run().info.run_id
    mlflow.set_tag("failure", "SystemExit: 1")  # as run_training's driver marks an interrupted run
    mlflow.end_run("FAILED")
    mlflow = _open_mlflow_run(config, ckpts, resumed_at=2, sampler=sampler)
    assert mlflow.active_run().info.run_id == first
    mlflow.end_run()
    run = client.get_run(first)
    assert run.info.status == "FINISHED" and "failure" not in run.data.tags
    assert run.data.tags["resumed_after"] == "SystemExit: 1"

    client.update_run(first, status="RUNNING")  # killed again, before a checkpoint: nothing to resume
    mlflow = _open_mlflow_run(config, ckpts, resumed_at=None, sampler=sampler)
    second = mlflow.active_run().info.run_id
    mlflow.end_run()
    assert second != first
    assert client.get_run(first).info.status == "KILLED" and client.get_run(first).data.tags["replaced_by"] == second

    # killed hard (left RUNNING), then deleted in the UI: MLflow refuses writes to it, and ending it crashed
    # the next attempt (one of Ray's retries spent, and the retry took the new run for a resumed one)
    client.update_run(second, status="RUNNING")
    client.delete_run(second)
    mlflow = _open_mlflow_run(config, ckpts, resumed_at=None, sampler=sampler)
    third = mlflow.active_run().info.run_id
    mlflow.end_run()
    assert third != second and client.get_run(third).data.params["system"] == "meld"


def test_a_resumed_run_logs_no_step_twice_and_one_whose_store_changed_goes_on_in_a_new_run(tmp_path, tracking,
                                                                                          monkeypatch):
    """Resumed from the step-2 checkpoint of an attempt that had logged steps 1-3, training logs from step 4
    on (step 3 again gave MLflow two values at one step). A checkpoint folder whose run is not in the store
    (MLFLOW_TRACKING_URI changed between attempts, or the run deleted) failed in the worker with "Run not
    found" on every retry; it now goes on in a new run that names the one it continues."""
    from mlflow.tracking import MlflowClient

    from meld.store import FrameBudgetSampler
    from ray_jobs.train import _open_mlflow_run, logged_until

    config = {"experiment": "faults", "project_root": str(tmp_path), "run_name": "train-meld", "system": "meld",
              "train": TINY_PARAMS["train"], "model_kwargs": {}, "reduction_factor": 1}
    ckpts, sampler = tmp_path / "checkpoints", FrameBudgetSampler([3, 4], 8)
    mlflow = _open_mlflow_run(config, ckpts, resumed_at=None, sampler=sampler)
    first = mlflow.active_run().info.run_id
    assert logged_until(mlflow, first, "loss/") == 0  # data/* metrics are not training steps
    for step in (1, 2, 3):
        mlflow.log_metrics({"loss/total": 1.0 / step, "train/s_per_step": 0.1}, step=step)
    mlflow.log_metrics({"dev/mse_pre": 0.5}, step=2)
    mlflow.end_run("FAILED")
    mlflow = _open_mlflow_run(config, ckpts, resumed_at=2, sampler=sampler)
    # the losses up to step 3, the dev point up to step 2 (a kill inside step 4's dev pass leaves step 4's
    # losses without its dev point, which the next attempt must still log)
    assert mlflow.active_run().info.run_id == first
    assert logged_until(mlflow, first, "loss/") == 3 and logged_until(mlflow, first, "dev/") == 2
    mlflow.end_run()

    other = f"sqlite:///{tmp_path / 'other.db'}"
    for change in ("store", "deleted"):
        if change == "store":
            monkeypatch.setenv("MLFLOW_TRACKING_URI", other)
        else:
            MlflowClient(other).delete_run((ckpts / "mlflow_run_id").read_text().strip())
        continued = (ckpts / "mlflow_run_id").read_text().strip()
        recorded = (ckpts / "mlflow_tracking_uri").read_text().strip()
        mlflow = _open_mlflow_run(config, ckpts, resumed_at=2, sampler=sampler)
        run = mlflow.active_run()
        mlflow.end_run()
        run = MlflowClient(other).get_run(run.info.run_id)
        assert run.info.run_id != continued and run.data.tags["meld.continues_run"] == f"{continued} ({recorded})"
        assert run.data.params["system"] == "meld" and logged_until(mlflow, run.info.run_id, "loss/") == 0
        assert (ckpts / "mlflow_run_id").read_text().strip() == run.info.run_id


@pytest.mark.slow
def test_a_run_resumed_from_rays_copy_leaves_its_checkpoint_in_the_folder(crashed_run, tmp_path):
    """A finished run's checkpoint folder is gone (deleted, or another node's) but Ray's persisted copy
    is there: the run resumes from that copy, trains nothing more, and writes the checkpoint back to
    the folder the stage exports from (before, export_model found none)."""
    import torch

    from meld.training import latest_good_checkpoint
    from ray_jobs.train import export_model, run_training

    storage = tmp_path / "ray"
    shutil.copytree(crashed_run["out"] / "ray", storage)
    config = dict(crashed_run["config"])
    config.pop("test_hooks")
    config["checkpoint_dir"] = str(tmp_path / "checkpoints")  # empty
    run_training(config, num_workers=1, use_gpu=False, storage_path=str(storage), max_failures=0)
    assert latest_good_checkpoint(config["checkpoint_dir"])["step"] == 4
    config["skipped_too_long"] = [{"id": "spk-0001", "frames": 999, "reason": "longer than train.frames_per_batch"}]
    exported = export_model(config, tmp_path)
    assert exported.is_file()
    # what the frame budget left out of training stays with the model (meld info shows it)
    saved = torch.load(exported, weights_only=True, mmap=True)
    assert saved["extra"]["skipped_too_long"] == config["skipped_too_long"]
    # stored in the decoding layout: a process decoding on the file's pages copies no Linear weight
    from meld.models.backbone import prepare_for_decoding
    from meld.training import load_model

    model, _ = load_model(exported, share_file_pages=True)
    linear = {name: m.weight for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    before = {name: w.data_ptr() for name, w in linear.items()}
    assert any(not w.is_contiguous() and w.t().is_contiguous() for w in linear.values())
    prepare_for_decoding(model)
    assert {name: m.weight.data_ptr() for name, m in model.named_modules() if name in linear} == before


@pytest.mark.slow
def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_run(crashed_run, tmp_path):
    """Exact resumption, and with it reproducibility: (a)'s run, whose worker died after step 2 and
    which resumed from the step-2 checkpoint, ends bit-identical to one uninterrupted run of the same
    configuration (initialisation, data order, dropout, optimiser and schedule state, and the DDP
    all-reduce all seeded or restored). A rerun of a train stage therefore reproduces it, too."""
    import torch

    from meld.training import latest_good_checkpoint
    from ray_jobs.train import run_training

    config = tiny_config(crashed_run["data"], tmp_path / "model")
    config["mlflow_tracking_uri"] = crashed_run["uri"]
    assert config["fingerprint"] == crashed_run["config"]["fingerprint"]  # the same configuration
    run_training(config, num_workers=2, use_gpu=False, storage_path=str(tmp_path / "ray"), max_failures=0)
    straight = latest_good_checkpoint(Path(config["checkpoint_dir"]))
    resumed = latest_good_checkpoint(Path(crashed_run["config"]["checkpoint_dir"]))
    assert straight["step"] == resumed["step"] == 4
    assert straight["model"].keys() == resumed["model"].keys() and len(straight["model"]) > 20
    differ = [k for k in straight["model"] if not torch.equal(straight["model"][k], resumed["model"][k])]
    assert not differ, f"{len(differ)} of {len(straight['model'])} tensors differ, e.g. {differ[:3]}"


def _spoil_an_utterance(config: dict, features: Path, step: int, rank: int) -> str:
    """Copy the train split to ``features`` (and point ``config`` at it) with a NaN frame in an utterance
    that ``rank`` reads at ``step`` and no rank reads before; returns the utterance's id."""
    import numpy as np

    from meld.store import FeatureStore, FrameBudgetSampler, TrainingData, load_stats
    from meld.text import BPETokenizer

    shutil.copytree(config["train_store"], features / "train")
    config["train_store"] = str(features / "train")
    store = FeatureStore(config["train_store"])
    lengths = TrainingData(store, load_stats(config["stats"]), BPETokenizer(config["bpe_model"]),
                           config["reduction_factor"]).lengths()
    tc = config["train"]
    samplers = [iter(FrameBudgetSampler(lengths, tc["frames_per_batch"], r, tc["num_workers"], tc["seed"]))
                for r in range(tc["num_workers"])]
    read = [[next(s) for s in samplers] for _ in range(step)]  # read[k][r]: rank r's batch at step k + 1
    before = {i for k, batches in enumerate(read) for r, b in enumerate(batches) if (k + 1, r) != (step, rank) for i in b}
    target = next(i for i in read[-1][rank] if i not in before)
    frames = np.memmap(store.folder / "frames.f32", dtype=np.float32, mode="r+", shape=store.all_frames().shape)
    frames[store.index[target]["offset"], 0] = np.nan
    frames.flush()
    return store.index[target]["id"]


@pytest.mark.slow
@pytest.mark.parametrize("cause", ["weights", "frames"])
def test_nan_loss_stops_with_clear_message_and_keeps_checkpoint(data, tmp_path, tracking, cause):
    """weights: one rank's weights become NaN before step 3 (a loss that blew up); frames: an utterance
    that rank reads at step 3 holds a NaN frame (the message names it, though rank 0 writes it)."""
    ensure_ray()
    from meld.training import NonFiniteLoss, latest_good_checkpoint
    from ray_jobs.train import run_training

    if cause == "weights":
        config = tiny_config(data, tmp_path / "model")
        config["test_hooks"] = {"nan_at_step": 3, "nan_rank": 1}
        what = r"non-finite loss .*"
    else:  # batches of three or four utterances: rank 1 reads new ones at step 3
        config = tiny_config(data, tmp_path / "model", frames_per_batch=350)
        bad = _spoil_an_utterance(config, tmp_path / "features", step=3, rank=1)
        what = re.escape(f"non-finite values in the input frames of utterance(s) {bad} of {config['train_store']}")
    with pytest.raises(NonFiniteLoss) as err:
        run_training(config, num_workers=2, use_gpu=False, storage_path=str(tmp_path / "ray"), max_failures=2)
    msg = str(err.value)
    print(f"(d) {msg}")
    assert re.search(what + r" at step 3; training stopped", msg) and config["checkpoint_dir"] in msg
    assert "last good checkpoint (step 2)" in msg
    ckpt_dir = Path(config["checkpoint_dir"])
    assert sorted(p.name for p in ckpt_dir.glob("step-*.pt")) == ["step-2.pt"]
    assert latest_good_checkpoint(ckpt_dir)["step"] == 2

    from mlflow.tracking import MlflowClient

    run = MlflowClient(tracking).get_run((ckpt_dir / "mlflow_run_id").read_text().strip())
    assert run.info.status == "FAILED" and run.data.tags["failure"] == msg
    assert "train/resume_step" not in run.data.metrics  # stopped, not retried from the checkpoint


@pytest.mark.slow
def test_a_failed_run_is_marked_failed_in_mlflow(data, tmp_path, tracking):
    """Any error in the training loop (not only a NaN loss) ends the MLflow run as FAILED with the
    error, instead of leaving it RUNNING; the run raises."""
    ensure_ray()
    from mlflow.tracking import MlflowClient

    from ray_jobs.train import run_training

    config = tiny_config(data, tmp_path / "model")
    config["test_hooks"] = {"error_at_step": 2}
    with pytest.raises(Exception, match="test hook: error before step 2"):
        run_training(config, num_workers=1, use_gpu=False, storage_path=str(tmp_path / "ray"), max_failures=0)
    run_id = (Path(config["checkpoint_dir"]) / "mlflow_run_id").read_text().strip()
    run = MlflowClient(tracking).get_run(run_id)
    assert run.info.status == "FAILED" and "test hook: error before step 2" in run.data.tags["failure"]


def _wait_for(predicate, proc: subprocess.Popen, deadline_s: float) -> None:
    end = time.time() + deadline_s
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the train stage ended (rc={proc.returncode}) before it was interrupted")
        if time.time() > end:
            raise AssertionError("timed out waiting for the train stage's checkpoint")
        time.sleep(0.2)


def _wait_for_train_actors_of_other_jobs_to_end(deadline_s: float) -> None:
    """Until the Ray Train controller and workers a killed driver started are gone (Ray's shared
    helpers, such as its autoscaling coordinator, stay up for the cluster's life)."""
    import ray
    from ray.util.state import list_actors

    me = ray.get_runtime_context().get_job_id()
    address = ray.get_runtime_context().gcs_address  # this session's cluster, not any other local one
    start = time.time()
    first = None
    while True:
        alive_actors = list_actors(address=address, filters=[("state", "=", "ALIVE")])
        others = [a.class_name for a in alive_actors if a.job_id != me]
        alive = [name for name in others if name in ("TrainController", "RayTrainWorker")]
        first = others if first is None else first
        if not alive:
            print(f"(b) waited {time.time() - start:.1f} s for the killed stage's Ray Train actors to end (alive at first: {first})")
            return
        if time.time() > start + deadline_s:
            raise AssertionError(f"the killed stage's Ray Train actors are still alive: {alive}")
        time.sleep(0.5)


@pytest.mark.slow
def test_interrupted_train_stage_resumes(data, tmp_path):
    """The stage script in a subprocess (joining the test's Ray cluster, as under ``ray job submit``)."""
    ensure_ray()
    import ray

    params = {
        **TINY_PARAMS,
        "train": {
            **TINY_PARAMS["train"],
            "num_workers": 1,
            "max_steps": 10,
            "hold_steps": 7,  # a learning-rate schedule as long as the run (1 + 7 + 2 steps)
            "checkpoint_every": 2,
            "log_every": 1,
        },
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = tmp_path / "models" / "meld"
    cmd = [
        sys.executable,
        "-m",
        "pipeline.train",
        "--params",
        str(tmp_path / "params.yaml"),
        "--system",
        "meld",
        "--features",
        str(data / "features"),
        "--bpe",
        str(data / "bpe" / "bpe.model"),
        "--codebook",
        str(data / "codebook"),
        "--out",
        str(out),
        "--project-root",
        str(tmp_path),
        "--ray-storage",
        str(tmp_path / "ray_results"),
    ]
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "PYTHONUNBUFFERED": "1",
        "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }
    ckpts = out / "checkpoints"
    log1 = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=log1, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        _wait_for(lambda: any(ckpts.glob("step-*.pt")), first, deadline_s=240)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the process group this test started: driver and its children
        first.wait()
        log1.close()
    assert first.returncode != 0
    # SIGKILL reaches the driver, not its Ray Train workers in the test's cluster: they run (and
    # may write the next checkpoint) until Ray reaps the dead driver's actors. Listing the kept
    # checkpoints before then races them.
    _wait_for_train_actors_of_other_jobs_to_end(deadline_s=120)
    kept = sorted(int(p.stem.split("-")[1]) for p in ckpts.glob("step-*.pt"))
    assert kept and kept[-1] < params["train"]["max_steps"], kept

    second = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    log = second.stdout + second.stderr
    assert second.returncode == 0, log[-4000:]
    resumed = [int(s) for s in re.findall(r"resuming meld from step (\d+)", log)]
    print(f"(b) interrupted with checkpoints at steps {kept}; the rerun resumed from step {resumed}")
    assert resumed and resumed[0] == kept[-1] > 0
    assert not re.search(r"\[meld\] step 1/", log)  # no step was trained twice from scratch
    # each progress line once: a worker's print() reached the driver twice under Ray 2.60 (its
    # print patch tees to stdout and also logs to the console), so the loop logs instead
    logged = re.findall(r"\[meld\] step (\d+)/", log)
    assert logged and len(logged) == len(set(logged)), logged
    from meld.training import load_checkpoint

    assert load_checkpoint(out / "model.pt")["step"] == params["train"]["max_steps"]


# ---------------------------------------------------------------- the driver's side (a later review)

def _stage_argv(data: Path, tmp_path: Path, params: dict, system: str = "meld") -> list[str]:
    """The train stage's command line on the tiny data, with ``params`` as its params file."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return ["--params", str(tmp_path / "params.yaml"), "--system", system, "--features", str(data / "features"),
            "--bpe", str(data / "bpe" / "bpe.model"), "--codebook", str(data / "codebook"), "--out",
            str(tmp_path / "out"), "--project-root", str(tmp_path), "--ray-storage", str(tmp_path / "ray")]


@pytest.mark.parametrize(("edit", "said"), [
    ({"meld": ["model"]}, r"params section 'meld': expected a mapping of keys to values, got list"),
    ({"meld": 3}, r"params section 'meld': expected a mapping of keys to values, got int"),
    ({"meld": {"train": "tts"}}, r"params section 'meld.train': expected a mapping .*, got str 'tts'"),
    ({"model": [1]}, r"params section 'model': expected a mapping .*, got list"),
    ({"meld": {"trian": {}}}, r"params section 'meld': unknown key\(s\) \['trian'\]"),
], ids=["section-list", "section-int", "train-str", "model-list", "misspelt-key"])
def test_a_params_section_of_the_wrong_shape_ends_the_stage_in_one_line(data, tmp_path, capsys, edit, said):
    """A system section, or its model/train part, that is not a mapping ended the stage in an
    AttributeError or TypeError naming no section ('list' object has no attribute 'get'); a misspelt
    key in it was a bare ValueError, so a traceback too. All stop before Ray, in one line."""
    from meld.config import run_stage
    from ray_jobs.train import main

    assert run_stage("train", lambda: main(_stage_argv(data, tmp_path, {**TINY_PARAMS, **edit}))) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("train: ") and re.search(said, line), line
    assert not (tmp_path / "ray").exists() and not (tmp_path / "out").exists()


def test_an_init_from_that_does_not_fit_ends_the_stage_in_one_line(data, tmp_path, capsys):
    """train.init_from holding a model of other shapes was refused before Ray, but as a ValueError:
    a traceback under the stage, where the params' other mistakes are one line."""
    from meld.config import run_stage
    from meld.models.builders import build_model
    from meld.training import save_checkpoint
    from ray_jobs.train import main

    wider = {**TINY_PARAMS, "model": {**TINY_PARAMS["model"], "d_ff": TINY_PARAMS["model"]["d_ff"] * 2}}
    kwargs = tiny_config(data, tmp_path / "wider", params=wider)["model_kwargs"]
    init = save_checkpoint(tmp_path / "init.pt", system="meld", model=build_model("meld", kwargs), model_kwargs=kwargs)
    params = {**TINY_PARAMS, "train": {**TINY_PARAMS["train"], "init_from": str(init)}}
    assert run_stage("train", lambda: main(_stage_argv(data, tmp_path, params))) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert re.fullmatch(r"train: train.init_from: .*init.pt does not fit this meld model .*", line), line


def test_an_out_folder_of_another_system_is_refused_before_ray_starts(data, tmp_path, capsys):
    """One MELD_OUT for the jobs of several systems (docs/scaling.md's shared runtime env, with --system
    changed on the command line) trained a second system into the first's folder: it set the first's
    checkpoints aside and exported over its model.pt. A folder of the same system is still resumed."""
    from meld.config import ConfigError, run_stage
    from meld.models.builders import build_model
    from meld.training import save_checkpoint
    from ray_jobs.train import build_config, main

    params = {**TINY_PARAMS, "mel_lm": {"args": {"stop_pos_weight": 1.0, "stop_threshold": 0.5}, "model": {},
                                        "train": {"task": "tts", "loss_weights": {"mse_pre": 1.0, "mse_post": 1.0,
                                                                                  "slowness": 0.2, "stop": 1.0}}}}

    def config(system: str, out: Path) -> dict:
        return build_config(params, system=system, features=data / "features", bpe=data / "bpe" / "bpe.model",
                            codebook=data / "codebook", out=out, project_root=tmp_path)

    def write(system: str, path: Path, kwargs: dict) -> None:
        save_checkpoint(path, system=system, model=build_model(system, kwargs), model_kwargs=kwargs, step=4)

    exported = tmp_path / "exported"  # a finished meld run's folder, as the stage leaves it
    meld = config("meld", exported)
    write("meld", exported / "model.pt", meld["model_kwargs"])
    with pytest.raises(ConfigError, match=r"--out .*exported holds another system's training: .*model.pt is a meld "
                                          r"model, and this run trains mel_lm"):
        config("mel_lm", exported)
    assert config("meld", exported)["fingerprint"] == meld["fingerprint"]  # its own system: resumed as before

    interrupted = tmp_path / "interrupted"  # a run that has checkpoints but no model.pt yet
    write("meld", interrupted / "checkpoints" / "step-4.pt", meld["model_kwargs"])
    with pytest.raises(ConfigError, match=r"checkpoints/step-4.pt is a meld model, and this run trains mel_lm"):
        config("mel_lm", interrupted)

    argv = _stage_argv(data, tmp_path, params, system="mel_lm")
    argv[argv.index("--out") + 1] = str(exported)
    assert run_stage("train", lambda: main(argv)) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("train: --out ") and "give every system a folder of its own" in line
    assert not (tmp_path / "ray").exists()
    assert torch_load_system(exported / "model.pt") == "meld"  # left as it was


def torch_load_system(path: Path) -> str:
    from meld.training import load_checkpoint

    return load_checkpoint(path, mmap=True)["system"]


def test_an_export_from_another_runs_checkpoint_names_both_runs(data, tmp_path, capsys):
    """A checkpoint folder whose newest checkpoint another run wrote (two jobs sharing one --out) was a
    RuntimeError traceback saying only 'belongs to another configuration'; it is one line naming the
    file, both configurations and where this run's own checkpoints went."""
    from meld.config import run_stage
    from meld.models.builders import build_model
    from meld.training import save_checkpoint
    from ray_jobs.train import export_model

    ours = tiny_config(data, tmp_path / "model")
    theirs = tiny_config(data, tmp_path / "model", lr=0.0005)
    assert ours["fingerprint"] != theirs["fingerprint"]
    save_checkpoint(Path(ours["checkpoint_dir"]) / "step-3.pt", system="meld", model=build_model("meld", ours["model_kwargs"]),
                    model_kwargs=ours["model_kwargs"], step=3, extra={"fingerprint": theirs["fingerprint"]})
    assert run_stage("train", lambda: export_model(ours, tmp_path / "model")) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert "step-3.pt, the newest checkpoint, is not this run's" in line
    assert theirs["fingerprint"] in line and ours["fingerprint"] in line and "its own --out" in line
    assert not (tmp_path / "model" / "model.pt").exists()


def test_max_failures_from_the_environment_is_checked_and_the_flag_wins(data, tmp_path, monkeypatch, capsys):
    """MELD_MAX_FAILURES that is not an integer broke the command before argparse ran, even with
    --max-failures given or for --help, as "invalid literal for int()" naming no variable; a value
    below -1 reached Ray, which reads it as 0 (no restart) without a word."""
    from meld.config import ConfigError, run_stage
    from ray_jobs.train import main

    too_long = {**TINY_PARAMS, "train": {**TINY_PARAMS["train"], "frames_per_batch": 10}}  # stops before Ray
    argv = _stage_argv(data, tmp_path, too_long)
    monkeypatch.setenv("MELD_MAX_FAILURES", "two")
    with pytest.raises(ConfigError, match=r"MELD_MAX_FAILURES: expected an integer .* got 'two'"):
        main(argv)
    # the flag wins over the variable: the run goes on to the params' own error
    with pytest.raises(ConfigError, match="frame budget"):
        main([*argv, "--max-failures", "1"])
    with pytest.raises(SystemExit):
        main([*argv, "--max-failures", "-3"])
    assert "--max-failures: expected -1 (no limit) or a count of restarts >= 0, got -3" in capsys.readouterr().err
    monkeypatch.setenv("MELD_MAX_FAILURES", "-2")
    assert run_stage("train", lambda: main(argv)) == 1
    assert "MELD_MAX_FAILURES: expected -1" in capsys.readouterr().err


def test_a_run_the_cluster_cannot_hold_is_refused_not_waited_for(data, tmp_path, capsys):
    """train.use_gpu on a cluster without GPUs, or more workers than the cluster has CPUs: Ray Train's
    worker group timed out after 60 s and was started again for ever (its controller's retries have no
    limit, whatever --max-failures says); seen on this machine, still waiting after 200 s. The stage
    now stops before Ray Train starts, naming both counts."""
    import ray

    from meld.config import ConfigError, run_stage
    from ray_jobs.train import check_cluster_holds, main

    ensure_ray()  # a fixed 2-CPU cluster, no GPU
    cluster = ray.cluster_resources()
    assert cluster.get("GPU", 0) == 0, "this test needs a cluster without GPUs"
    on_gpus = {**TINY_PARAMS, "train": {**TINY_PARAMS["train"], "use_gpu": True}}
    capsys.readouterr()
    assert run_stage("train", lambda: main(_stage_argv(data, tmp_path, on_gpus))) == 1
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train: ")]  # Ray's own aside
    assert re.fullmatch(r"train: train.num_workers 2 with train.use_gpu true needs \{'GPU': 2.0\} \(one GPU per "
                        r"worker\), but the Ray cluster has \{'GPU': 0.0\}: lower train.num_workers, or set "
                        r"train.use_gpu: false .*", line), line
    assert not (tmp_path / "ray").exists() and not (tmp_path / "out" / "checkpoints").exists()

    # the rule itself, on CPUs: as many workers as CPUs fit; one more does not, unless the cluster can grow to it
    cpus = int(cluster["CPU"])
    train = {"num_workers": cpus + 1, "use_gpu": False}
    check_cluster_holds({**train, "num_workers": cpus}, {"CPU": float(cpus)}, cluster, can_grow=False)
    with pytest.raises(ConfigError, match=rf"needs \{{'CPU': {cpus + 1}.0\}} .* the Ray cluster has \{{'CPU': {cpus}"):
        check_cluster_holds(train, {"CPU": float(cpus + 1)}, cluster, can_grow=False)
    check_cluster_holds(train, {"CPU": float(cpus + 1)}, {"CPU": float(cpus + 8)}, can_grow=True)
