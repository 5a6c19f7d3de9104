"""Ray Train driver and worker for every system: the same code runs locally and on a cluster.

Locally (what ``dvc repro`` runs through pipeline/train.py)::

    python -m ray_jobs.train --params params.yaml --system meld --features data/features \
        --bpe data/bpe/bpe.model --codebook data/codebook --out models/meld

On a cluster (docs/scaling.md): data on shared storage, paths and the MLflow server from the
environment (``MELD_FEATURES``, ``MELD_BPE``, ``MELD_CODEBOOK``, ``MELD_OUT``, ``MELD_RAY_STORAGE``,
``MLFLOW_TRACKING_URI``); ``ray job submit`` sets ``RAY_ADDRESS``, so the driver joins the cluster::

    ray job submit --working-dir . -- python -m ray_jobs.train --params configs/paper.yaml --system meld

Layering: ``train_worker`` (one per Ray worker, a thin wrapper around meld.training.train_step)
-> ``run_training`` (builds the TorchTrainer) -> the Tune driver (ray_jobs/tune.py) over run_training.

Faults: ``FailureConfig(max_failures)`` restarts a failed worker group, and every worker resumes
from the newest loadable checkpoint (its own folder or the one Ray persisted); a non-finite loss
stops every rank at the same step (no retry: it would only repeat) and keeps the last good checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from ray_jobs.cluster import check_cluster_can_hold, check_shared_storage, cluster_limit, init_ray

# The training loop reports through this logger, not print(): in a Ray Train worker, Ray 2.60's
# print patch both tees a print to the (wrapped) stdout and logs it to the console handler, so every
# printed line reached the driver twice; a logged line reaches it once (and the worker's app log).
log = logging.getLogger("meld.train")

KEEP_CHECKPOINTS = 2

# Keys of config["test_hooks"], used by tests/test_faults.py only (never set from params.yaml):
#   crash_after_step: N  -> rank `crash_rank` (default 1, or 0 with one worker) calls os._exit(1) once right after
#                           step N (and its checkpoint, if N is a checkpoint step); `crash_marker` (a file path)
#                           makes it happen once: the file is written just before the exit.
#   nan_at_step: N       -> rank `nan_rank` (default 0) fills its weights with NaN before step N (a loss that blew up).
#   error_at_step: N     -> rank 0 raises RuntimeError before step N (any bug or data error in the loop).
NONFINITE_MARKER = "NONFINITE.json"  # written by rank 0 when the loss became NaN/inf; read by run_training

TEST_HOOK_KEYS = {"crash_after_step", "crash_rank", "crash_marker", "nan_at_step", "nan_rank", "error_at_step"}


STAGING_PREFIX = ".ray-staging-"  # a checkpoint handed to ray.train.report, linked in a folder of its own


def _prune(folder: Path, keep: int) -> None:
    """Keep the newest ``keep`` training checkpoints; remove the partial ``step-<N>.pt.tmp<pid>`` a writer
    killed mid-write left (rank 0 alone writes here, and its own write has ended: any such file is dead)."""
    from meld.training import step_checkpoints

    for _, p in step_checkpoints(folder)[:-keep]:
        p.unlink(missing_ok=True)
    for p in Path(folder).glob("step-*.pt.tmp*"):
        if re.fullmatch(r"step-\d+\.pt\.tmp\d+", p.name):
            p.unlink(missing_ok=True)
    # a report's staging folder a kill left (a hard link: it would keep a pruned checkpoint's bytes alive)
    for p in Path(folder).glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(p, ignore_errors=True)


def set_aside_checkpoints(ckpt_dir: Path, their_fingerprint: str | None) -> Path:
    """Move a folder's training checkpoints into ``stale/<their fingerprint>/`` under it: a run of
    another configuration neither resumes them nor deletes them (a changed parameter must not cost
    an interrupted run its checkpoints; delete the folder to free the space). Returns that folder."""
    from meld.training import step_checkpoints

    stale = ckpt_dir / "stale" / (their_fingerprint or "unknown")
    stale.mkdir(parents=True, exist_ok=True)
    for _, old in step_checkpoints(ckpt_dir):
        old.replace(stale / old.name)
    return stale


def dev_metrics(model, data, batches: list[list[int]], frames: list[int], device, seed: int = 0) -> dict[str, float]:
    """Teacher-forced reconstruction error on held-out utterances, comparable across frame rates.

    Predictions are ungrouped to 80-dim frames at 62.5 Hz and compared with the real frames only
    (the zero padding that grouping adds to an odd-length utterance is not counted), so r=1 and
    r=2 models are scored on the same frames, in the same units (normalised log-mel, squared).

    Args:
        model: the unwrapped MELD model.
        data: a :class:`meld.store.TrainingData` over the dev split.
        batches: lists of utterance indices.
        frames: real (ungrouped) frame count of every utterance.

    Returns:
        MSE per element of the 80-dim frames (``dev/frames`` of them):
        ``dev/mse_{pre,post}_greedy``: before / after the post-net, with the model's own most likely code
        at every step (it sees only past frames and the text, as when generating) — the Tune objective;
        ``dev/mse_{pre,post}``: the same with z sampled from q(z|x_t) as in training (the target frame's
        own code leaks into the prediction: a bound, not a generation proxy).
        NaN when no frame was scored (no batches: every dev utterance was longer than the frame budget).
    """
    import torch

    from meld.models.layers import ungroup_frames

    r = model.frame_dim // 80
    g = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    sums = dict.fromkeys(("pre", "post", "pre_greedy", "post_greedy"), 0.0)
    n_elems = 0
    captured: dict = {}
    handle = model.head.register_forward_hook(lambda _m, inputs, _o: captured.__setitem__("h", inputs[0]))
    codes = slice(model.vocab.code_offset, model.vocab.code_offset + model.vocab.n_codes)
    try:
        with torch.no_grad():
            for idx in batches:
                batch = {k: v.to(device) for k, v in data.batch(idx).items()}
                out = model.forward_tts(batch["text"], batch["text_len"], batch["mel"], batch["mel_len"], g)
                T = batch["mel"].shape[1]
                z_hat = out.logits[:, :T, codes].argmax(-1)  # (B, T) the model's own code per step
                pre = model.reconstruct(captured["h"][:, :T], z_hat, encoder_dropout=False)  # (B, T, 80r)
                preds = {"pre": out.mel_pre, "post": out.mel_post,
                         "pre_greedy": pre, "post_greedy": model.postnet(pre, out.frame_mask)}
                target = ungroup_frames(batch["mel"].float(), r)  # (B, T*r, 80)
                real = torch.tensor([frames[i] for i in idx], device=device)
                mask = torch.arange(target.shape[1], device=device)[None, :] < real[:, None]  # (B, T*r)
                for key, pred in preds.items():
                    err = (ungroup_frames(pred.float(), r) - target).pow(2) * mask[..., None]
                    sums[key] += float(err.sum())
                n_elems += int(real.sum()) * target.shape[-1]
    finally:
        handle.remove()
        model.train(was_training)
    # no frame scored (every dev utterance longer than the frame budget): no measurement, not the perfect 0.0
    # a sweep would have ranked first
    out_metrics = {f"dev/mse_{k}": v / n_elems if n_elems else float("nan") for k, v in sums.items()}
    out_metrics["dev/frames"] = float(n_elems // 80)
    return out_metrics


def _resume_state(ckpt_dir: Path, fingerprint: str, rank: int) -> tuple[dict | None, str]:
    """Newest loadable checkpoint of this configuration: the run's own folder or the one Ray persisted.

    Ray's copy (``ray.train.get_checkpoint()``, in the run's storage path) is what a restarted worker on
    another node sees; the folder is what the train stage exports from. Checkpoints of another
    configuration (fingerprint) are not resumed; rank 0 sets the folder's aside
    (:func:`set_aside_checkpoints`).

    Both candidates are mapped, not read: every rank resumes, and each read the whole of both files
    (weights and optimiser moments, ~2.2 GB each for the paper's model) to keep one. Mapped, a rank
    reads the pages of the one it loads, from the page cache its node's other ranks share.
    """
    import ray.train

    from meld.training import latest_good_checkpoint

    candidates = []
    local = latest_good_checkpoint(ckpt_dir, mmap=True)
    if local is not None:
        candidates.append((local, str(ckpt_dir)))
    ray_ckpt = ray.train.get_checkpoint()
    if ray_ckpt is not None:
        with ray_ckpt.as_directory() as d:
            remote = latest_good_checkpoint(d, mmap=True)
        if remote is not None:
            candidates.append((remote, f"Ray checkpoint {ray_ckpt.path}"))
    good = [(s, where) for s, where in candidates if s["extra"].get("fingerprint") == fingerprint]
    if len(good) < len(candidates):
        log.warning("not resuming the checkpoints in %s: they belong to another configuration", ckpt_dir)
        if rank == 0 and local is not None and local["extra"].get("fingerprint") != fingerprint:
            stale = set_aside_checkpoints(ckpt_dir, local["extra"].get("fingerprint"))
            log.warning("moved them to %s (delete that folder to free the space)", stale)
    if not good:
        return None, ""
    return max(good, key=lambda c: int(c[0]["step"]))


def _finite_checked(module_cls):
    """A LossModule whose forward makes every rank agree on finiteness before any backward.

    A NaN in one rank's batch would otherwise leave the other ranks waiting in DDP's gradient
    all-reduce; with one all-reduced flag every rank raises NonFiniteLoss at the same step.
    """
    import torch
    import torch.distributed as dist

    from meld.training import NonFiniteLoss

    class FiniteCheckedLoss(module_cls):
        def forward(self, batch, task):
            # NaN input frames (which the features stage should have rejected) would fail inside the model with
            # an unrelated error on one rank; they stop the run like a NaN loss instead (integer codes can't be NaN).
            # Two host reads per step, whatever the number of inputs and losses: one before the model runs, one
            # for this rank's and every rank's verdict on the losses.
            floats = [v for v in batch.values() if v.is_floating_point()]
            inputs_ok = not floats or bool(torch.stack([torch.isfinite(v).all() for v in floats]).all())
            losses = self.model.compute_losses(batch, task) if inputs_ok else {}
            local_bad = (torch.stack([~torch.isfinite(v.detach()).all() for v in losses.values()]).any()
                         if losses else torch.tensor(not inputs_ok, device=batch["text"].device))
            bad = local_bad.float().reshape(1)
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                bad = bad.clone()
                dist.all_reduce(bad)  # the number of ranks with a problem
            local_flag, ranks_bad = torch.cat([local_bad.float().reshape(1), bad]).tolist()
            if ranks_bad:
                if not inputs_ok:
                    raise NonFiniteLoss("non-finite values in this rank's input frames")
                detail = {k: float(v.detach()) for k, v in losses.items()} if local_flag else "on another rank"
                raise NonFiniteLoss(f"non-finite loss ({detail})")
            return losses

    return FiniteCheckedLoss


def non_finite_utterances(batch: dict, ids: list[str]) -> list[str]:
    """The ids of a batch's utterances (row ``b`` of every input is ``ids[b]``) whose frames hold NaN or
    inf: what a NonFiniteLoss from bad inputs must name, so that the features can be found and mended."""
    import torch

    bad = torch.zeros(len(ids), dtype=torch.bool)
    for v in batch.values():
        if v.is_floating_point():
            bad |= ~torch.isfinite(v).reshape(len(ids), -1).all(dim=1).cpu()
    return [u for u, b in zip(ids, bad.tolist()) if b]


def _from_every_rank(items: list) -> list:
    """Every rank's ``items``, rank 0's first. A collective: every rank must call it."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return items
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, items)
    return [x for part in gathered for x in part]


def node_threads(cpus: int | None, workers_on_node: int) -> int:
    """Torch threads for each of a run's ``workers_on_node`` workers on a node with ``cpus`` cores: the
    node's cores shared among them, at least one. Counted on the worker's own node: the driver may run
    on a small head node while the workers train on large ones."""
    return max(1, (cpus or 1) // max(1, workers_on_node))


def format_metrics(metrics: dict) -> str:
    """A progress line's ``name=value`` pairs, four significant digits each."""
    return " ".join(f"{k}={v:.4g}" for k, v in metrics.items())


def train_worker(config: dict) -> None:
    """One Ray Train worker: data shard, DDP model, train_step loop, checkpoints, dev metrics, MLflow (rank 0)."""
    import numpy as np
    import ray.train
    import ray.train.torch
    import torch

    from meld.models.builders import build_model
    from meld.store import (
        CodeStore,
        CodeTrainingData,
        FeatureStore,
        FrameBudgetSampler,
        TrainingData,
        load_stats,
    )
    from meld.text import BPETokenizer
    from meld.training import (
        LossModule,
        NonFiniteLoss,
        build_optimizer,
        build_scheduler,
        load_checkpoint,
        restore_training_state,
        save_checkpoint,
        train_step,
        write_checkpoint_state,
    )

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # a Tune trial passes tune.cpus_per_worker, a number that may be fractional: whole threads, at least one
    given = config["threads_per_worker"]
    torch.set_num_threads(max(1, int(given)) if given else node_threads(os.cpu_count(), ctx.get_local_world_size()))
    tc = config["train"]
    system, r = config["system"], config["reduction_factor"]
    device = ray.train.torch.get_device()
    hooks = dict(config.get("test_hooks") or {})
    unknown_hooks = set(hooks) - TEST_HOOK_KEYS
    if unknown_hooks:
        raise ValueError(f"unknown test hook(s) {sorted(unknown_hooks)}; known: {sorted(TEST_HOOK_KEYS)}")

    tokenizer = BPETokenizer(config["bpe_model"])
    if config.get("data_kind") == "codes":  # Codec-LM: DAC codes; the budget counts its delayed steps
        # each utterance read is checked against the codebook (microseconds): a store changed after the
        # driver's scan is named in the worker's error, not an embedding IndexError
        mk = config["model_kwargs"]
        data = CodeTrainingData(CodeStore(config["train_store"], mk["n_levels"], mk["codebook_size"]), tokenizer)
    else:
        stats = load_stats(config["stats"])
        data = TrainingData(FeatureStore(config["train_store"]), stats, tokenizer, r)
    sampler = FrameBudgetSampler(data.lengths(), tc["frames_per_batch"], rank, world, tc["seed"],
                                 tc["max_skipped_fraction"])
    dev = None  # dev reconstruction metrics: MELD systems (they have a codebook) doing TTS
    if rank == 0 and scores_dev(config):
        dev_store = FeatureStore(config["eval_store"])
        dev_data = TrainingData(dev_store, stats, tokenizer, r)
        batches, _ = dev_batches(dev_data.lengths(), tc["frames_per_batch"])  # the left-out ones said by the driver
        dev = (dev_data, batches, dev_store.lengths)

    # the initial weights from train.seed, not from whatever the Ray worker process's global
    # generator held: unseeded, two runs of one configuration trained different models
    # (tests/test_faults.py), so a DVC rerun did not reproduce its stage. Every rank builds the same
    # model; DDP would broadcast rank 0's anyway.
    torch.manual_seed(tc["seed"])
    model = build_model(system, config["model_kwargs"])
    if "codebook" in config:
        model.set_codebook(torch.from_numpy(np.load(config["codebook"])))
    # on its device before the optimiser exists: Optimizer.load_state_dict puts a resumed run's moments
    # on the device the parameters have then, and prepare_model's later move would leave them on the
    # CPU while the (fused) AdamW step runs on the GPU
    model.to(device)
    module = _finite_checked(LossModule)(model)
    ckpt_dir = Path(config["checkpoint_dir"])
    state, source = _resume_state(ckpt_dir, config["fingerprint"], rank)
    use_gpu = device.type == "cuda"
    optimizer = build_optimizer(model, tc["lr"], tc["weight_decay"], fused=use_gpu)
    scheduler = build_scheduler(optimizer, tc["warmup_steps"], tc["hold_steps"], tc["decay_steps"])
    step = 0
    resumed = state is not None
    if resumed:
        step = restore_training_state(state, model, optimizer, scheduler)
        sampler.load_state_dict(state["sampler"])
        log.info(f"[rank {rank}] resuming {system} from step {step} ({source})")
        if rank == 0 and source != str(ckpt_dir):  # Ray's copy: the stage exports from the folder
            write_checkpoint_state(ckpt_dir / f"step-{step}.pt", state)
    elif tc.get("init_from"):  # weights only: the optimiser and schedule start afresh
        # mapped: of a training checkpoint only the weights are read, not the optimiser's two copies more
        model.load_state_dict(load_checkpoint(tc["init_from"], mmap=True)["model"])
        if "codebook" in config:  # this run's data decides what the codes mean
            model.set_codebook(torch.from_numpy(np.load(config["codebook"])))
        log.info(f"[rank {rank}] {system} starts from the weights of {tc['init_from']}")
    # not held for the rest of the run: the weights and moments live in the model and optimiser now (held,
    # a run read into memory kept a second copy of both, ~2.2 GB per rank for the paper's model). On a CPU
    # the optimiser's moments are the mapped file's pages themselves (Optimizer.load_state_dict casts
    # without copying), written over privately at the first step; the file stays mapped until the run ends.
    state = None
    last_ckpt_step = step if resumed else None
    # parameters a task leaves unused (MELD's recon/postnet under STT, dMel's text head under TTS)
    # must be declared to DDP; each model says whether its task reaches every one
    # (tests/test_ddp_parameters.py checks the declarations against the gradients)
    parallel = {} if model.uses_every_parameter(tc["task"]) else {"find_unused_parameters": True}
    module = ray.train.torch.prepare_model(module, parallel_strategy_kwargs=parallel)
    autocast = torch.bfloat16 if (use_gpu and tc["bf16"]) else None

    mlflow = _open_mlflow_run(config, ckpt_dir, resumed_at=step if resumed else None,
                              sampler=sampler) if rank == 0 else None
    # steps the interrupted attempt logged already, which this one would log again (the same values)
    run_id = mlflow.active_run().info.run_id if rank == 0 and resumed else None
    logged = {p: logged_until(mlflow, run_id, p) if run_id else 0 for p in ("loss/", "dev/")}

    def dev_report(step: int, log_to_mlflow: bool = True) -> dict:
        """Rank 0's dev metrics (MELD only), logged to MLflow unless told not to; {} elsewhere."""
        if rank != 0 or dev is None or tc["task"] == "stt" or not hasattr(model, "codebook"):
            return {}
        dev_m = dev_metrics(model, dev[0], dev[1], dev[2], device, seed=tc["seed"])
        if log_to_mlflow:
            mlflow.log_metrics(dev_m, step=step)
        log.info(f"[{system}] step {step} {format_metrics(dev_m)}")
        return dev_m

    def report(step: int, metrics: dict, path: Path | None) -> None:
        """Every rank reports; rank 0 attaches the checkpoint file ``path`` (staged in a folder of its own)."""
        ray_ckpt, tmp = None, None
        try:
            if rank == 0 and path is not None:
                # staged beside the checkpoint, as a hard link: no copy. In /tmp it was a whole copy wherever
                # the folder is on another file system (always on a cluster, whose checkpoints lie on shared
                # storage): gigabytes per checkpoint in a /tmp that may be RAM, and one too small failed the
                # worker at every checkpoint, each retry leaving its partial copy behind
                tmp = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=path.parent))
                try:
                    os.link(path, tmp / path.name)
                except OSError:  # a file system without hard links
                    shutil.copy(path, tmp)
                ray_ckpt = ray.train.Checkpoint.from_directory(str(tmp))
            ray.train.report({"step": step, **metrics}, checkpoint=ray_ckpt)
        finally:
            if tmp is not None:  # report() has copied it into the run's storage
                shutil.rmtree(tmp, ignore_errors=True)

    def checkpoint(step: int, metrics: dict) -> None:
        path = None
        if rank == 0:
            metrics = {**metrics, **dev_report(step, log_to_mlflow=step > logged["dev/"])}
            path = save_checkpoint(ckpt_dir / f"step-{step}.pt", system=system, model=model,
                                   model_kwargs=config["model_kwargs"], optimizer=optimizer, scheduler=scheduler,
                                   step=step, sampler_state=sampler.state_dict(),
                                   extra={"fingerprint": config["fingerprint"]})
            _prune(ckpt_dir, KEEP_CHECKPOINTS)
        report(step, metrics, path)

    pace = Pace(step, tc["max_steps"])
    try:
        if resumed:
            # A resumed run reports its checkpoint's step again (the same dev metrics, from the same weights;
            # MLflow has them already) for a caller that lost that report in the interrupt. A Tune trial's ASHA
            # then judges the rung at the rung's own step: resumed at step 8 without it, a trial trained on and
            # was judged for rung 8 at step 12. A run that had already ended trains nothing below, and
            # reports the checkpoint it ended on with it (a trial whose final report was lost stayed unfinished).
            kept = ckpt_dir / f"step-{step}.pt"
            ended = rank == 0 and step >= tc["max_steps"] and kept.is_file()
            report(step, dev_report(step, log_to_mlflow=False), kept if ended else None)
        metrics: dict = {}
        batches = iter(sampler)
        while step < tc["max_steps"]:
            task = tc["task"]
            if task == "joint":
                task = "tts" if step < tc["stt_warmup_steps"] else "joint"
            idx = next(batches)
            # dropout and masking draws seeded by (seed, rank, step): distinct per rank, and a run resumed
            # from a checkpoint draws what the uninterrupted run drew (tests/test_faults.py compares weights)
            torch.manual_seed(tc["seed"] * 100_003 + rank * 7919 + step)
            batch = {k: v.to(device) for k, v in data.batch(idx).items()}
            if hooks.get("error_at_step") == step + 1 and rank == 0:
                raise RuntimeError(f"test hook: error before step {step + 1}")
            if hooks.get("nan_at_step") == step + 1 and rank == hooks.get("nan_rank", 0):
                with torch.no_grad():  # test hook: this rank's weights blow up
                    for p in model.parameters():
                        p.fill_(float("nan"))
            try:
                metrics = train_step(module, optimizer, scheduler, batch, task=task,
                                     loss_weights=tc["loss_weights"], grad_clip=tc["grad_clip"], autocast_dtype=autocast)
            except NonFiniteLoss as err:
                # rank 0 writes the message, so every rank's unreadable utterances are gathered to it
                bad = _from_every_rank(non_finite_utterances(batch, [data.store.index[i]["id"] for i in idx]))
                what = (f"non-finite values in the input frames of utterance(s) {', '.join(bad[:10])}"
                        f"{f' and {len(bad) - 10} more' if len(bad) > 10 else ''} of {config['train_store']}"
                        if bad else str(err))
                kept = f"step {last_ckpt_step}" if last_ckpt_step is not None else "none yet"
                msg = (f"{system}: {what} at step {step + 1}; training stopped. The last good checkpoint ({kept}) "
                       f"stays in {ckpt_dir}")
                log.error(f"[rank {rank}] {msg}")
                if rank == 0:
                    mlflow.set_tag("failure", msg[:5000])
                    mlflow.end_run(status="FAILED")
                    (ckpt_dir / NONFINITE_MARKER).write_text(json.dumps({"step": step + 1, "message": msg}))
                # every rank gets here at the same step (FiniteCheckedLoss), so this collective report completes;
                # returning instead of raising keeps FailureConfig from retrying a run that would only fail again
                ray.train.report({"step": step, "nonfinite_step": step + 1})
                return
            step += 1
            if rank == 0 and logs_at(step, tc["max_steps"], tc["log_every"]):
                speed = pace.update(step)
                if step > logged["loss/"]:
                    mlflow.log_metrics({**metrics, **speed}, step=step)
                log.info(f"[{system}] step {step}/{tc['max_steps']} {format_metrics(metrics)} {pace.describe(step)}")
            if step % tc["checkpoint_every"] == 0 or step == tc["max_steps"]:
                checkpoint(step, metrics)
                last_ckpt_step = step
            if hooks.get("crash_after_step") == step and rank == hooks.get("crash_rank", min(1, world - 1)):
                marker = Path(hooks["crash_marker"])
                if not marker.exists():  # test hook: this worker process dies once, as a killed node would
                    marker.write_text(str(step))
                    log.warning(f"[rank {rank}] test hook: worker process exits after step {step}")
                    os._exit(1)
    except BaseException as err:  # any other failure: the run must not stay RUNNING in the MLflow UI
        if rank == 0 and mlflow.active_run() is not None:
            mlflow.set_tag("failure", f"{type(err).__name__}: {err}"[:5000])
            mlflow.end_run(status="FAILED")
        raise
    if rank == 0:
        mlflow.end_run()


def logs_at(step: int, max_steps: int, log_every: int) -> bool:
    """Whether rank 0 logs the training metrics after ``step``: the first, every ``log_every``-th and the
    last (without it a 16-step run logging every 10 ended its MLflow curves, and its run-table row, at step 10)."""
    return step == 1 or step % log_every == 0 or step == max_steps


class Pace:
    """Training speed and time left, from the steps this process has run (not those a resumed run
    inherited): what a log line needs to say when a 200k-step run will end."""

    def __init__(self, start_step: int, max_steps: int):
        self.start_step, self.max_steps = start_step, max_steps
        self.t0 = time.perf_counter()
        self.s_per_step: float | None = None

    def update(self, step: int) -> dict[str, float]:
        """Measure at ``step``; returns the MLflow metrics (``train/s_per_step``) once there is a step."""
        done = step - self.start_step
        if done <= 0:
            return {}
        self.s_per_step = (time.perf_counter() - self.t0) / done
        return {"train/s_per_step": self.s_per_step}

    def describe(self, step: int) -> str:
        if self.s_per_step is None:
            return ""
        left = round((self.max_steps - step) * self.s_per_step)
        return f"({self.s_per_step:.3g} s/step, {left // 3600}:{left % 3600 // 60:02d}:{left % 60:02d} left)"


def _open_mlflow_run(config: dict, ckpt_dir: Path, *, resumed_at: int | None, sampler):
    """Rank 0's MLflow run: resumed when the checkpoint folder names one, else a new one (nested under a parent).

    A resumed run logs ``train/resume_step`` (the checkpoint's step) at that step, so restarts show in its history,
    and an earlier attempt's ``failure`` tag becomes ``resumed_after``. A new run ends the folder's old one as
    KILLED if a kill left it RUNNING (:func:`_end_replaced_run`).
    """
    from meld import tracking

    if config.get("mlflow_tracking_uri"):  # the driver's store, wherever this worker runs
        os.environ["MLFLOW_TRACKING_URI"] = config["mlflow_tracking_uri"]
    mlflow = tracking.setup(config["experiment"], config["project_root"])
    id_file = ckpt_dir / "mlflow_run_id"
    named = id_file.read_text().strip() if id_file.is_file() else None
    run_id = named if resumed_at is not None else None
    tags = dict(config.get("mlflow_tags") or {})
    if run_id is not None and not _run_is_live(mlflow, run_id):
        # the checkpoint's run is not in this store (MLFLOW_TRACKING_URI changed between attempts) or was
        # deleted: start_run failed inside the worker with "Run not found", on every one of Ray's retries.
        # Training goes on from the checkpoint into a new run, which names the one it continues
        recorded = tracking.recorded_run(id_file)
        where = recorded[0] if recorded and recorded[0] else "a store it did not record"
        log.warning(f"MLflow run {run_id} of checkpoint folder {ckpt_dir} is not in {mlflow.get_tracking_uri()} "
                    f"(it was logged to {where}, or deleted): the resumed training logs to a new run")
        tags["meld.continues_run"] = f"{run_id} ({where})"
        run_id = None
    if config.get("parent_run_id"):
        tags["mlflow.parentRunId"] = config["parent_run_id"]
    run = mlflow.start_run(run_id=run_id, run_name=config["run_name"], tags=tags or None)
    # the store beside the id: evaluate, run from another directory, finds the run in it (tracking.run_store)
    tracking.record_run(id_file, run.info.run_id, mlflow.get_tracking_uri())
    if named and run_id is None:
        _end_replaced_run(mlflow, named, run.info.run_id)
    if run_id is not None and "failure" in run.data.tags:
        # an earlier attempt's (SIGINT: "SystemExit: 1"), which this one recovers from: a run that then
        # finishes must not read as failed; the interruption stays on record under another name
        mlflow.set_tag("resumed_after", run.data.tags["failure"])
        mlflow.delete_tag("failure")
    if run_id is None:
        # the reduction factor (frame rate) is not among every system's constructor arguments: logged
        # beside them, so that runs can be filtered and compared by it in the MLflow UI
        model = {**config["model_kwargs"], "reduction_factor": config["reduction_factor"]}
        mlflow.log_params(tracking.flatten({"system": config["system"], "train": config["train"], "model": model,
                                            **(config.get("mlflow_params") or {})}))
        mlflow.log_metric("data/padding_fraction", sampler.padding_fraction())
        skipped = config.get("skipped_too_long") or []
        mlflow.log_metric("data/skipped_too_long", len(skipped))
        if skipped:
            mlflow.log_dict(skipped, "data/skipped_too_long.json")
        dev_skipped = config.get("dev_skipped_too_long") or []
        mlflow.log_metric("data/dev_skipped_too_long", len(dev_skipped))
        if dev_skipped:
            mlflow.log_dict(dev_skipped, "data/dev_skipped_too_long.json")
    if resumed_at is not None:
        mlflow.log_metric("train/resume_step", resumed_at, step=resumed_at)
    return mlflow


def _run_is_live(mlflow, run_id: str) -> bool:
    """Whether ``run_id`` is in the current tracking store and not deleted (MLflow refuses to reopen a deleted run)."""
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.tracking.MlflowClient().get_run(run_id).info.lifecycle_stage != "deleted"
    except MlflowException:
        return False


def logged_until(mlflow, run_id: str, prefix: str) -> int:
    """The last step at which a run has metrics whose keys start with ``prefix`` (``loss/``, ``dev/``), 0 if none.

    A run resumed from the checkpoint at step s retrains steps s+1.. that the interrupted attempt may
    have logged already; logged again, MLflow keeps both values at one step, and every loss curve of a
    run that survived a node loss zig-zags back over its last stretch. The resumed run is bit-identical
    to the uninterrupted one (tests/test_faults.py), so the values already there are the ones it would log.
    Asked per prefix: the losses of a checkpoint step are logged before its (slow) dev pass, and an attempt
    killed inside that pass has the step's losses but not its dev point, which the next one must log.
    """
    client = mlflow.tracking.MlflowClient()
    keys = [k for k in client.get_run(run_id).data.metrics if k.startswith(prefix)]
    return max((m.step for k in keys for m in client.get_metric_history(run_id, k)), default=0)


def _end_replaced_run(mlflow, old_id: str, new_id: str) -> None:
    """The run the checkpoint folder named, which the new run does not continue (its checkpoints were set
    aside as another configuration's, or it was killed before its first): a kill left it RUNNING, and
    nothing would ever end it. Ended as KILLED, with a tag naming the run that replaced it."""
    from mlflow.exceptions import MlflowException

    client = mlflow.tracking.MlflowClient()
    try:
        old = client.get_run(old_id)
    except MlflowException:  # in another tracking store: nothing of ours to end
        return
    # a run the user deleted (a killed run cleaned up in the UI) takes no writes: MLflow refuses them, and
    # the refusal here cost the attempt one of Ray's retries (which then reopened the new run as resumed)
    if old.info.status == "RUNNING" and old.info.lifecycle_stage != "deleted":
        try:
            client.set_tag(old_id, "replaced_by", new_id)
            client.set_terminated(old_id, status="KILLED")
        except MlflowException as err:  # bookkeeping of another run: never worth this run's attempt
            log.warning(f"could not end the replaced MLflow run {old_id} as KILLED: {err}")


def run_training(
    config: dict,
    *,
    num_workers: int,
    use_gpu: bool,
    storage_path: str,
    max_failures: int = 2,
    cpus_per_worker: float | None = None,
    gpus_per_worker: float | None = None,
    callbacks: list | None = None,
):
    """Build and fit the TorchTrainer for one system; returns the Ray Result.

    Args:
        config: the worker config (:func:`build_config`).
        num_workers, use_gpu: the DDP world (one process per GPU on a cluster).
        storage_path: where Ray persists checkpoints and run state (shared storage on a cluster).
        max_failures: worker-group restarts before giving up; each resumes from the last checkpoint.
        cpus_per_worker, gpus_per_worker: resources per worker (default: Ray's, 1 CPU / 1 GPU).
        callbacks: Ray Train callbacks, e.g. Tune's TuneReportCallback.

    Raises:
        NonFiniteLoss: the loss became NaN/inf (the last good checkpoint stays in config["checkpoint_dir"]).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from meld.training import NonFiniteLoss

    marker = Path(config["checkpoint_dir"]) / NONFINITE_MARKER
    marker.unlink(missing_ok=True)  # from an earlier attempt
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=config,
        scaling_config=scaling_config(num_workers, use_gpu, cpus_per_worker, gpus_per_worker),
        run_config=RunConfig(
            name=config["run_name"],  # stable: a restarted run finds its own checkpoints
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS),
            callbacks=callbacks,
        ),
    )
    try:
        result = trainer.fit()
    except BaseException as err:
        _mark_mlflow_run_failed(config, err)
        mendable = workers_input_error(err)
        if mendable is not None:  # the workers' own one line, not Ray's traceback of every worker
            raise mendable from err
        raise
    if getattr(result, "error", None) is not None:
        _mark_mlflow_run_failed(config, result.error)
    if marker.is_file():
        raise NonFiniteLoss(json.loads(marker.read_text())["message"])
    return result


def workers_input_error(err: BaseException) -> BaseException | None:
    """The input error (:data:`meld.config.INPUT_ERRORS`: a corrupt store, a missing file) that every
    failed worker of a Ray Train run raised, lowest rank first, when that is what ended the run; else None.

    Ray Train hands the driver a WorkerGroupError holding each failed worker's exception: raised as it
    is, a stage ended in a traceback of every worker around the one line that says what to mend."""
    from meld.config import is_input_error

    failures = getattr(err, "worker_failures", None)
    if not isinstance(failures, dict) or not failures:
        return None
    errors = [failures[rank] for rank in sorted(failures)]
    return errors[0] if all(isinstance(e, BaseException) and is_input_error(e) for e in errors) else None


def scaling_config(num_workers: int, use_gpu: bool, cpus_per_worker: float | None = None,
                   gpus_per_worker: float | None = None):
    """The Ray Train ``ScalingConfig`` of a run (default resources per worker: Ray's, 1 CPU, or 1 GPU)."""
    from ray.train import ScalingConfig

    resources = {}
    if cpus_per_worker is not None:
        resources["CPU"] = cpus_per_worker
    if use_gpu and gpus_per_worker is not None:
        resources["GPU"] = gpus_per_worker
    return ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources or None)


def check_cluster_holds(train: dict, need: dict[str, float], cluster: dict[str, float], *, can_grow: bool) -> None:
    """Refuse a run whose workers the cluster can never hold at once (``need``: the ScalingConfig's
    ``total_resources``; ``cluster``: :func:`ray_jobs.cluster.cluster_limit`). Ray Train would wait for them
    for ever: its worker group times out after 60 s and is started again without end (the controller's
    retries are unlimited, whatever ``max_failures`` says), e.g. ``train.use_gpu: true`` on a machine
    without a GPU.

    Raises:
        ConfigError: naming what the workers need and what the cluster has.
    """
    check_cluster_can_hold(
        need, cluster, can_grow=can_grow,
        what=f"train.num_workers {train['num_workers']} with train.use_gpu {str(train['use_gpu']).lower()}",
        why="one GPU per worker" if train["use_gpu"] else "one CPU per worker",
        remedy=f"lower train.num_workers{', or set train.use_gpu: false' if train['use_gpu'] else ''}",
        wait="Ray Train would wait for the missing workers for ever")


def _training_run(config: dict):
    """(MLflow client of the store this run logs to, the run's id), or None before rank 0 opened a run."""
    id_file = Path(config["checkpoint_dir"]) / "mlflow_run_id"
    if not id_file.is_file():
        return None
    from mlflow.tracking import MlflowClient

    from meld import tracking

    uri = config.get("mlflow_tracking_uri") or tracking.tracking_uri(config["project_root"])
    return MlflowClient(uri), id_file.read_text().strip()


def _mark_mlflow_run_failed(config: dict, err: BaseException) -> None:
    """The driver's side of a failed run: a worker killed by Ray never ends its MLflow run, which
    would stay RUNNING; mark it FAILED (if it is still running) with the error."""
    try:
        run = _training_run(config)
        if run is None:
            return
        client, run_id = run
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_tag(run_id, "failure", f"{type(err).__name__}: {err}"[:5000])
            client.set_terminated(run_id, status="FAILED")
    except Exception as mark_err:  # the training error matters more than this bookkeeping
        log.warning("could not mark the MLflow run of %s FAILED: %s", config["checkpoint_dir"], mark_err)


def _merge(base: dict, over: dict) -> dict:
    """Recursive dict update (``loss_weights`` overrides keep the weights they don't name)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build_config(
    params: dict,
    *,
    system: str,
    features: str | Path,
    bpe: str | Path,
    codebook: str | Path,
    out: str | Path,
    project_root: str | Path = ".",
    overrides: dict | None = None,
    threads_per_worker: int | None = None,
    codes: str | Path | None = None,
) -> dict:
    """Resolve params, paths and sizes into the plain dict every worker receives.

    Args:
        params: the whole params file; ``model`` and ``train`` updated by the ``<system>`` section.
        features, codebook: the feature store and k-means codebooks (mel systems).
        codes: the DAC code store written by the codes stage (codec_lm only, which trains on codes
            instead of mel features).
        overrides: ``{"model": {...}, "train": {...}}`` on top of those (a Tune trial's knobs).
        threads_per_worker: torch threads per worker (default: each worker's node's cores shared among
            the run's workers on that node, counted on that node: :func:`node_threads`).
    """
    import numpy as np
    import torch

    from meld import tracking
    from meld.config import (
        CodecLMConfig,
        ConfigError,
        ModelConfig,
        TrainConfig,
        mlflow_experiment,
        section_mapping,
    )
    from meld.models.builders import NEEDS_CODEBOOK, SYSTEM_TASKS, build_model, system_kwargs
    from meld.text import BPETokenizer
    from meld.training import fingerprint

    if system != "meld" and system not in params:
        # the top-level model and train sections are MELD's: without its own section a baseline trains
        # with MELD's loss weights, each of its own losses at weight 1 (MELLE's KL at 1, not 0.1)
        raise ConfigError(f"params: no '{system}' section; every system but meld needs one (its task, loss weights "
                          "and args: params.yaml and configs/paper.yaml have one for each)")
    section = section_mapping(params.get(system), system)
    if system == "codec_lm":  # its section also names the codec behind the code store
        CodecLMConfig.from_dict(section, system)
    else:
        unknown = sorted(set(section) - {"model", "train", "args"})
        if unknown:
            raise ConfigError(f"params section '{system}': unknown key(s) {unknown}; known: ['args', 'model', 'train']")
    model_d = _merge(section_mapping(params.get("model"), "model"),
                     section_mapping(section.get("model"), f"{system}.model"))
    train_d = _merge(section_mapping(params.get("train"), "train"),
                     section_mapping(section.get("train"), f"{system}.train"))
    if overrides:
        model_d = _merge(model_d, overrides.get("model") or {})
        train_d = _merge(train_d, overrides.get("train") or {})
    model_cfg = ModelConfig.from_dict(model_d, "model")
    train_cfg = TrainConfig.from_dict(train_d, "train")
    if system in SYSTEM_TASKS and train_cfg.task not in SYSTEM_TASKS[system]:
        raise ConfigError(f"params: {system} trains task {' or '.join(SYSTEM_TASKS[system])}, but its train.task is "
                          f"{train_cfg.task!r} (set it in the '{system}' section; the top-level train section's "
                          "task applies to a system without one)")
    features = Path(features).resolve()
    codebook_file = n_codes = None
    if system in NEEDS_CODEBOOK:  # only MELD systems have a k-means codebook
        codebook_file = Path(codebook).resolve() / f"r{model_cfg.reduction_factor}.npy"
        if not codebook_file.is_file():
            raise FileNotFoundError(f"{codebook_file}: no codebook for reduction factor {model_cfg.reduction_factor} "
                                    "(add it to codebook.reduction_factors)")
        n_codes = int(np.load(codebook_file, mmap_mode="r").shape[0])
    n_text = BPETokenizer(str(bpe)).vocab_size
    try:  # a misspelt args key (or a value the constructor refuses) fails here, not in every Ray worker
        kwargs = system_kwargs(system, model_cfg, n_text=n_text, codebook_size=n_codes, args=section.get("args"))
        with torch.device("meta"):  # the constructor's own checks, without allocating a weight
            build_model(system, kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"params section '{system}': {system} cannot be built from its args "
                          f"{section.get('args') or {}} and the model section: {err}") from err
    out = Path(out).resolve()
    _check_out_is_this_systems(out, system)
    train = train_cfg.to_dict()
    train["loss_weights"] = dict(train["loss_weights"])
    if train_cfg.init_from:
        train["init_from"] = str(_check_init_from(train_cfg.init_from, system, kwargs, out / "checkpoints"))
    if system == "codec_lm":
        data = _code_data(codes, kwargs)
        data_id = [files_digest([Path(data["train_store"]) / "index.jsonl", Path(bpe)]), data["codec"]["state_sha256"]]
    else:
        dev = features / "dev"
        data = {
            "stats": str(features / "stats.json"),
            "train_store": str(features / "train"),
            "eval_store": str(dev) if (dev / "index.jsonl").is_file() else None,
        }
        data_id = files_digest([features / "train" / "index.jsonl", features / "stats.json", Path(bpe),
                                 *([codebook_file] if codebook_file else [])])
    config = {
        "system": system,
        "model_kwargs": kwargs,
        "reduction_factor": model_cfg.reduction_factor,
        "train": train,
        "bpe_model": str(Path(bpe).resolve()),
        **data,
        **({"codebook": str(codebook_file)} if codebook_file else {}),
        "checkpoint_dir": str(out / "checkpoints"),
        "experiment": mlflow_experiment(params),
        "run_name": f"train-{system}",
        "project_root": str(Path(project_root).resolve()),
        # absolute: a worker on another node, or in another folder, must log to the driver's store
        "mlflow_tracking_uri": tracking.tracking_uri(project_root),
        "threads_per_worker": threads_per_worker,  # None: the worker counts its own node's cores
    }
    check_frame_budget(config)
    _warn_past_schedule(train)
    # how often a run logs or saves does not change what it trains: changing it resumes, not restarts
    trajectory = {k: v for k, v in train.items() if k not in ("log_every", "checkpoint_every", "max_skipped_fraction")}
    # the starting weights' bytes, not only their path: init_from overwritten with other weights is another
    # run (with the path alone, a rerun resumed the old weights' finished run and exported it again)
    init_id = {"init_from": files_digest([Path(train["init_from"])])} if train_cfg.init_from else {}
    config["fingerprint"] = fingerprint(
        {"system": system, "model_kwargs": kwargs, "train": trajectory, "data": data_id, "code": _code_digest(),
         **init_id}
    )
    return config


def dev_batches(lengths: list[int], budget: int) -> tuple[list[list[int]], list[int]]:
    """The dev split cut for scoring: length-sorted batches of utterance indices, each within ``budget``
    Transformer steps per batch, and the indices of the utterances longer than the budget alone (not
    scored)."""
    skipped = [i for i, n in enumerate(lengths) if n > budget]
    batches, current = [], []
    for i in sorted((i for i, n in enumerate(lengths) if n <= budget), key=lambda i: lengths[i]):
        if current and lengths[i] * (len(current) + 1) > budget:
            batches.append(current)
            current = []
        current.append(i)
    return batches + ([current] if current else []), skipped


def scores_dev(config: dict) -> bool:
    """Whether the run scores the dev split (rank 0, every ``eval_every``): MELD systems (they have a
    codebook) doing TTS, where a dev split exists."""
    return bool(config.get("eval_store")) and "codebook" in config and config["train"]["task"] != "stt"


def check_frame_budget(config: dict) -> None:
    """Cut the train split into the batches every worker's FrameBudgetSampler cuts, before Ray starts:
    too many utterances longer than ``train.frames_per_batch``, or fewer batches than workers, failed
    inside every worker, was retried ``max_failures`` times and ended in a 100-line WorkerGroupError.
    Only the split's index is read, and a Codec-LM store's codes, scanned for values outside the codebook.
    The utterances the budget leaves out (within
    ``train.max_skipped_fraction``) are said here and listed in ``config["skipped_too_long"]``
    ({id, frames, reason} rows), which the run logs to MLflow and the exported model.pt keeps. Dev
    utterances the budget leaves unscored are said too and listed in ``config["dev_skipped_too_long"]``
    (logged to MLflow): every dev metric is over the others, NaN when none is left.

    Raises:
        ConfigError: the sampler's own message, with the split and its longest utterance.
        StoreError: the train split's index or data file is unreadable, or a code lies outside the codebook.
    """
    from meld.config import ConfigError
    from meld.store import CodeStore, FeatureStore, FrameBudgetSampler, delayed_lengths, grouped_lengths

    tc = config["train"]
    if config.get("data_kind") == "codes":
        n_levels = config["model_kwargs"]["n_levels"]
        store = CodeStore(config["train_store"], n_levels, config["model_kwargs"]["codebook_size"])
        # every code the run will read, checked here, once: in a worker a code outside the codebook was an
        # IndexError or a CUDA device assert naming nothing (a code of N: no error, it trained as <EOS>), and
        # a worker's error reaches this driver only after max_failures retries (as one line:
        # workers_input_error). The scan reads the whole codes.i16 (960 h of LibriSpeech, 4 GB: 0.3 s from
        # the page cache, docs/results.md); the index is parsed once, for it and the budget
        store.check_codes()
        lengths = delayed_lengths(store.lengths, n_levels)
    else:
        store = FeatureStore(config["train_store"])
        lengths = grouped_lengths(store.lengths, config["reduction_factor"])
    try:
        sampler = FrameBudgetSampler(lengths, tc["frames_per_batch"], 0, tc["num_workers"], tc["seed"],
                                     tc["max_skipped_fraction"])
    except ValueError as err:
        raise ConfigError(f"{config['train_store']}: {err} (its longest utterance counts {max(lengths, default=0)} "
                          "frames; a sweep trial's budget is tune.frames_per_batch / its reduction factor)") from err
    reason = f"longer than the frame budget ({tc['frames_per_batch']} frames per batch)"
    config["skipped_too_long"] = [{"id": store.index[i]["id"], "frames": lengths[i], "reason": reason}
                                  for i in sampler.skipped]
    if sampler.skipped:
        ids = ", ".join(row["id"] for row in config["skipped_too_long"][:5])
        print(f"train: {len(sampler.skipped)} of {len(lengths)} utterance(s) left out, {reason}: {ids}"
              f"{', ...' if len(sampler.skipped) > 5 else ''} (listed in the run's data/skipped_too_long.json in "
              "MLflow, and in the model.pt a train stage exports)", file=sys.stderr, flush=True)
    config["dev_skipped_too_long"] = []
    if scores_dev(config):
        dev = FeatureStore(config["eval_store"])
        dev_lengths = grouped_lengths(dev.lengths, config["reduction_factor"])
        kept, skipped = dev_batches(dev_lengths, tc["frames_per_batch"])
        config["dev_skipped_too_long"] = [{"id": dev.index[i]["id"], "frames": dev_lengths[i], "reason": reason}
                                          for i in skipped]
        if skipped:
            ids = ", ".join(row["id"] for row in config["dev_skipped_too_long"][:5])
            outcome = "every dev metric is NaN" if not kept else "the dev metrics are over the others"
            print(f"train: {len(skipped)} of {len(dev_lengths)} dev utterance(s) not scored, {reason}: {ids}"
                  f"{', ...' if len(skipped) > 5 else ''}; {outcome} (listed in the run's "
                  "data/dev_skipped_too_long.json in MLflow)", file=sys.stderr, flush=True)


def _warn_past_schedule(train: dict) -> None:
    """The learning rate reaches 0 at the end of warm-up + hold + decay: a longer run trains its last
    steps at rate 0, which nothing else shows but a flat loss."""
    end = train["warmup_steps"] + train["hold_steps"] + train["decay_steps"]
    if train["decay_steps"] > 0 and train["max_steps"] > end:
        log.warning("max_steps %d runs past the learning-rate schedule (warmup_steps + hold_steps + decay_steps = %d): "
                    "its last %d steps train at learning rate 0", train["max_steps"], end, train["max_steps"] - end)


def files_digest(paths: list[Path]) -> str:
    """SHA-256 over the bytes of a run's input files (the train split's index, the normalisation
    statistics, the BPE model, the codebook): a checkpoint trained on other inputs is not resumed.
    The frames themselves are not read (tens of GB at LibriSpeech scale); new frames come with a
    new index or new statistics."""
    import hashlib

    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def _code_digest(root: Path | None = None) -> str:
    """SHA-256 over the code training runs: this driver and every module it imports, followed through
    meld/ and ray_jobs/ (:func:`meld.codedeps.code_closure`, the rule dvc.yaml's train deps are held
    to). After a code change that made DVC rerun the train stage, a finished run's checkpoint must not
    be resumed and exported as if it were the new code's model; a change to code training does not run
    (the evaluation, the CLI, the corpus) leaves an interrupted run resumable.

    ``root``: the repository (default: this checkout)."""
    from meld.codedeps import REPO_ROOT, code_closure

    root = root or REPO_ROOT
    return files_digest(sorted(code_closure(root / "ray_jobs" / "train.py", root)))


def _check_out_is_this_systems(out: Path, system: str) -> None:
    """Refuse an output folder that holds another system's model.pt or training checkpoints. One folder
    for two systems (e.g. ``MELD_OUT`` in a runtime env shared by the jobs of several systems, as
    docs/scaling.md's env holds it for ``--system meld``) had the second system set the first's
    checkpoints aside, prune or be pruned by them when both ran, and export over its model.pt."""
    from meld.config import ConfigError
    from meld.training import CheckpointError, latest_good_checkpoint, load_checkpoint

    found = []
    if (out / "model.pt").is_file():
        try:
            found.append((load_checkpoint(out / "model.pt", mmap=True)["system"], out / "model.pt"))
        except CheckpointError:  # unreadable: nothing to keep; the export replaces it
            pass
    newest = latest_good_checkpoint(out / "checkpoints", mmap=True)
    if newest is not None:
        found.append((newest["system"], out / "checkpoints" / f"step-{newest['step']}.pt"))
    for theirs, path in found:
        if theirs != system:
            raise ConfigError(f"--out {out} holds another system's training: {path} is a {theirs} model, and this run "
                              f"trains {system}, which would export over its model.pt and set its checkpoints aside; "
                              "give every system a folder of its own (--out, or MELD_OUT per job), or delete that "
                              "folder's model.pt and checkpoints to reuse it")


def _check_init_from(path: str | Path, system: str, model_kwargs: dict, checkpoint_dir: Path) -> Path:
    """``train.init_from``, checked before any worker starts: the file exists, is not one of this
    run's own checkpoints (a new configuration sets those aside before it would load it), holds a
    model of the same class (``meld``, ``meld_stt`` and ``meld_joint`` share one), and every weight
    has the shape this run's model expects."""
    from meld.config import ConfigError
    from meld.models.builders import build_model, model_class
    from meld.training import load_checkpoint

    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"train.init_from: {path} does not exist")
    if path.parent == Path(checkpoint_dir).resolve():
        raise ConfigError(f"train.init_from: {path} is one of this run's own checkpoints, which a new configuration "
                          f"sets aside before it starts; copy it out first (e.g. cp {path} {path.parent.parent}/init.pt)")
    export = Path(checkpoint_dir).resolve().parent / "model.pt"
    if path == export:
        # the run's export replaces it: the next run of the same command (a changed file, so a new fingerprint)
        # would set the finished run aside and fine-tune the fine-tuned model again, each rerun one more time
        raise ConfigError(f"train.init_from: {path} is the model this run exports (--out), which the run overwrites; "
                          f"copy it out first (e.g. cp {path} {export.parent}/init.pt) and start from the copy")
    state = load_checkpoint(path, mmap=True)  # its shapes are checked, its values not read
    if model_class(state["system"]) is not model_class(system):
        raise ConfigError(f"train.init_from: {path} holds a {state['system']} model; {system} cannot start from it")
    import torch

    with torch.device("meta"):  # shapes only: no memory or initialisation for a paper-size model
        expected = {k: tuple(v.shape) for k, v in build_model(system, model_kwargs).state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state["model"].items()}
    wrong = sorted(k for k in expected.keys() | found.keys() if expected.get(k) != found.get(k))
    if wrong:
        detail = ", ".join(f"{k}: {found.get(k, 'missing')} vs {expected.get(k, 'not in this model')}" for k in wrong[:5])
        raise ConfigError(f"train.init_from: {path} does not fit this {system} model ({len(wrong)} weights differ: "
                          f"{detail}{', ...' if len(wrong) > 5 else ''}); model settings must match the run it came from")
    return path


def _code_data(codes: str | Path | None, model_kwargs: dict) -> dict:
    """The worker-config entries of a Codec-LM run: its code store and the codec that made it.

    Raises:
        ConfigError: no code store given, or its codec's levels / codebook size differ from the model's.
        FileNotFoundError: the folder is not the codes stage's output.
    """
    from meld.codes import CODEC_FILE, read_codec_description
    from meld.config import ConfigError

    if codes is None:
        raise ConfigError("codec_lm trains on DAC codes, not mel features: give --codes (the codes stage's output, "
                          "e.g. data/codes/codec_lm); in the DVC pipeline list it under `codec_systems`, not `systems`")
    codes = Path(codes).resolve()
    if not (codes / CODEC_FILE).is_file() or not (codes / "train" / "index.jsonl").is_file():
        raise FileNotFoundError(f"{codes}: not a code store (no {CODEC_FILE} or train/index.jsonl; did the codes "
                                "stage run?)")
    codec = read_codec_description(codes)
    made = (codec["n_levels"], codec["codebook_size"])
    wanted = (model_kwargs["n_levels"], model_kwargs["codebook_size"])
    if made != wanted:
        raise ConfigError(f"{codes}: codes of {made[0]} levels x {made[1]} codes, but codec_lm.args asks for "
                          f"{wanted[0]} x {wanted[1]}; rerun the codes stage")
    return {"data_kind": "codes", "codec": codec, "train_store": str(codes / "train"), "eval_store": None}


def prepare_config(args, params: dict) -> dict:
    """:func:`build_config` from the command line's arguments."""
    return build_config(params, system=args.system, features=args.features, bpe=args.bpe, codebook=args.codebook,
                        out=args.out, project_root=args.project_root, codes=args.codes)


def export_model(config: dict, out: Path) -> Path:
    """Write the inference checkpoint from the last checkpoint: weights + config + tokenizer, and the
    normalisation (mel systems) or the codec description (codec_lm)."""
    import numpy as np
    import torch

    from meld.models.backbone import prepare_for_decoding
    from meld.models.builders import build_model
    from meld.store import load_stats
    from meld.training import CheckpointError, latest_good_checkpoint, save_checkpoint

    state = latest_good_checkpoint(config["checkpoint_dir"], mmap=True)  # the optimiser's moments are never read
    if state is None:
        raise CheckpointError(f"training left no checkpoint in {config['checkpoint_dir']}")
    for p in Path(out).glob("model.pt.tmp*"):  # an export killed mid-write left it: a model's size, never read
        if re.fullmatch(r"model\.pt\.tmp\d+", p.name):
            p.unlink(missing_ok=True)
    theirs = state["extra"].get("fingerprint")
    if theirs != config["fingerprint"]:
        # this run's own checkpoints are in the folder only until another run writes or sets them aside
        raise CheckpointError(
            f"{config['checkpoint_dir']}/step-{state['step']}.pt, the newest checkpoint, is not this run's: a "
            f"{state['system']} run of configuration {theirs} wrote it, this {config['system']} run is "
            f"{config['fingerprint']}; another run writes to this folder (give each run its own --out), and "
            f"this run's weights may be in {config['checkpoint_dir']}/stale/{config['fingerprint']}")
    model = build_model(config["system"], config["model_kwargs"])
    model.load_state_dict(state["model"])
    # model.pt is read to decode: stored in the decoding layout (each CPU Linear weight (in, out)-contiguous,
    # values unchanged), a process decoding on the file's own pages (the decode pool's CPU actors,
    # load_model(share_file_pages=True)) re-lays nothing and shares them with the node's other actors
    prepare_for_decoding(model)
    extra = {
        "bpe_model": torch.from_numpy(np.frombuffer(Path(config["bpe_model"]).read_bytes(), dtype=np.uint8).copy()),
        "fingerprint": config["fingerprint"],
        "task": config["train"]["task"],
        "skipped_too_long": list(config.get("skipped_too_long") or []),  # {id, frames, reason}: not trained on
    }
    if config.get("data_kind") == "codes":  # decoding its output needs the very codec that made the codes
        extra["codec"] = config["codec"]
    else:
        stats = load_stats(config["stats"])
        extra |= {"reduction_factor": config["reduction_factor"], "norm_mean": torch.from_numpy(stats.mean.copy()),
                  "norm_std": torch.from_numpy(stats.std.copy())}
    return save_checkpoint(out / "model.pt", system=config["system"], model=model,
                           model_kwargs=config["model_kwargs"], step=state["step"], extra=extra)


def add_data_args(p: argparse.ArgumentParser) -> None:
    """--params/--features/--bpe/--codebook/--codes, each defaulting to its MELD_* variable (cluster jobs set those).

    ``--codes`` has no default: codec_lm must be pointed at a code store on purpose (the DVC ``train``
    stage over mel ``systems`` does not depend on one).
    """
    env = os.environ.get
    p.add_argument("--params", default=env("MELD_PARAMS", "params.yaml"))
    p.add_argument("--features", default=env("MELD_FEATURES", "data/features"))
    p.add_argument("--bpe", default=env("MELD_BPE", "data/bpe/bpe.model"))
    p.add_argument("--codebook", default=env("MELD_CODEBOOK", "data/codebook"))
    p.add_argument("--codes", default=env("MELD_CODES"),
                   help="DAC code store from the codes stage (codec_lm only, e.g. data/codes/codec_lm)")


def max_failures(text: str) -> int:
    """``--max-failures`` / ``MELD_MAX_FAILURES``: an integer, -1 (no limit) or more. Ray reads any value
    below -1 as 0 (no restart) without a word."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer (restarts; -1: no limit), got {text!r}") from None
    if n < -1:
        raise argparse.ArgumentTypeError(f"expected -1 (no limit) or a count of restarts >= 0, got {n}")
    return n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    env = os.environ.get
    add_data_args(p)
    p.add_argument("--system", default=env("MELD_SYSTEM", "meld"))
    p.add_argument("--out", default=env("MELD_OUT"), help="default: models/<system>")
    p.add_argument("--project-root", default=env("MELD_PROJECT_ROOT", "."))
    p.add_argument("--ray-storage", default=env("MELD_RAY_STORAGE", "ray_results"),
                   help="Ray's run storage (a shared path or s3://... on a multi-node cluster)")
    p.add_argument("--max-failures", type=max_failures, default=None,
                   help="worker-group restarts (each from the last checkpoint) before the run fails; -1: no limit "
                        "(default: MELD_MAX_FAILURES, else 2)")
    args = p.parse_args(argv)
    args.out = args.out or f"models/{args.system}"
    if args.max_failures is None:  # read here, not as the flag's default: a bad value names the variable
        from meld.config import ConfigError

        try:
            args.max_failures = max_failures(env("MELD_MAX_FAILURES", "2"))
        except argparse.ArgumentTypeError as err:
            raise ConfigError(f"MELD_MAX_FAILURES: {err}") from err
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from meld import tracking
    from meld.config import read_params

    params = read_params(args.params)
    config = prepare_config(args, params)
    # a down tracking server refused here in seconds, not after MLflow's minutes of retries in each worker attempt
    tracking.check_server(config["mlflow_tracking_uri"])
    # where the run comes from (commit, params digest, DVC stage): computed here, in the project, since a
    # worker's MLflow context names Ray's own script and records no commit
    config["mlflow_tags"] = {"meld.stage": "train", "meld.system": args.system,
                             **tracking.run_tags(params, config["project_root"], source="ray_jobs/train.py")}
    tc = config["train"]
    init_ray(num_cpus=max(tc["num_workers"], os.cpu_count() or 1) if not tc["use_gpu"] else None)
    storage = args.ray_storage if "://" in args.ray_storage else str(Path(args.ray_storage).resolve())
    # on several nodes, checkpoints and inputs must be where every node sees them: refused now, not at the
    # first checkpoint a worker on another node saves (Ray checks its storage only then)
    check_shared_storage(**training_storage(config, storage))
    limit, can_grow = cluster_limit()
    check_cluster_holds(tc, scaling_config(tc["num_workers"], tc["use_gpu"]).total_resources, limit, can_grow=can_grow)
    result = run_training(config, num_workers=tc["num_workers"], use_gpu=tc["use_gpu"], storage_path=storage,
                          max_failures=args.max_failures)
    if result.error:
        raise result.error
    path = export_model(config, Path(args.out).resolve())
    log_model_artifact(config, path)
    print(f"wrote {path}")
    return 0


def training_storage(config: dict, ray_storage: str) -> dict:
    """What :func:`ray_jobs.cluster.check_shared_storage` checks for a training run: the checkpoint folder
    (written by rank 0 on any node, read by the driver's export and by a resumed run), Ray's run storage
    when it is a path, a local MLflow store, and the inputs every worker reads."""
    written = {"--out (checkpoints)": Path(config["checkpoint_dir"])}
    if "://" not in ray_storage:
        written["--ray-storage"] = Path(ray_storage)
    store_flag = "--codes" if config["system"] == "codec_lm" else "--features"
    read = {store_flag: Path(config["train_store"]) / "index.jsonl", "--bpe": Path(config["bpe_model"])}
    if config.get("codebook"):
        read["--codebook"] = Path(config["codebook"])
    return {"written": written, "read": read, "tracking_uri": config["mlflow_tracking_uri"]}


def log_model_artifact(config: dict, path: Path) -> None:
    """Attach the exported inference checkpoint to the training run in MLflow (artifact ``model/``),
    so a run in the UI carries the model it produced, not only its curves."""
    run = _training_run(config)
    if run is None:
        log.warning("no MLflow run id in %s: %s not logged as an artifact", config["checkpoint_dir"], path.name)
        return
    client, run_id = run
    client.log_artifact(run_id, str(path), "model")


if __name__ == "__main__":
    from meld.config import run_stage

    sys.exit(run_stage("train", main))
