"""Training benchmark: MELD ``train_step`` throughput on CPU with real data, tiny and paper configs.

What it measures:

* the padding fraction of :class:`meld.store.FrameBudgetSampler` on the real training split
  (padded frames that carry no data / all padded frames), for r = 1 and 2, at the params.yaml
  frame budget and at the paper's per-worker budget (3,125: each DDP worker builds its own sampler;
  the mini corpus's clips are shorter than LibriSpeech's, so this is not LibriSpeech's padding);
* for the tiny config (params.yaml ``model:``) and the paper config (d 1024, 12 layers, 16 heads,
  FFN 4096, codebook 8192, BPE 4096, postnet 512x5: 186M parameters): a few real batches from the
  sampler (tiny: params.yaml's reduction factor and ``train.frames_per_batch``; paper: its own r=1
  and 3,125 frames per worker, unless ``--paper-budget``; task ``tts``, loss
  weights, clip and AdamW as in params.yaml, full precision: bf16 autocast is GPU-only in the driver),
  timing the collate (``TrainingData.batch``) and ``meld.training.train_step`` separately, after
  untimed warm-up steps;
* frames/s: real (unpadded) mel frames per second of step + collate time (also grouped and padded
  frames/s), seconds per step, and peak memory = the high-water RSS (``VmHWM``) of a fresh process
  per config minus its RSS after building model and optimiser (so activations, gradients and the AdamW moments,
  which AdamW allocates at the first step, all count).

Run (from the repository root):
    .venv/bin/python -m bench.training           # full: tiny 10 steps, paper 2 steps (~5 min on 2 cores)
    .venv/bin/python -m bench.training --quick   # tiny 3 steps, paper 1 step at a 600-frame budget
Options: --threads N (torch threads; default torch's), --data DIR (pipeline outputs), --out NAME.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import (  # noqa: E402
    CLOCKS,
    ROOT,
    clock_name,
    current_rss,
    emit,
    load_average,
    machine_info,
    now,
    paper_config,
    paper_frames_per_worker,
    paper_meld_kwargs,
    peak_rss,
    result_stem,
    run_cell,
    set_threads,
    table,
    use_clock,
    write_result,
)


def params() -> dict:
    import yaml

    return yaml.safe_load((ROOT / "params.yaml").read_text())


def cell_sampler(data: str) -> dict:
    """Padding fraction of the frame-budget sampler on the real training split."""
    from meld.store import FeatureStore, FrameBudgetSampler

    store = FeatureStore(Path(data) / "features/train")
    budget = params()["train"]["frames_per_batch"]
    rows = []
    for r in (1, 2):
        lengths = [math.ceil(n / r) for n in store.lengths]
        # the mini params' budget, and the paper's per worker (each DDP worker builds its own sampler)
        for b in sorted({budget, paper_frames_per_worker()}):
            if max(lengths) > b:
                continue
            s = FrameBudgetSampler(lengths, b)
            rows.append(
                {
                    "reduction": r,
                    "budget": b,
                    "utterances": len(lengths),
                    "batches": len(s.batches),
                    "mean_batch_size": len(lengths) / len(s.batches),
                    "padding_fraction": s.padding_fraction(),
                }
            )
    return {"rows": rows, "params_budget": budget}


def cell_train(data: str, config: str, budget: int, warmup: int, steps: int) -> dict:
    import numpy as np
    import torch

    from meld.config import ModelConfig
    from meld.models.builders import meld_kwargs
    from meld.models.meld import MELD
    from meld.store import FeatureStore, FrameBudgetSampler, TrainingData, load_stats
    from meld.text import BPETokenizer
    from meld.training import build_optimizer, build_scheduler, train_step

    data = Path(data)
    p = params()
    tc = p["train"]
    # each config at its own frame rate: the paper trains at r=1, one mel frame per token
    r = int(p["model"]["reduction_factor"]) if config == "tiny" else int(paper_config()["model"]["reduction_factor"])
    tok = BPETokenizer(data / "bpe/bpe.model")
    torch.manual_seed(0)
    if config == "tiny":
        cb = torch.from_numpy(np.load(data / f"codebook/r{r}.npy"))
        kwargs = meld_kwargs(
            ModelConfig.from_dict(p["model"], "model"), n_text=tok.vocab_size, codebook_size=cb.shape[0]
        )
    else:
        kwargs = paper_meld_kwargs(r)
        cb = torch.randn(kwargs["codebook_size"], kwargs["frame_dim"])
    model = MELD(**kwargs)
    model.set_codebook(cb)
    opt = build_optimizer(model, tc["lr"], tc["weight_decay"])
    sched = build_scheduler(opt, tc["warmup_steps"], tc["hold_steps"], tc["decay_steps"])
    train = TrainingData(
        FeatureStore(data / "features/train"), load_stats(data / "features/stats.json"), tok, r
    )
    sampler = FrameBudgetSampler(train.lengths(), budget, seed=tc["seed"])
    batches = iter(sampler)
    rss0, load0 = current_rss(), load_average()
    timed = []
    for i in range(warmup + steps):
        idx = next(batches)
        t0 = now()
        batch = train.batch(idx)
        t1 = now()
        metrics = train_step(
            model, opt, sched, batch, task="tts", loss_weights=tc["loss_weights"], grad_clip=tc["grad_clip"]
        )
        t2 = now()
        if i >= warmup:
            B, T = batch["mel_len"].shape[0], batch["mel"].shape[1]
            real = int(batch["mel_len"].sum())
            timed.append(
                {
                    "collate_s": t1 - t0,
                    "step_s": t2 - t1,
                    "batch": B,
                    "grouped_real": real,
                    "grouped_padded": B * T,
                    "mel_frames": int(sum(train.store.lengths[j] for j in idx)),
                    "loss": metrics["loss/total"],
                }
            )
    tot = sum(t["collate_s"] + t["step_s"] for t in timed)
    n_params = sum(q.numel() for q in model.parameters())
    return {
        "config": config,
        "budget": budget,
        "reduction": r,
        "params": n_params,
        "warmup_steps": warmup,
        "steps": len(timed),
        "per_step": timed,
        "step_s": sum(t["step_s"] for t in timed) / len(timed),
        "collate_s": sum(t["collate_s"] for t in timed) / len(timed),
        "mel_frames_per_s": sum(t["mel_frames"] for t in timed) / tot,
        "grouped_frames_per_s": sum(t["grouped_real"] for t in timed) / tot,
        "padded_frames_per_s": sum(t["grouped_padded"] for t in timed) / tot,
        "mean_batch": sum(t["batch"] for t in timed) / len(timed),
        "batch_padding_fraction": 1
        - sum(t["grouped_real"] for t in timed) / sum(t["grouped_padded"] for t in timed),
        "audio_s_per_s": sum(t["mel_frames"] for t in timed) / 62.5 / tot,
        "peak_rss_delta_mb": (peak_rss() - rss0) / 2**20,
        "peak_rss_mb": peak_rss() / 2**20,
        "weights_grads_adam_mb": 4 * n_params * 4 / 2**20,
        "load_average": [load0, load_average()],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short run: fewer steps, small paper batches")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument(
        "--data", default=str(ROOT / "data"), help="pipeline outputs: bpe/, codebook/, features/"
    )
    parser.add_argument(
        "--paper-budget",
        type=int,
        default=None,
        help="frame budget of the paper-config batches (default: configs/paper.yaml's per worker; --quick: 600)",
    )
    parser.add_argument("--out", type=result_stem, default="training", help="results file stem under bench/results/")
    parser.add_argument(
        "--clock",
        choices=CLOCKS,
        default=clock_name(),
        help="wall (default) or cpu: CPU seconds, immune to time-slicing on a loaded machine (use with --threads 1)",
    )
    parser.add_argument("--cell", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    use_clock(args.clock)
    if args.cell:
        cell = json.loads(args.cell)
        set_threads(args.threads)
        kind = cell.pop("kind")
        emit(cell_sampler(**cell) if kind == "sampler" else cell_train(**cell))
        return 0

    import torch

    threads = args.threads or torch.get_num_threads()
    data = str(Path(args.data).resolve())
    budget = params()["train"]["frames_per_batch"]
    q = args.quick
    paper_budget = args.paper_budget or (600 if q else paper_frames_per_worker())
    info = machine_info(threads)
    t_all = time.perf_counter()
    print(
        f"# training benchmark: {threads} torch thread(s), load average {info['load_average_at_start']}",
        flush=True,
    )
    samp = run_cell("bench.training", {"kind": "sampler", "data": data}, threads)
    print(
        table(
            samp["rows"],
            [
                ("reduction", "r"),
                ("budget", "frame budget"),
                ("utterances", "utterances"),
                ("batches", "batches"),
                ("mean_batch_size", "mean batch"),
                ("padding_fraction", "padding fraction"),
            ],
        ),
        flush=True,
    )
    plan = [("tiny", budget, 1, 3 if q else 10), ("paper", paper_budget, 1, 1 if q else 2)]
    rows = []
    for config, b, warm, steps in plan:
        res = run_cell(
            "bench.training",
            {"kind": "train", "data": data, "config": config, "budget": b, "warmup": warm, "steps": steps},
            threads,
            timeout=1800,
        )
        rows.append(res)
        print(
            f"  {config}: {res['step_s']:.2f} s/step, {res['mel_frames_per_s']:.0f} mel frames/s", flush=True
        )
    print()
    print(
        table(
            rows,
            [
                ("config", "config"),
                ("params", "params"),
                ("budget", "budget (grouped)"),
                ("steps", "timed steps"),
                ("mean_batch", "mean batch"),
                ("step_s", "s/step"),
                ("collate_s", "collate s"),
                ("mel_frames_per_s", "mel frames/s"),
                ("grouped_frames_per_s", "grouped frames/s"),
                ("padded_frames_per_s", "padded frames/s"),
                ("audio_s_per_s", "audio s per s"),
                ("batch_padding_fraction", "padding (these batches)"),
                ("peak_rss_delta_mb", "peak RSS Δ MB"),
                ("weights_grads_adam_mb", "W+G+Adam MB"),
            ],
        )
    )
    print("peak RSS Δ = high-water RSS (VmHWM) of a fresh process minus its RSS after building model + optimiser")
    info["load_average_at_end"] = load_average()
    path = write_result(
        args.out,
        {
            "benchmark": "training",
            "quick": q,
            "machine": info,
            "data": data,
            "sampler": samp,
            "rows": rows,
            "seconds": time.perf_counter() - t_all,
            "memory_method": "VmHWM (fresh process per config) minus RSS after model+optimiser",
        },
    )
    print(f"wrote {path.relative_to(ROOT)} in {time.perf_counter() - t_all:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
