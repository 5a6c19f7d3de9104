"""STT learning-curve probe: how fast does the frame pathway learn? (a diagnostic, not a speed benchmark)

Trains a fresh MELD (the architecture and tokenizer of an existing checkpoint) on the STT task with
only the auxiliary CTC loss at the frame positions, in one process, and prints CTC per token every 50
steps. CTC at a frame sees only frames, so a falling curve means the model is learning to read audio.

    .venv/bin/python -m bench.stt_ctc_probe --model models/meld_stt/model.pt --features data/features \
        --lr 1e-3 [--layer-norm-frames] --steps 300

Results of the runs in docs/results.md ("Quality experiment 2").
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from meld.features import NormStats
from meld.models.builders import build_model
from meld.store import FeatureStore, FrameBudgetSampler, TrainingData
from meld.text import tokenizer_from_bytes
from meld.training import build_optimizer, build_scheduler, load_model, train_step


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a MELD checkpoint: its model kwargs, tokenizer, codebook, stats")
    p.add_argument("--features", default="data/features")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--frames-per-batch", type=int, default=2500)
    p.add_argument("--layer-norm-frames", action="store_true", help="frame embeddings at unit scale per dim")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    ref, state = load_model(args.model)
    extra = state["extra"]
    stats = NormStats(extra["norm_mean"].numpy(), extra["norm_std"].numpy())
    tok = tokenizer_from_bytes(bytes(extra["bpe_model"].numpy().tobytes()))
    data = TrainingData(FeatureStore(f"{args.features}/train"), stats, tok, int(extra["reduction_factor"]))
    model = build_model("meld", {**state["model_kwargs"], "stt_ctc": True})
    model.set_codebook(ref.codebook.clone())
    model.train()
    if args.layer_norm_frames:
        encode = model.encoder.forward

        def normalised(x, dropout=None):
            y = encode(x, dropout)
            return F.layer_norm(y, (y.shape[-1],))

        model.encoder.forward = normalised
    opt = build_optimizer(model, args.lr, 0.01)
    sched = build_scheduler(opt, 40, 10 * args.steps, 0)
    batches = iter(FrameBudgetSampler(data.lengths(), args.frames_per_batch, rank=0, world_size=1, seed=0))
    print("| step | CTC per token | s |\n|---|---|---|")
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        m = train_step(model, opt, sched, data.batch(next(batches)), task="stt",
                       loss_weights={"stt_ce": 0.0, "stt_ctc": 1.0}, grad_clip=10.0)
        if step % 50 == 0:
            print(f"| {step} | {float(m['loss/stt_ctc']):.3f} | {time.perf_counter() - t0:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
