"""Ray Tune sweep over MELD's two knobs, the slowness-penalty weight and the frame rate.

Locally (what ``dvc repro tune`` runs through pipeline/tune.py)::

    python -m ray_jobs.tune --params params.yaml --features data/features --bpe data/bpe/bpe.model \
        --codebook data/codebook --out reports/tune.json --plot reports/tune.png

On a cluster (paths on shared storage, ``MLFLOW_TRACKING_URI`` from the environment)::

    ray job submit --working-dir . -- python -m ray_jobs.tune --params params.yaml ...

Layering (Ray Train V2): ``Tuner`` -> :func:`trial_driver` (a function trainable; builds the trial's
config and runs the TorchTrainer through :func:`ray_jobs.train.run_training`) -> ``train_worker``.
Train's reports reach Tune through ``TuneReportCallback``; ASHA stops the trials that fall behind.

The objective (``tune.metric``) is a teacher-forced squared error per element of the **ungrouped**
80-dim, 62.5 Hz frames of the dev split (:func:`ray_jobs.train.dev_metrics`). It is comparable across
frame rates because every trial is scored on the same frames in the same units, whatever r it predicts
them with; per second of audio it is the same number times 62.5 x 80, so the ranking is identical.
Cross-entropy is not comparable: r=1 and r=2 have different codebooks (80- vs 160-dim codes) and make
different numbers of predictions per second. The ``_greedy`` variants reconstruct from the model's own
most likely code at each step (it sees only past frames and the text, as when generating); the plain
ones use z sampled from q(z|x_t), which lets the target frame's own code into the prediction and so
favours r=1, whose codes describe one frame instead of two. ``dev/mse_post_greedy`` (after the post-net,
what the vocoder gets) is the objective for real sweeps; at smoke scale (tens of steps) the post-net's
batch-norm statistics have not settled and its eval-mode error swings by 10x between evaluations, so
the smoke params use ``dev/mse_pre_greedy``.

MLflow: one parent run ``tune-<system>``; every trial's training run is its child
(``mlflow.parentRunId``), with per-step losses and the dev metrics.

An interrupted sweep (Ctrl-C, ``ray job stop``, a lost driver) writes no report and resumes when the
same command runs again with the same inputs (:func:`sweep_fingerprint`): finished trials are kept,
unfinished ones continue from their own training checkpoints, under the same MLflow parent run.
Other inputs, or ``--restart``, start it over (a warning names what changed); how trials run
(:data:`RUN_ONLY_KEYS`) is not an input, nor is where the work directory lies: a moved one resumes
too. ASHA's rung records are kept in the work directory (:mod:`ray_jobs.asha`), so the trials that
resume are compared with every result reported before the interruption too, as in an uninterrupted
sweep. A trial whose loss turns non-finite errs alone (:func:`report_callback`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path

from meld.config import ConfigError, TuneConfig, mlflow_experiment
from ray_jobs.cluster import check_cluster_can_hold, cluster_limit
from ray_jobs.train import add_data_args

log = logging.getLogger("meld.tune")

def trial_name(system: str, reduction_factor: int, slowness_weight: float) -> str:
    """Stable, readable trial name (no timestamps): the trial's MLflow run and checkpoint folder."""
    return f"tune-{system}-r{reduction_factor}-sw{slowness_weight:g}"


def trial_overrides(tc: TuneConfig, reduction_factor: int, slowness_weight: float) -> dict:
    """The ``model``/``train`` overrides that make one trial."""
    train = {
        "loss_weights": {"slowness": float(slowness_weight)},
        "max_steps": tc.max_steps,
        "checkpoint_every": tc.eval_every,
        "num_workers": tc.num_workers_per_trial,
        "use_gpu": tc.gpus_per_worker > 0,
    }
    # the budget counts 62.5 Hz frames, so every frame rate sees the same audio per step (r=2 groups two frames)
    train["frames_per_batch"] = math.ceil(tc.frames_per_batch / reduction_factor)
    return {"model": {**tc.model_overrides, "reduction_factor": int(reduction_factor)}, "train": train}


def trial_resources(tc: TuneConfig) -> dict[str, float]:
    """What one running trial holds: its Train workers' CPUs (and GPUs), and one CPU for its driver
    (Ray Tune's default for a function trainable; the driver idles while the workers train)."""
    need = {"CPU": tc.num_workers_per_trial * tc.cpus_per_worker + 1}
    if tc.gpus_per_worker:
        need["GPU"] = tc.num_workers_per_trial * tc.gpus_per_worker
    return need


def trial_concurrency(tc: TuneConfig, cluster: dict[str, float]) -> int:
    """How many trials run at once: ``tune.max_concurrent_trials``, or with 0 ("no limit") as many as
    the ``cluster``'s resources (``ray.cluster_resources()``) hold whole, at least one. Tune reserves
    only a trial's driver, not the workers it starts later: unlimited, it started a driver on each of
    a 2-CPU machine's CPUs and no worker could ever start (WorkerGroupStartupTimeoutError, retried
    for ever)."""
    return tc.max_concurrent_trials or max(1, trials_that_fit(tc, cluster))


def trials_that_fit(tc: TuneConfig, cluster: dict[str, float]) -> int:
    """How many trials the ``cluster``'s resources hold whole, drivers and workers together (may be 0)."""
    # a hair over the quotient: 1.5 GPUs / 0.3 per trial is 4.999... in floating point
    return min(int(cluster.get(k, 0.0) / v + 1e-9) for k, v in trial_resources(tc).items())


def concurrency_warning(tc: TuneConfig, cluster: dict[str, float]) -> str | None:
    """What to say when ``tune.max_concurrent_trials`` asks for more trials at once than the cluster
    holds. Tune starts a trial's driver on one CPU before its workers: with more drivers than fit,
    they can take the CPUs every worker needs and no trial ever trains (a cluster that grows, an
    autoscaling one, may still make room, so it is a warning)."""
    fits = trials_that_fit(tc, cluster)
    if not tc.max_concurrent_trials or tc.max_concurrent_trials <= fits:
        return None
    need = trial_resources(tc)
    return (f"tune.max_concurrent_trials {tc.max_concurrent_trials}: the cluster's "
            f"{ {k: cluster.get(k, 0.0) for k in need} } hold {fits} trial(s) at once (a trial takes {need}: its "
            "workers' and one CPU for its driver); more drivers than that can leave no CPU for any worker, "
            "and the sweep waits for ever unless the cluster grows. Lower it, or set it to 0 to fit the cluster")


def check_a_trial_fits(tc: TuneConfig, cluster: dict[str, float], *, can_grow: bool) -> None:
    """Refuse a sweep whose one trial the ``cluster`` (:func:`ray_jobs.cluster.cluster_limit`) can never
    hold: Tune would keep the trial pending for ever, e.g. ``tune.gpus_per_worker: 1`` on a machine
    without a GPU.

    Raises:
        ConfigError: naming what a trial takes, from which settings, and what the cluster has.
    """
    gpus = f", tune.gpus_per_worker {tc.gpus_per_worker}" if tc.gpus_per_worker else ""
    check_cluster_can_hold(
        trial_resources(tc), cluster, can_grow=can_grow, what="one tune trial",
        why=f"tune.num_workers_per_trial {tc.num_workers_per_trial} x tune.cpus_per_worker {tc.cpus_per_worker}"
            f"{gpus}, and one CPU for its driver",
        remedy="lower tune.num_workers_per_trial or tune.cpus_per_worker"
               f"{', or set tune.gpus_per_worker: 0' if gpus else ''}",
        wait="Ray Tune would keep the trial waiting for ever")


class SweepInterrupted(RuntimeError):
    """The sweep stopped before every trial ended; its state is kept for the next run to resume."""


# tune keys that say how the trials run, not what they train: a change resumes the sweep, not restarts it.
# The trials' own settings follow them in every trial's training fingerprint (a switch between CPU and GPU
# is train.use_gpu there). max_failures and the resources reach each trial through trial_driver's setup,
# which a restored sweep is given anew; max_concurrent_trials is pickled in Tune's state, so a resumed sweep
# keeps the limit it started with (run_sweep says so).
RUN_ONLY_KEYS = ("max_concurrent_trials", "max_failures", "cpus_per_worker", "gpus_per_worker")


def sweep_fingerprint(params: dict, tc: TuneConfig, *, features: str, bpe: str, codebook: str, work_dir: Path,
                      project_root: str) -> str:
    """What makes two runs the same sweep (:func:`sweep_inputs`), hashed."""
    from meld.training import fingerprint

    return fingerprint(sweep_inputs(params, tc, features=features, bpe=bpe, codebook=codebook, work_dir=work_dir,
                                    project_root=project_root))


def sweep_inputs(params: dict, tc: TuneConfig, *, features: str, bpe: str, codebook: str, work_dir: Path,
                 project_root: str) -> dict:
    """What makes two runs the same sweep: the tune section but for :data:`RUN_ONLY_KEYS`, every trial's
    training fingerprint (its model, training settings, input bytes and training code), the dev split
    that scores it, this file and the scheduler's (ray_jobs/asha.py: its records must be read as they
    were written) and the MLflow experiment; as JSON values, kept in sweep.json to say what changed.
    Building each trial's config here also finds a missing codebook or dev split, or a system with no
    TTS objective, before Ray starts."""
    from ray_jobs.train import build_config, files_digest

    dev = Path(features) / "dev" / "index.jsonl"
    if not dev.is_file():
        raise FileNotFoundError(f"{dev.parent}: the sweep needs a dev split to score trials on")
    trials = {}
    for r in tc.reduction_factors:
        for w in tc.slowness_weights:
            name = trial_name(tc.system, r, w)
            try:
                config = build_config(
                    params, system=tc.system, features=features, bpe=bpe, codebook=codebook,
                    out=work_dir / "trials" / name, project_root=project_root,
                    overrides=trial_overrides(tc, r, w), threads_per_worker=tc.cpus_per_worker,
                )
            except ConfigError as err:  # a trial's settings are not the train section's: say which trial
                raise ConfigError(f"tune trial {name}: {err}") from err
            if config["train"]["task"] == "stt":  # its dev metrics, the objective, are TTS errors
                raise ValueError(f"tune.system {tc.system} trains STT only (train.task: stt): the sweep's "
                                 f"objective {tc.metric} is a TTS error it never reports; sweep a TTS or joint system")
            trials[name] = config["fingerprint"]
    return json.loads(json.dumps({  # tuples as lists: compared with what sweep.json gives back
        "tune": {k: v for k, v in tc.to_dict().items() if k not in RUN_ONLY_KEYS},
        "trials": trials,
        "dev": files_digest([dev]),
        "sweep_code": files_digest([Path(__file__), Path(__file__).with_name("asha.py")]),
        "experiment": mlflow_experiment(params),
    }))


def changed_inputs(before: dict | None, now: dict) -> str:
    """What differs between two :func:`sweep_inputs`, in words (``before``: from sweep.json)."""
    if not isinstance(before, dict):
        return "sweep.json does not record which"
    said = []
    old_tune, new_tune = before.get("tune") or {}, now["tune"]
    said += [f"tune.{k} {old_tune.get(k)!r} -> {new_tune.get(k)!r}" for k in sorted(set(old_tune) | set(new_tune))
             if old_tune.get(k) != new_tune.get(k)]
    old_trials = before.get("trials") or {}
    retrained = [n for n in now["trials"] if n in old_trials and old_trials[n] != now["trials"][n]]
    if retrained:
        shown = ", ".join(retrained[:4]) + (f" and {len(retrained) - 4} more" if len(retrained) > 4 else "")
        said.append(f"the model/train settings, input data or training code of trial(s) {shown}")
    if before.get("dev") != now["dev"]:
        said.append("the dev split's index")
    if before.get("sweep_code") != now["sweep_code"]:
        said.append("the sweep's code (ray_jobs/tune.py, ray_jobs/asha.py)")
    if before.get("experiment") != now["experiment"]:
        said.append(f"the MLflow experiment {before.get('experiment')!r} -> {now['experiment']!r}")
    return "; ".join(said) or "none of its recorded inputs, but the fingerprint's make-up"


def check_work_dir(work_dir: Path) -> None:
    """Refuse a ``--work-dir`` holding anything a sweep does not write there: a sweep that starts over
    deletes its work directory, and a mistyped one (``ray_results``, with the training runs' Ray state;
    the project root; a shared folder) would go with it. Raised before Ray starts; nothing is deleted."""
    from ray_jobs.cluster import SHARED_MARKER

    if not work_dir.exists():
        return
    if not work_dir.is_dir():
        raise ConfigError(f"--work-dir {work_dir} is a file, not a folder for the sweep's checkpoints and Ray state")
    ours = {"sweep.json", ASHA_RECORDS, "ray_tune", "ray_train", "trials"}  # see run_sweep
    foreign = sorted(p.name for p in work_dir.iterdir() if p.name not in ours and not p.name.startswith(SHARED_MARKER))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ConfigError(
            f"--work-dir {work_dir} holds {shown}, which no sweep wrote there; a sweep that starts over deletes its "
            "work directory, so it is refused: give the sweep a folder of its own (e.g. ray_results/tune)"
        )


def _resumable_parent(work_dir: Path, fp: str, experiment_dir: Path, mlflow, experiment_name: str,
                      inputs: dict | None = None) -> str | None:
    """The MLflow parent run of an interrupted sweep with this fingerprint, when Ray Tune can restore
    it; else None (and the reason is logged; ``inputs``, this run's :func:`sweep_inputs`, say what
    changed when the fingerprint did)."""
    from ray import tune

    state_file = work_dir / "sweep.json"
    if not state_file.is_file():
        return None
    try:
        state = json.loads(state_file.read_text())
    except ValueError:
        log.warning("%s is not valid JSON: starting the sweep over", state_file)
        return None
    if not isinstance(state, dict) or not isinstance(state.get("parent_run_id"), str):
        # written by hand or by something else: an AttributeError or KeyError here ended the sweep before
        log.warning("%s is not a sweep's state (a JSON object with its fingerprint and MLflow parent_run_id): "
                    "starting the sweep over", state_file)
        return None
    if state.get("fingerprint") != fp:
        # a warning, naming what changed: starting over deletes every finished trial (an INFO line was all
        # a lowered max_concurrent_trials got, when it was still part of the fingerprint)
        changed = changed_inputs(state.get("inputs"), inputs) if inputs is not None else "not compared"
        log.warning("the sweep in %s was started with other inputs (changed: %s): starting it over, which "
                    "deletes its trials and retrains them", work_dir, changed)
        return None
    if not tune.Tuner.can_restore(str(experiment_dir)):
        log.info("%s holds no sweep state Ray Tune can restore: starting the sweep over", experiment_dir)
        return None
    try:
        run = mlflow.tracking.MlflowClient().get_run(state["parent_run_id"])
    except Exception as e:  # another tracking store
        log.warning("the interrupted sweep's MLflow run %s is not in this store (%s): starting the sweep over",
                    state.get("parent_run_id"), str(e).splitlines()[0][:200])
        return None
    # get_run also finds a deleted run, or one of a deleted experiment, which start_run would refuse
    experiment = mlflow.get_experiment_by_name(experiment_name)
    if run.info.lifecycle_stage != "active" or experiment is None or run.info.experiment_id != experiment.experiment_id:
        log.warning("the interrupted sweep's MLflow run %s was deleted, or is not in experiment %s: starting the "
                    "sweep over", run.info.run_id, experiment_name)
        return None
    return state["parent_run_id"]


def _latest_write(directory: Path) -> float | None:
    """When anything under ``directory`` was last written (the time an interrupted attempt last did work)."""
    times = [f.stat().st_mtime for f in directory.rglob("*") if f.is_file()]
    return max(times) if times else None


def record_attempt(state_file: Path, started: float) -> list[dict]:
    """Append this attempt (started at ``started``) to the sweep's ``attempts`` in ``state_file`` and
    return them all. An earlier attempt that ended without saying when (SIGKILL, a lost node) is closed
    at the last write under its work directory, and marked as estimated."""
    state = json.loads(state_file.read_text())
    attempts = state.setdefault("attempts", [])
    if attempts and "seconds" not in attempts[-1]:
        ended = _latest_write(state_file.parent)
        attempts[-1]["seconds"] = round(max(0.0, (ended or attempts[-1]["started"]) - attempts[-1]["started"]), 1)
        attempts[-1]["estimated"] = True
    attempts.append({"started": round(started, 1)})
    state_file.write_text(json.dumps(state, indent=2) + "\n")
    return attempts


def close_attempt(state_file: Path, ended: float) -> list[dict]:
    """Give the running (last) attempt in ``state_file`` its duration; return every attempt."""
    state = json.loads(state_file.read_text())
    attempts = state["attempts"]
    attempts[-1]["seconds"] = round(ended - attempts[-1]["started"], 1)
    state_file.write_text(json.dumps(state, indent=2) + "\n")
    return attempts


NONFINITE_KEY = "nonfinite_step"  # ray_jobs/train.py's report when a run's loss turns NaN/inf


def report_callback(metric: str):
    """Ray Train's reports forwarded to Tune (``TuneReportCallback``), but for the one a run makes when its
    loss turns non-finite (``{"step", NONFINITE_KEY}``, no objective). Tune's strict metric check raised
    on that result inside its controller, so one diverging trial ended the whole sweep in a TuneError,
    on every rerun. The run ends right after that report and :func:`ray_jobs.train.run_training` raises
    NonFiniteLoss, so the trial errs with the reason. Only that report is held back: a result missing
    the objective for any other reason (a metric the runs never report) still stops the sweep at once."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class ObjectiveReports(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metrics and NONFINITE_KEY in metrics[0] and metric not in metrics[0]:
                return
            super().after_report(run_context, metrics, checkpoint)

    return ObjectiveReports()


def trial_driver(trial: dict, setup: dict) -> None:
    """One Tune trial: this trial's training config -> the TorchTrainer driver, reports forwarded to Tune."""
    from ray_jobs.train import build_config, run_training

    tc = TuneConfig.from_dict(setup["tune"], "tune")
    r, w = int(trial["reduction_factor"]), float(trial["slowness_weight"])
    name = trial_name(tc.system, r, w)
    config = build_config(
        setup["params"],
        system=tc.system,
        features=setup["features"],
        bpe=setup["bpe"],
        codebook=setup["codebook"],
        out=Path(setup["work_dir"]) / "trials" / name,
        project_root=setup["project_root"],
        overrides=trial_overrides(tc, r, w),
        threads_per_worker=tc.cpus_per_worker,
    )
    config["run_name"] = name
    config["parent_run_id"] = setup["parent_run_id"]
    config["mlflow_tracking_uri"] = setup["mlflow_tracking_uri"]  # the parent's store, not this actor's env
    config["mlflow_tags"] = {**setup["mlflow_tags"], "tune.trial": name}
    config["mlflow_params"] = {"tune": {"slowness_weight": w, "reduction_factor": r}}
    run_training(
        config,
        num_workers=tc.num_workers_per_trial,
        use_gpu=tc.gpus_per_worker > 0,
        storage_path=str(Path(setup["work_dir"]) / "ray_train"),
        max_failures=tc.max_failures,
        cpus_per_worker=tc.cpus_per_worker,
        gpus_per_worker=tc.gpus_per_worker or None,
        callbacks=[report_callback(tc.metric)],
    )


ASHA_RECORDS = "asha.jsonl"  # in the work directory: ASHA's rung records (ray_jobs/asha.py)


def experiment_path(tc: TuneConfig, work_dir: Path) -> Path:
    """Ray Tune's experiment folder of the sweep (``RunConfig(storage_path, name)``)."""
    return work_dir / "ray_tune" / f"tune-{tc.system}"


def asha(tc: TuneConfig, work_dir: Path, **metric_mode):
    """The sweep's ASHA, its rung records in the work directory (a new one reads those already there;
    restored from a moved work directory, it follows it: :class:`ray_jobs.asha.ResumableASHA`).
    Tune passes it the metric and mode of its TuneConfig; a copy read for the report is given them."""
    from ray_jobs.asha import ResumableASHA

    return ResumableASHA(work_dir / ASHA_RECORDS, key_params=("reduction_factor", "slowness_weight"),
                         time_attr="step", max_t=tc.max_steps, grace_period=tc.grace_period,
                         reduction_factor=tc.asha_reduction, experiment_dir=experiment_path(tc, work_dir),
                         **metric_mode)


def _asha_stops(records_file: Path) -> dict[tuple[int, float], set[int]]:
    """(r, w) -> the steps at which ASHA stopped that trial. Tune ends a trial the same way whether
    ASHA stopped it or a signal interrupted the sweep; this record tells the two apart."""
    from ray_jobs.asha import read_records

    stops: dict[tuple[int, float], set[int]] = {}
    for row in read_records(records_file):
        if row["stopped"]:
            knobs = row["config"]
            stops.setdefault((int(knobs["reduction_factor"]), float(knobs["slowness_weight"])), set()).add(row["step"])
    return stops


def _reports(result, metric: str) -> tuple[dict[int, float], int]:
    """The trial's reports, read once: the finite objective at each step that carried one, and the
    highest step any report carried, with or without a finite objective (0: none). An infinite one
    is left out like NaN: it is no score, and json.dumps would write it as ``Infinity``, not JSON."""
    df = result.metrics_dataframe
    if df is None or "step" not in df:
        return {}, 0
    steps = df["step"].dropna()
    last = int(steps.max()) if len(steps) else 0
    if metric not in df:
        return {}, last
    rows = df[["step", metric]].dropna()
    return {int(s): float(v) for s, v in zip(rows["step"], rows[metric]) if math.isfinite(v)}, last


def _history(reported: dict[int, float], logged: list[tuple[int, float]]) -> list[list[float]]:
    """The objective at each step the trial reported (``reported``, :func:`_reports`), once per step,
    by step.

    A trial resumed from a checkpoint reports that step again (ray_jobs/train.py), and a killed driver
    loses the results Tune received since it last saved them: ``logged``, the trial's MLflow history of
    the objective (rank 0 logs it before each checkpoint), fills in the steps up to the last one Tune
    has. Past it MLflow is not used: a trial ASHA stopped may have trained and logged on while it was
    being stopped. A NaN or infinite value MLflow holds is left out, as in ``reported``: those are
    exactly the steps Tune's results lack, so it would fill them in (bare ``NaN`` in the report)."""
    last = max(reported, default=0)
    filled = {s: v for s, v in logged if s <= last and math.isfinite(v)} | reported
    return [[s, v] for s, v in sorted(filled.items())]


def collect_trials(grid, tc: TuneConfig, work_dir: Path, client=None) -> list[dict]:
    """One row per trial: its knobs, objective (value at its last reported step), steps, status and
    MLflow run; ``client`` (an MlflowClient of the sweep's store) fills its history (:func:`_history`).

    Status: ``completed`` (trained ``max_steps``), ``error``, ``early_stopped`` (ASHA stopped it:
    the scheduler's record) or ``unfinished`` (neither: the sweep was interrupted)."""
    stopped = _asha_stops(work_dir / ASHA_RECORDS)
    rows = []
    for result in grid:
        cfg = result.config or {}
        r, w = int(cfg["reduction_factor"]), float(cfg["slowness_weight"])
        name = trial_name(tc.system, r, w)
        id_file = work_dir / "trials" / name / "checkpoints" / "mlflow_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else None
        logged = ([(m.step, m.value) for m in client.get_metric_history(run_id, tc.metric)]
                  if client is not None and run_id else [])
        reported, last = _reports(result, tc.metric)
        history = _history(reported, logged)
        steps = history[-1][0] if history else 0
        objective = history[-1][1] if history else None
        if result.error is None and last > steps:
            # its last report carried no finite objective (a NaN one, which the history leaves out): the
            # trial ended there, not at its last finite step. Judged at the last step, ASHA's stop (recorded
            # at that step) and the full budget are recognised; read at the earlier step, the trial was
            # "unfinished" and the sweep ended in SweepInterrupted on every run. Its objective is unknown.
            steps, objective = last, None
        if result.error is not None:
            status = "error"
        elif steps >= tc.max_steps:
            status = "completed"
        elif steps in stopped.get((r, w), ()):  # stopped where its history ends, not trained on past the stop
            status = "early_stopped"
        else:
            status = "unfinished"
        rows.append(
            {
                "trial": name,
                "config": {"slowness_weight": w, "reduction_factor": r},
                "objective": objective,
                "steps": steps,
                "status": status,
                "error": str(result.error).strip().splitlines()[-1][:500]
                if result.error is not None
                else None,
                "history": history,
                "mlflow_run_id": run_id,
            }
        )
    return sorted(rows, key=lambda t: (t["config"]["reduction_factor"], t["config"]["slowness_weight"]))


def best_trial(trials: list[dict]) -> dict | None:
    """Lowest objective among the trials that trained the full budget (ASHA compares equal budgets);
    among all scored trials when none did. A NaN or infinite objective (a diverged trial) is not a
    score: min() over a list holding NaN answers by position, not by value."""
    scored = [t for t in trials if t["objective"] is not None and math.isfinite(t["objective"])]
    full = [t for t in scored if t["status"] == "completed"]
    pool = full or scored
    return min(pool, key=lambda t: t["objective"]) if pool else None


def plot_trials(trials: list[dict], metric: str, path: Path):
    """Objective vs slowness weight, one line per frame rate; hollow markers: stopped early by ASHA,
    crosses: the trial's training failed (its last objective); both annotated with their step.
    Saves the plot to ``path`` and returns the (closed) figure so that callers can inspect it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in sorted({t["config"]["reduction_factor"] for t in trials}):
        pts = sorted(
            (t["config"]["slowness_weight"], t["objective"], t["status"], t["steps"])
            for t in trials
            if t["config"]["reduction_factor"] == r and t["objective"] is not None
        )
        if not pts:
            continue
        (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", label=f"r={r} ({62.5 / r:.1f} Hz)")
        for w, v, status, steps in pts:
            full = status == "completed"
            failed = status == "error"  # not ASHA's doing: a cross, not a hollow circle
            ax.plot(
                [w], [v], "x" if failed else "o", color=line.get_color(),
                markerfacecolor=line.get_color() if full or failed else "none",
            )
            if not full:
                ax.annotate(f"error at {steps}" if failed else f"{steps}", (w, v), textcoords="offset points",
                            xytext=(4, 4), fontsize=7)
    ax.set_xlabel("slowness penalty weight")
    ax.set_ylabel(f"{metric} (per 80-dim frame element)")
    ax.set_title("MELD sweep (hollow: stopped early by ASHA, x: failed; at the step shown)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return fig


def sweep_storage(work_dir: Path, *, features: str, bpe: str, codebook: str, out: Path, plot: Path,
                  tracking_uri: str) -> dict:
    """What :func:`ray_jobs.cluster.check_shared_storage` checks for a sweep: the work directory (every trial's
    checkpoints, written by its rank 0 on any node and read by the sweep's driver; Ray's run storage), a local
    MLflow store (each trial's rank 0 logs to it), the inputs every worker reads, and the reports."""
    read = {"--features": Path(features) / "train" / "index.jsonl", "--bpe": Path(bpe), "--codebook": Path(codebook)}
    return {"written": {"--work-dir": work_dir}, "read": read, "driver_only": {"--out": out, "--plot": plot},
            "tracking_uri": tracking_uri}


def run_sweep(
    params: dict,
    *,
    features: str,
    bpe: str,
    codebook: str,
    out: Path,
    plot: Path,
    work_dir: Path,
    project_root: str = ".",
    restart: bool = False,
) -> dict:
    """Run the whole sweep, or resume an interrupted one with the same fingerprint (``restart``: never);
    writes ``out`` (JSON) and ``plot``; returns the report. Raises :class:`SweepInterrupted`, and
    writes nothing, when the sweep stops before every trial has ended."""
    import ray
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler

    from meld import tracking
    from meld.training import fingerprint
    from ray_jobs.cluster import check_shared_storage, init_ray

    tc = TuneConfig.from_dict(params.get("tune"), "tune")
    if tc.system not in (params.get("systems") or [tc.system]):
        log.warning("tune.system %s is not among the trained systems", tc.system)
    work_dir = work_dir.resolve()
    check_work_dir(work_dir)
    inputs = sweep_inputs(params, tc, features=features, bpe=bpe, codebook=codebook, work_dir=work_dir,
                          project_root=project_root)
    fp = fingerprint(inputs)
    # locally, room for the trials that run at once (one with max_concurrent_trials 0: as many as fit)
    init_ray(
        num_cpus=None
        if tc.gpus_per_worker
        else max(os.cpu_count() or 1, max(1, tc.max_concurrent_trials) * trial_resources(tc)["CPU"])
    )
    # on several nodes, the trials' checkpoints, Ray's run storage and the inputs must be where every node
    # sees them; refused now, before anything is written or cleared, not at a trial's first checkpoint hours
    # in (Ray checks its storage only then)
    check_shared_storage(**sweep_storage(work_dir, features=features, bpe=bpe, codebook=codebook, out=out, plot=plot,
                                         tracking_uri=tracking.tracking_uri(project_root)))
    # refused before the work dir is cleared: a trial no node can hold pends for ever
    limit, can_grow = cluster_limit()
    check_a_trial_fits(tc, limit, can_grow=can_grow)
    experiment = mlflow_experiment(params)
    mlflow = tracking.setup(experiment, project_root)
    experiment_dir = experiment_path(tc, work_dir)
    parent_id = None if restart else _resumable_parent(work_dir, fp, experiment_dir, mlflow, experiment, inputs)
    if parent_id is None and work_dir.exists():  # scratch: trial checkpoints and Ray state of another sweep
        trials_dir = work_dir / "trials"
        gone = sorted(p.name for p in trials_dir.iterdir()) if trials_dir.is_dir() else []
        if gone:
            log.warning("deleting the earlier sweep's %d trial folder(s) in %s (%s) and its Ray state",
                        len(gone), trials_dir, ", ".join(gone))
        shutil.rmtree(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    cluster = ray.cluster_resources()
    concurrent = trial_concurrency(tc, cluster)
    if not tc.max_concurrent_trials:
        need = trial_resources(tc)
        log.info("tune.max_concurrent_trials 0 (no limit): %d trial(s) at once, as many as the cluster's %s hold "
                 "(a trial takes %s: its workers' and one CPU for its driver)", concurrent,
                 {k: cluster.get(k, 0.0) for k in need}, need)
    elif warning := concurrency_warning(tc, cluster):
        log.warning(warning)
    t0 = time.time()
    state_file = work_dir / "sweep.json"
    run_settings = {**{k: getattr(tc, k) for k in RUN_ONLY_KEYS}, "trials_at_once": concurrent}
    if parent_id is not None:
        _say_run_settings_changed(json.loads(state_file.read_text()).get("run") or {}, run_settings)
    tags = {"meld.stage": "tune", "meld.system": tc.system,
            **tracking.run_tags(params, project_root, source="ray_jobs/tune.py")}
    with mlflow.start_run(run_id=parent_id, run_name=None if parent_id else f"tune-{tc.system}",
                          tags=tags) as parent:
        if parent_id is None:
            mlflow.log_params(tracking.flatten({"tune": tc.to_dict()}))
            state = {"fingerprint": fp, "parent_run_id": parent.info.run_id, "inputs": inputs, "run": run_settings}
            state_file.write_text(json.dumps(state, indent=2) + "\n")
        else:
            log.info("resuming the interrupted sweep in %s (MLflow run %s)", experiment_dir, parent_id)
        record_attempt(state_file, t0)
        setup = {
            "params": params,
            "tune": tc.to_dict(),
            "features": str(Path(features).resolve()),
            "bpe": str(Path(bpe).resolve()),
            "codebook": str(Path(codebook).resolve()),
            "work_dir": str(work_dir),
            "project_root": str(Path(project_root).resolve()),
            "parent_run_id": parent.info.run_id,
            "mlflow_tracking_uri": mlflow.get_tracking_uri(),
            "mlflow_tags": tags,
        }
        scheduler = asha(tc, work_dir) if tc.scheduler == "asha" else FIFOScheduler()
        # A trial (Tune's default: 1 CPU) only runs the driver; the Train workers request their own CPUs/GPUs,
        # and the concurrency limit (trial_concurrency) keeps Tune from starting more than the cluster holds.
        trainable = tune.with_parameters(trial_driver, setup=setup)
        if parent_id is not None:
            # errored trials too: a trial killed with its driver (OOM, lost node) errs, and resumes from its checkpoint
            # (a work directory moved since: Tune moves its trials along, and ASHA its records with them)
            tuner = tune.Tuner.restore(str(experiment_dir), trainable, resume_errored=True)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space={
                    "slowness_weight": tune.grid_search(list(tc.slowness_weights)),
                    "reduction_factor": tune.grid_search(list(tc.reduction_factors)),
                },
                tune_config=tune.TuneConfig(
                    metric=tc.metric,
                    mode="min",
                    scheduler=scheduler,
                    max_concurrent_trials=concurrent,
                ),
                run_config=tune.RunConfig(
                    name=f"tune-{tc.system}", storage_path=str(work_dir / "ray_tune"), verbose=1
                ),
            )
        grid = tuner.fit()
        trials = collect_trials(grid, tc, work_dir, mlflow.tracking.MlflowClient())
        unfinished = [t["trial"] for t in trials if t["status"] == "unfinished"]
        if unfinished:  # Ray Tune returns, instead of raising, when a signal stops the sweep
            close_attempt(state_file, time.time())
            mlflow.end_run("KILLED")
            raise SweepInterrupted(
                f"the sweep stopped with {len(unfinished)} of {len(trials)} trials unfinished ({', '.join(unfinished)}); "
                f"nothing was written to {out}. Its state is kept in {work_dir}: run the same command again to "
                "resume it (--restart starts it over)"
            )
        best = best_trial(trials)
        _close_children(mlflow, trials)
        attempts = close_attempt(state_file, time.time())
        report = {
            "system": tc.system,
            "objective": {
                "metric": tc.metric,
                "mode": "min",
                "definition": f"{tc.metric}: dev-split MSE per element of ungrouped 80-dim 62.5 Hz frames "
                "(normalised log-mel), teacher-forced; "
                + ("before" if "_pre" in tc.metric else "after")
                + " the post-net; "
                + (
                    "the model's own most likely code at each step"
                    if tc.metric.endswith("greedy")
                    else "code sampled from q(z|x) of the target frame"
                ),
            },
            "search_space": {
                "slowness_weight": list(tc.slowness_weights),
                "reduction_factor": list(tc.reduction_factors),
            },
            "scheduler": {
                "name": tc.scheduler,
                "time_attr": "step",
                "max_t": tc.max_steps,
                "grace_period": tc.grace_period,
                "reduction_factor": tc.asha_reduction,
                # each rung's trials, the objective a further trial would need there, and whom it stopped
                **({"rungs": asha(tc, work_dir, metric=tc.metric, mode="min").summary()}
                   if tc.scheduler == "asha" else {}),
            },
            "budget": {
                "max_steps": tc.max_steps,
                "frames_per_batch_62_5hz": tc.frames_per_batch,
                "workers_per_trial": tc.num_workers_per_trial,
            },
            "best": best,
            "best_config": best["config"] if best else None,
            "best_objective": best["objective"] if best else None,
            "trials": trials,
            "mlflow_parent_run_id": parent.info.run_id,
            # a resumed sweep's cost is every attempt's, not only the last one's
            "wall_seconds": round(sum(a["seconds"] for a in attempts), 1),
            "attempts": attempts,
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")  # whole or not at all: the report stage trusts it
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        tmp.replace(out)
        plot_trials(trials, tc.metric, plot)
        mlflow.log_metric("tune/trials", len(trials))
        mlflow.log_metric("tune/early_stopped", sum(t["status"] == "early_stopped" for t in trials))
        if best is not None:
            mlflow.log_metric("best/objective", best["objective"])
            # tags, not params: a resumed sweep that retried an errored trial may find another best, and
            # MLflow refuses to change a logged param
            mlflow.set_tags({f"best.{k}": v for k, v in best["config"].items()})
        mlflow.log_artifact(str(out))
        mlflow.log_artifact(str(plot))
    return report


def _say_run_settings_changed(started: dict, now: dict) -> None:
    """Log which of the sweep's :data:`RUN_ONLY_KEYS` differ from those it started with (``started``,
    from sweep.json): the resumed sweep keeps its trials, and uses the new values where it can."""
    for key in RUN_ONLY_KEYS:
        if key != "max_concurrent_trials" and key in started and started[key] != now[key]:
            log.info("tune.%s %r -> %r since the sweep started: the trials that start or resume now use %r",
                     key, started[key], now[key], now[key])
    if "trials_at_once" in started and started["trials_at_once"] != now["trials_at_once"]:
        # Tuner.restore brings back the TuneConfig the sweep started with (its searcher, which applies the
        # limit to the trials it has yet to start, is built from it); Tune takes no new one on restore
        log.warning("the resumed sweep starts its remaining trials %d at a time, as when it started: Ray Tune keeps "
                    "the limit a sweep began with (tune.max_concurrent_trials %d here would be %d). --restart "
                    "applies it, and retrains every trial", started["trials_at_once"], now["max_concurrent_trials"],
                    now["trials_at_once"])


def _close_children(mlflow, trials: list[dict]) -> None:
    """A trial ASHA stopped was killed mid-run: end its MLflow run as KILLED (not left RUNNING)."""
    client = mlflow.tracking.MlflowClient()
    for t in trials:
        if not t["mlflow_run_id"]:
            continue
        run = client.get_run(t["mlflow_run_id"])
        client.set_tag(t["mlflow_run_id"], "tune.status", t["status"])
        if run.info.status == "RUNNING":
            client.set_terminated(
                t["mlflow_run_id"], "KILLED" if t["status"] == "early_stopped" else "FAILED"
            )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    env = os.environ.get
    add_data_args(p)
    p.add_argument("--out", default=env("MELD_TUNE_OUT", "reports/tune.json"))
    p.add_argument("--plot", default=env("MELD_TUNE_PLOT", "reports/tune.png"))
    p.add_argument(
        "--work-dir",
        default=env("MELD_TUNE_WORK", "ray_results/tune"),
        help="trial checkpoints and Ray state: an interrupted sweep resumes from them; wiped when a sweep "
        "with other inputs starts",
    )
    p.add_argument("--restart", action="store_true",
                   help="start the sweep over even when an interrupted one with the same inputs could resume")
    p.add_argument("--project-root", default=env("MELD_PROJECT_ROOT", "."))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from meld.config import read_params

    try:
        report = run_sweep(
            read_params(args.params),
            features=args.features,
            bpe=args.bpe,
            codebook=args.codebook,
            out=Path(args.out),
            plot=Path(args.plot),
            work_dir=Path(args.work_dir),
            project_root=args.project_root,
            restart=args.restart,
        )
    except SweepInterrupted as e:
        print(f"tune: {e}", file=sys.stderr)
        return 130
    best = report["best"]
    if best is None:
        print("no trial produced an objective; see", args.out)
        return 1
    print(
        f"best: {best['config']} {report['objective']['metric']}={best['objective']:.4f} "
        f"({best['steps']} steps); wrote {args.out} and {args.plot}"
    )
    return 0


if __name__ == "__main__":
    from meld.config import run_stage

    sys.exit(run_stage("tune", main))
