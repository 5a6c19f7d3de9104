"""STT learning-curve probe: how fast does MELD's STT learn to read audio? (a diagnostic, not a speed benchmark)

Trains a fresh MELD-STT (the architecture params.yaml gives ``--system``) on the training split in one
process, printing the auxiliary CTC per token and the decoder's text cross-entropy every
``--every`` steps, and at the end the greedy WER on the first ``--dev-utterances`` of dev. CTC at a
frame sees only frames, so a falling CTC curve means the frame states carry the transcript; a text CE
that falls while WER stays high means the decoder learnt the text grammar, not the audio.

    .venv/bin/python -m bench.stt_ctc_probe --steps 300 [--bidirectional-frames] [--ce-weight 1] [--lr 1e-3]

Results of the runs in docs/results.md (STT sections).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def main(argv: list[str] | None = None) -> int:
    from meld.config import read_params
    from meld.evaluation.metrics import wer_details
    from meld.generate import stt_beam_search
    from meld.models.builders import build_model
    from meld.store import FeatureStore, FrameBudgetSampler, TrainingData, load_stats
    from meld.text import BPETokenizer
    from meld.training import build_optimizer, build_scheduler, train_step
    from ray_jobs.train import add_data_args, build_config

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(p)
    p.add_argument("--system", default="meld_stt")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--frames-per-batch", type=int, default=2500)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--layer-norm-frames", action="store_true", help="frame embeddings at unit scale per dim")
    p.add_argument("--bidirectional-frames", action="store_true", help="STT frames attend both ways (prefix LM)")
    p.add_argument("--frontend-layers", type=int, default=0, help="residual conv layers over STT's frames")
    p.add_argument("--ce-weight", type=float, default=0.0, help="weight of the decoder's text cross-entropy")
    p.add_argument("--ctc-weight", type=float, default=1.0)
    p.add_argument("--dev-utterances", type=int, default=20)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = build_config(read_params(args.params), system=args.system, features=args.features, bpe=args.bpe,
                          codebook=args.codebook, out="/tmp/stt-probe")
    kwargs = {**config["model_kwargs"], "stt_ctc": True, "stt_bidirectional_frames": args.bidirectional_frames,
              "stt_frontend_layers": args.frontend_layers}
    model = build_model("meld", kwargs)
    model.train()
    if args.layer_norm_frames:
        encode = model.encoder.forward

        def normalised(x, dropout=None):
            y = encode(x, dropout)
            return F.layer_norm(y, (y.shape[-1],))

        model.encoder.forward = normalised
    stats, tok, r = load_stats(config["stats"]), BPETokenizer(config["bpe_model"]), config["reduction_factor"]
    data = TrainingData(FeatureStore(config["train_store"]), stats, tok, r)
    opt = build_optimizer(model, args.lr, 0.01)
    sched = build_scheduler(opt, 40, 10 * args.steps, 0)
    batches = iter(FrameBudgetSampler(data.lengths(), args.frames_per_batch, rank=0, world_size=1, seed=0))
    weights = {"stt_ce": args.ce_weight, "stt_ctc": args.ctc_weight}
    print("| step | CTC per token | text CE | s |\n|---|---|---|---|")
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        m = train_step(model, opt, sched, data.batch(next(batches)), task="stt", loss_weights=weights, grad_clip=10.0)
        if step % args.every == 0:
            print(f"| {step} | {float(m['loss/stt_ctc']):.3f} | {float(m['loss/stt_ce']):.3f} | "
                  f"{time.perf_counter() - t0:.0f} |", flush=True)
    dev = FeatureStore(config["eval_store"])
    n = min(args.dev_utterances, len(dev))
    model.eval()
    hyps = stt_beam_search(model, [stats.normalise(dev[i]) for i in range(n)], reduction=r, beam_size=1,
                           max_tokens=200, max_tokens_per_second=10)
    details = wer_details([dev.index[i]["text"] for i in range(n)], [tok.decode(h) for h in hyps])
    print(f"greedy dev WER over {n} utterances: {100 * details['wer']:.1f} %")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
