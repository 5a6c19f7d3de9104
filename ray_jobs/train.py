"""Ray Train driver and worker for every system: the same code runs locally and on a cluster.

Locally (what ``dvc repro`` runs through pipeline/train.py)::

    python -m ray_jobs.train --params params.yaml --system meld --features data/features \
        --bpe data/bpe/bpe.model --codebook data/codebook --out models/meld

On a cluster (paths on shared storage; MLFLOW_TRACKING_URI from the environment)::

    ray job submit --working-dir . -- python -m ray_jobs.train --params params.yaml --system meld ...

Layering: ``train_worker`` (one per Ray worker, a thin wrapper around meld.training.train_step)
-> ``run_training`` (builds the TorchTrainer) -> the Tune driver (ray_jobs/tune.py) over run_training.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

log = logging.getLogger("meld.train")

KEEP_CHECKPOINTS = 2


def _prune(folder: Path, keep: int) -> None:
    ckpts = sorted(folder.glob("step-*.pt"), key=lambda p: int(p.stem.split("-")[1]))
    for p in ckpts[:-keep]:
        p.unlink(missing_ok=True)


def train_worker(config: dict) -> None:
    """One Ray Train worker: data shard, DDP model, train_step loop, checkpoints, MLflow (rank 0)."""
    import numpy as np
    import ray.train
    import ray.train.torch
    import torch

    from meld.models.builders import build_model
    from meld.store import FeatureStore, FrameBudgetSampler, TrainingData, load_stats
    from meld.text import BPETokenizer
    from meld.training import (
        LossModule,
        NonFiniteLoss,
        build_optimizer,
        build_scheduler,
        latest_good_checkpoint,
        restore_training_state,
        save_checkpoint,
        train_step,
    )

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(config["threads_per_worker"])))
    tc = config["train"]
    system, r = config["system"], config["reduction_factor"]
    device = ray.train.torch.get_device()

    tokenizer = BPETokenizer(config["bpe_model"])
    stats = load_stats(config["stats"])
    data = TrainingData(FeatureStore(config["train_store"]), stats, tokenizer, r)
    sampler = FrameBudgetSampler(data.lengths(), tc["frames_per_batch"], rank, world, tc["seed"])

    model = build_model(system, config["model_kwargs"])
    if "codebook" in config:
        model.set_codebook(torch.from_numpy(np.load(config["codebook"])))
    module = LossModule(model)
    ckpt_dir = Path(config["checkpoint_dir"])
    state = latest_good_checkpoint(ckpt_dir)
    if state is not None and state["extra"].get("fingerprint") != config["fingerprint"]:
        log.warning("discarding checkpoints in %s: they belong to another configuration", ckpt_dir)
        state = None
        if rank == 0:
            for old in ckpt_dir.glob("step-*.pt"):
                old.unlink(missing_ok=True)
    use_gpu = device.type == "cuda"
    optimizer = build_optimizer(model, tc["lr"], tc["weight_decay"], fused=use_gpu)
    scheduler = build_scheduler(optimizer, tc["warmup_steps"], tc["hold_steps"], tc["decay_steps"])
    step = 0
    if state is not None:
        step = restore_training_state(state, model, optimizer, scheduler)
        sampler.load_state_dict(state["sampler"])
        print(f"[rank {rank}] resuming {system} from step {step} ({ckpt_dir})", flush=True)
    torch.manual_seed(tc["seed"] * 100_003 + rank * 7919 + step)  # distinct dropout per rank, reproducible
    parallel = {"find_unused_parameters": True} if tc["task"] != "tts" else {}
    module = ray.train.torch.prepare_model(module, parallel_strategy_kwargs=parallel)
    autocast = torch.bfloat16 if (use_gpu and tc["bf16"]) else None

    mlflow = None
    if rank == 0:
        from meld import tracking

        mlflow = tracking.setup(config["experiment"], config["project_root"])
        run_id = (ckpt_dir / "mlflow_run_id").read_text().strip() if (ckpt_dir / "mlflow_run_id").is_file() and state else None
        run = mlflow.start_run(run_id=run_id, run_name=config["run_name"])
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        (ckpt_dir / "mlflow_run_id").write_text(run.info.run_id)
        if run_id is None:
            mlflow.log_params(tracking.flatten({"system": system, "train": tc, "model": config["model_kwargs"]}))
            mlflow.log_metric("data/padding_fraction", sampler.padding_fraction())

    def checkpoint(step: int, metrics: dict) -> None:
        extra = {"fingerprint": config["fingerprint"]}
        ray_ckpt = None
        if rank == 0:
            path = save_checkpoint(ckpt_dir / f"step-{step}.pt", system=system, model=model,
                                   model_kwargs=config["model_kwargs"], optimizer=optimizer, scheduler=scheduler,
                                   step=step, sampler_state=sampler.state_dict(), extra=extra)
            _prune(ckpt_dir, KEEP_CHECKPOINTS)
            tmp = Path(tempfile.mkdtemp(prefix="meld-ckpt-"))
            os.link(path, tmp / path.name) if path.stat().st_dev == tmp.stat().st_dev else shutil.copy(path, tmp)
            ray_ckpt = ray.train.Checkpoint.from_directory(str(tmp))
        ray.train.report({"step": step, **metrics}, checkpoint=ray_ckpt)

    metrics: dict = {}
    batches = iter(sampler)
    while step < tc["max_steps"]:
        task = tc["task"]
        if task == "joint":
            task = "tts" if step < tc["stt_warmup_steps"] else "joint"
        idx = next(batches)
        batch = {k: v.to(device) for k, v in data.batch(idx).items()}
        try:
            metrics = train_step(module, optimizer, scheduler, batch, task=task,
                                 loss_weights=tc["loss_weights"], grad_clip=tc["grad_clip"], autocast_dtype=autocast)
        except NonFiniteLoss as err:
            raise NonFiniteLoss(f"{system} step {step + 1}: {err}; the last good checkpoint stays in {ckpt_dir}") from err
        step += 1
        if rank == 0 and (step % tc["log_every"] == 0 or step == 1):
            mlflow.log_metrics(metrics, step=step)
            print(f"[{system}] step {step}/{tc['max_steps']} " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()), flush=True)
        if step % tc["checkpoint_every"] == 0 or step == tc["max_steps"]:
            checkpoint(step, metrics)
    if rank == 0:
        mlflow.end_run()


def run_training(config: dict, *, num_workers: int, use_gpu: bool, storage_path: str, max_failures: int = 2):
    """Build and fit the TorchTrainer for one system; returns the Ray Result."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        train_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
        run_config=RunConfig(
            name=config["run_name"],  # stable: a restarted run finds its own checkpoints
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=max_failures),
        ),
    )
    return trainer.fit()


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster in RAY_ADDRESS (as under ``ray job submit``), else start a local one on 127.0.0.1."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True,
                 _node_ip_address="127.0.0.1", configure_logging=False)


def prepare_config(args, params: dict) -> dict:
    """Resolve paths and sizes into the plain dict every worker receives."""
    import numpy as np

    from meld.config import ModelConfig, TrainConfig
    from meld.models.builders import meld_kwargs
    from meld.text import BPETokenizer
    from meld.training import fingerprint

    system = args.system
    overrides = params.get(system) or {}
    unknown = sorted(set(overrides) - {"model", "train"})
    if unknown:
        raise ValueError(f"params section '{system}': unknown key(s) {unknown}; known: ['model', 'train']")
    model_cfg = ModelConfig.from_dict({**params.get("model", {}), **(overrides.get("model") or {})}, "model")
    train_cfg = TrainConfig.from_dict({**params.get("train", {}), **(overrides.get("train") or {})}, "train")
    features = Path(args.features).resolve()
    codebook = Path(args.codebook).resolve() / f"r{model_cfg.reduction_factor}.npy"
    if not codebook.is_file():
        raise FileNotFoundError(f"{codebook}: no codebook for reduction factor {model_cfg.reduction_factor} "
                                "(add it to codebook.reduction_factors)")
    n_text = BPETokenizer(args.bpe).vocab_size
    n_codes = int(np.load(codebook, mmap_mode="r").shape[0])
    kwargs = meld_kwargs(model_cfg, n_text=n_text, codebook_size=n_codes)
    out = Path(args.out).resolve()
    train = train_cfg.to_dict()
    train["loss_weights"] = dict(train["loss_weights"])
    config = {
        "system": system,
        "model_kwargs": kwargs,
        "reduction_factor": model_cfg.reduction_factor,
        "train": train,
        "bpe_model": str(Path(args.bpe).resolve()),
        "stats": str(features / "stats.json"),
        "train_store": str(features / "train"),
        "codebook": str(codebook),
        "checkpoint_dir": str(out / "checkpoints"),
        "experiment": params.get("mlflow", {}).get("experiment", "meld"),
        "run_name": f"train-{system}",
        "project_root": str(Path(args.project_root).resolve()),
        "threads_per_worker": max(1, (os.cpu_count() or 2) // train_cfg.num_workers),
    }
    data_id = (features / "train" / "index.jsonl").stat().st_size
    config["fingerprint"] = fingerprint({k: config[k] for k in ("system", "model_kwargs", "train")} | {"data": data_id})
    return config


def export_model(config: dict, out: Path) -> Path:
    """Write the inference checkpoint (weights + config + normalisation + tokenizer) from the last checkpoint."""
    import numpy as np
    import torch

    from meld.models.builders import build_model
    from meld.store import load_stats
    from meld.training import latest_good_checkpoint, save_checkpoint

    state = latest_good_checkpoint(config["checkpoint_dir"])
    if state is None:
        raise RuntimeError(f"training left no checkpoint in {config['checkpoint_dir']}")
    if state["extra"].get("fingerprint") != config["fingerprint"]:
        raise RuntimeError(f"the newest checkpoint in {config['checkpoint_dir']} belongs to another configuration")
    model = build_model(config["system"], config["model_kwargs"])
    model.load_state_dict(state["model"])
    stats = load_stats(config["stats"])
    extra = {
        "reduction_factor": config["reduction_factor"],
        "norm_mean": torch.from_numpy(stats.mean.copy()),
        "norm_std": torch.from_numpy(stats.std.copy()),
        "bpe_model": torch.from_numpy(np.frombuffer(Path(config["bpe_model"]).read_bytes(), dtype=np.uint8).copy()),
        "fingerprint": config["fingerprint"],
        "task": config["train"]["task"],
    }
    return save_checkpoint(out / "model.pt", system=config["system"], model=model,
                           model_kwargs=config["model_kwargs"], step=state["step"], extra=extra)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--system", default="meld")
    p.add_argument("--features", default=os.environ.get("MELD_FEATURES", "data/features"))
    p.add_argument("--bpe", default=os.environ.get("MELD_BPE", "data/bpe/bpe.model"))
    p.add_argument("--codebook", default=os.environ.get("MELD_CODEBOOK", "data/codebook"))
    p.add_argument("--out", default=None, help="default: models/<system>")
    p.add_argument("--project-root", default=".")
    p.add_argument("--ray-storage", default=os.environ.get("MELD_RAY_STORAGE", "ray_results"))
    args = p.parse_args(argv)
    args.out = args.out or f"models/{args.system}"
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from meld.config import read_params

    params = read_params(args.params)
    config = prepare_config(args, params)
    tc = config["train"]
    init_ray(num_cpus=max(tc["num_workers"], os.cpu_count() or 1) if not tc["use_gpu"] else None)
    result = run_training(config, num_workers=tc["num_workers"], use_gpu=tc["use_gpu"],
                          storage_path=str(Path(args.ray_storage).resolve()))
    if result.error:
        raise result.error
    path = export_model(config, Path(args.out).resolve())
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
