"""Wall time of the full LibriSpeech pipeline on a GPU cluster, derived from measurements here.

What it measures on this machine (one thread, the pipeline's own code, ``--clock`` time):

* **features**: FLAC decode + ``log_mel`` per core, x realtime. LibriSpeech ships FLAC, the mini
  corpus WAV, so ``--files`` corpus files are transcoded to FLAC first (in a temporary folder) and
  then read the way the features stage reads them (``load_audio`` then ``log_mel``);
* **codebook**: the codebook stage's work at the paper's settings (8,192 codes, ``max_vectors``
  4M, r = 1 and 2): its read-and-thin pass over a split (normalise + ``thinned_grouped_vectors``,
  per frame, on the mini corpus's training split) and, for each r, ``fit_kmeans`` plus the usage
  count on 4M vectors. There is no 960 h of frames here, so the 4M vectors are the mini corpus's
  real frames drawn with replacement plus 1 % noise (k-means time depends on the sizes, not on
  where the frames came from);
* **training FLOPs**: ``bench/results/training.json`` (or ``--training-result``; ``python -m bench.training``
  on this CPU, else the check is skipped) holds the
  paper model's CPU steps; 6 x parameters x tokens per step checks the FLOP model against them
  (the CPU's achieved rate is printed next to its peak, measured here with a 1024^3 GEMM).

What it assumes (flags, printed with the estimate): LibriSpeech's size (960.9 h of training audio,
281,241 utterances; 62.5 frames per second), the paper's 201k steps of 50k frames, the GPUs' bf16
peak and the model FLOP utilisation (MFU) a run reaches on them, the all-reduce bandwidth between
GPUs and their memory bandwidth, the shared storage's read bandwidth, CPU cores per worker for the
feature stage, and the evaluation's GPU decode speed (sharded over evaluate.decode_workers GPUs). No GPU was
measured: the training and evaluation rows are only as good as ``--mfu`` and ``--decode-ms``.

Run (from the repository root, after ``dvc repro bpe codebook``):
    .venv/bin/python -m bench.librispeech_estimate --threads 1 --clock cpu       # ~3 min
Options: --gpus 16 --gpu-tflops 989 --mfu 0.35 --allreduce-gbs 50 --gpu-mem-gbs 3350 --read-gbs 1
--feature-workers 16 --decode-ms 8 --files 60 --data DIR --training-result STEM --out NAME.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import (
    CLOCKS,
    RESULTS,
    ROOT,
    clock_name,
    load_average,
    machine_info,
    now,
    paper_config,
    paper_frames_per_batch,
    result_stem,
    set_threads,
    use_clock,
)

TRAIN_HOURS = 960.9  # LibriSpeech train-clean-100 + train-clean-360 + train-other-500
TRAIN_UTTERANCES = 281_241
EVAL_HOURS = 21.5  # dev-clean, dev-other, test-clean, test-other
FRAME_RATE = 62.5
STEPS = int(paper_config()["train"]["max_steps"])  # configs/paper.yaml: 201k
FRAMES_PER_STEP = paper_frames_per_batch()  # configs/paper.yaml: 16 workers x 3,125 frames
TEXT_TOKENS_PER_SECOND = 3.0  # BPE 4k on LibriSpeech (docs/scaling.md): ~5 % of the frames


def measure_features(data: Path, n_files: int) -> dict:
    import soundfile as sf

    from meld.audio import load_audio
    from meld.features import SAMPLE_RATE, log_mel

    corpus = data / "corpus" / "train"
    rows = [json.loads(line) for line in (corpus / "manifest.jsonl").read_text().splitlines() if line.strip()]
    rows = rows[:: max(1, len(rows) // n_files)][:n_files]
    with tempfile.TemporaryDirectory() as tmp:
        paths, seconds = [], 0.0
        for row in rows:
            wav, sr = sf.read(corpus / row["audio"], dtype="int16")
            path = Path(tmp) / (Path(row["audio"]).stem + ".flac")
            sf.write(path, wav, sr, format="FLAC", subtype="PCM_16")
            paths.append(path)
            seconds += len(wav) / sr
        best = float("inf")
        for _ in range(3):
            t = now()
            for path in paths:
                log_mel(load_audio(path), SAMPLE_RATE)
            best = min(best, now() - t)
    return {"files": len(paths), "audio_s": seconds, "s": best, "x_realtime_per_core": seconds / best}


def measure_codebook(data: Path, codes: int, max_vectors: int) -> dict:
    import numpy as np

    from meld.codebook import assign, fit_kmeans, keep_probability, thinned_grouped_vectors
    from meld.store import FeatureStore, load_stats

    stats = load_stats(data / "features" / "stats.json")
    store = FeatureStore(data / "features" / "train")
    rng = np.random.default_rng(0)
    keep = {r: keep_probability(store.lengths, r, max(1, sum(store.lengths) // 50)) for r in (1, 2)}  # LibriSpeech-like thinning
    t = now()
    for i in range(len(store)):
        mel = stats.normalise(store[i])
        for r in (1, 2):
            thinned_grouped_vectors(mel, r, keep[r], rng)
    read_s_per_frame = (now() - t) / sum(store.lengths)
    out = {"read_s_per_frame": read_s_per_frame}
    frames = np.concatenate([stats.normalise(store[i]) for i in range(len(store))])
    for r in (1, 2):
        n = (len(frames) // r) * r
        pool = frames[:n].reshape(n // r, 80 * r)
        vectors = pool[rng.integers(len(pool), size=max_vectors)]
        vectors += 0.01 * rng.standard_normal(size=vectors.shape, dtype=np.float32)
        t = now()
        centroids, _ = fit_kmeans(vectors, codes, niter=10, seed=0, max_vectors=max_vectors,
                                  max_points_per_centroid=64, pca_dims=16, init="k-means++")
        fit_s = now() - t
        t = now()
        assign(vectors, centroids)
        out[f"r{r}"] = {"fit_s": fit_s, "usage_count_s": now() - t, "vectors": max_vectors, "dim": 80 * r}
        del vectors
    return out


def gemm_peak_gflops() -> float:
    import torch

    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    best = float("inf")
    for _ in range(5):
        t = now()
        a @ b
        best = min(best, now() - t)
    return 2 * 1024**3 / best / 1e9


def training_flops_check(stem: str) -> dict:
    path = RESULTS / f"{stem}.json"
    if not path.exists():
        return {}
    result = json.loads(path.read_text())
    row = next((r for r in result["rows"] if r["config"] == "paper"), None)
    if row is None:
        return {}
    measured_on = result.get("machine", {}).get("cpu_model")
    if measured_on != machine_info(1)["cpu_model"]:  # its FLOP rate is set against this core's GEMM peak
        print(f"training FLOP check skipped: {path.name} was measured on {measured_on!r}, not this CPU")
        return {}
    steps = row["per_step"]
    # tokens = grouped frames (padded) + text, ~TEXT_TOKENS_PER_SECOND per second of audio
    tokens = sum(s["grouped_padded"] + s["mel_frames"] / FRAME_RATE * TEXT_TOKENS_PER_SECOND for s in steps) / len(steps)
    flops = 6 * row["params"] * tokens
    return {"params": row["params"], "tokens_per_step": tokens, "step_s": row["step_s"],
            "achieved_gflops": flops / row["step_s"] / 1e9}


def hms(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min" if h else f"{m} min {s:02d} s"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(ROOT / "data"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=CLOCKS, default=clock_name())
    p.add_argument("--files", type=int, default=60)
    p.add_argument("--codes", type=int, default=8192)
    p.add_argument("--max-vectors", type=int, default=4_000_000)
    p.add_argument("--gpus", type=int, default=16)
    p.add_argument("--gpu-tflops", type=float, default=989.0, help="bf16 dense peak per GPU (H100 SXM: 989)")
    p.add_argument("--mfu", type=float, default=0.35, help="model FLOP utilisation assumed on the GPUs")
    p.add_argument("--allreduce-gbs", type=float, default=50.0, help="per-GPU all-reduce bus bandwidth, GB/s (2 nodes, 400 Gb/s NICs)")
    p.add_argument("--feature-workers", type=int, default=16, help="features.num_workers (one CPU core each)")
    p.add_argument("--gpu-mem-gbs", type=float, default=3350.0, help="GPU memory bandwidth, GB/s (H100 SXM: 3,350)")
    p.add_argument("--read-gbs", type=float, default=1.0,
                   help="read bandwidth of the shared storage holding the features, GB/s, for the codebook's pass")
    p.add_argument("--decode-ms", type=float, default=8.0,
                   help="assumed GPU time of one batched TTS decoding step (batch 16, paper config)")
    p.add_argument("--training-result", type=result_stem, default="training",
                   help="bench/results/<stem>.json of bench.training on this CPU, for the FLOP-model check")
    p.add_argument("--out", type=result_stem, default="librispeech_estimate")
    args = p.parse_args(argv)
    use_clock(args.clock)
    set_threads(args.threads)
    import torch

    data = Path(args.data).resolve()
    info = machine_info(args.threads)
    print(f"# LibriSpeech pipeline estimate from measurements on {info['cpu_model']}, {args.threads} thread(s), {args.clock} clock")
    feats = measure_features(data, args.files)
    print(f"features: FLAC decode + log_mel {feats['x_realtime_per_core']:,.0f}x realtime per core ({feats['files']} files)", flush=True)
    book = measure_codebook(data, args.codes, args.max_vectors)
    print(f"codebook: read + thin {book['read_s_per_frame'] * 1e9:.0f} ns per frame; fit + usage at K={args.codes}, "
          f"{args.max_vectors:,} vectors: r=1 {book['r1']['fit_s']:.1f} + {book['r1']['usage_count_s']:.1f} s, "
          f"r=2 {book['r2']['fit_s']:.1f} + {book['r2']['usage_count_s']:.1f} s", flush=True)
    peak = gemm_peak_gflops()
    check = training_flops_check(args.training_result)
    if check:
        print(f"training FLOP model on this CPU: paper config {check['step_s']:.1f} s per step of "
              f"{check['tokens_per_step']:,.0f} tokens = {check['achieved_gflops']:.0f} GFLOP/s by 6 x params x tokens "
              f"(this core's 1024^3 GEMM peak: {peak:.0f} GFLOP/s)")
    torch.set_num_threads(args.threads)

    train_audio_s = TRAIN_HOURS * 3600
    all_audio_s = (TRAIN_HOURS + EVAL_HOURS) * 3600
    frames = train_audio_s * FRAME_RATE
    rows = []
    rows.append(("features (decode + log-mel, all splits)",
                 all_audio_s / feats["x_realtime_per_core"] / args.feature_workers,
                 f"measured {feats['x_realtime_per_core']:,.0f}x realtime per core; {args.feature_workers} worker cores"))
    # the measured read ran from the page cache; 216M float32 frames of 80 bins are ~69 GB on shared storage
    read_cpu_s = frames * book["read_s_per_frame"]
    read_io_s = frames * 80 * 4 / (args.read_gbs * 1e9)
    codebook_s = max(read_cpu_s, read_io_s) + sum(book[f"r{r}"]["fit_s"] + book[f"r{r}"]["usage_count_s"] for r in (1, 2))
    rows.append(("codebook (one process: read 216M frames, fit r=1 and r=2)", codebook_s,
                 f"read: the larger of the measured CPU time per frame ({hms(read_cpu_s)}) and {frames * 320 / 1e9:.0f} GB "
                 f"at {args.read_gbs:g} GB/s ({hms(read_io_s)}, assumed); the fits measured at full size"))
    params = check.get("params", 185_791_268)
    model = paper_config()["model"]
    tokens = FRAMES_PER_STEP * (1 + TEXT_TOKENS_PER_SECOND / FRAME_RATE)
    # causal attention's score and value products, forward + backward (3x), over an average utterance's
    # sequence (LibriSpeech averages 12.3 s: ~806 tokens); 6 x params x tokens leaves them out
    seq = TRAIN_HOURS * 3600 / TRAIN_UTTERANCES * (FRAME_RATE + TEXT_TOKENS_PER_SECOND)
    attention_flops = 6 * model["n_layers"] * model["d_model"] * seq * tokens
    step_flops = 6 * params * tokens + attention_flops
    compute_s = step_flops / (args.gpus * args.gpu_tflops * 1e12 * args.mfu)
    grad_bytes = 4 * params  # fp32 gradients, one ring all-reduce per step
    allreduce_s = 2 * (args.gpus - 1) / args.gpus * grad_bytes / (args.allreduce_gbs * 1e9)
    # fused AdamW reads and writes weights, gradients and two moments in fp32 on every GPU: memory-bound
    optimiser_s = 2 * 16 * params / (args.gpu_mem_gbs * 1e9)
    # DDP overlaps the all-reduce with the backward pass (2/3 of the compute), not with the forward or the update
    step_s = compute_s / 3 + max(2 * compute_s / 3, allreduce_s) + optimiser_s
    rows.append((f"train MELD ({STEPS:,} steps of {FRAMES_PER_STEP:,} frames)", STEPS * step_s,
                 f"{step_flops:.2e} FLOP/step ({attention_flops / step_flops:.0%} attention) at {args.mfu:.0%} MFU of "
                 f"{args.gpus} x {args.gpu_tflops:g} TFLOPS = {compute_s * 1e3:.1f} ms; all-reduce of "
                 f"{grad_bytes / 1e6:.0f} MB at {args.allreduce_gbs:g} GB/s = {allreduce_s * 1e3:.1f} ms; step = forward "
                 f"+ max(backward, all-reduce) + AdamW ({optimiser_s * 1e3:.1f} ms) = {step_s * 1e3:.1f} ms (assumed)"))
    # evaluation: MELD's evaluate stage (paper.yaml's only system; DVC runs stages one after another).
    # 1,000 test utterances x the generations x (the system + its 2 Table-5 ablations), <= 10 s at r=1
    # (625 steps), in batches of evaluate.batch_size sharded over evaluate.decode_workers GPUs
    ev = paper_config()["evaluate"]
    variants = 3 if ev.get("ablations", True) else 1
    generations = int(ev.get("generations", 3)) * 1000 * variants
    batch = int(ev.get("batch_size", 16))
    asked = int(ev.get("decode_workers", 1))
    workers = max(1, min(asked, args.gpus))  # the stage itself would refuse more actors than GPUs
    batches_per_worker = math.ceil(math.ceil(generations / batch) / workers)
    rows.append((f"evaluate MELD TTS ({generations:,} generations, batch {batch}, {workers} GPU{'s' if workers > 1 else ''})",
                 batches_per_worker * 625 * args.decode_ms / 1e3,
                 f"1,000 utt x {ev.get('generations', 3)} generations x {variants} variants; {args.decode_ms:g} ms per "
                 f"batched decoding step (assumed), 625 steps per 10 s; {batches_per_worker} batches per GPU "
                 f"(evaluate.decode_workers: {asked}{f', capped at --gpus {args.gpus}' if asked > args.gpus else ''}; "
                 "bench/decode_pool.py measures the sharding)"))
    total = sum(s for _, s, _ in rows)

    print(f"\n| stage | estimate on {args.gpus} GPUs | basis |")
    print("|---|---|---|")
    for name, seconds, basis in rows:
        print(f"| {name} | {hms(seconds)} | {basis} |")
    print(f"| **total, without the download** | **{hms(total)}** | |")
    print("\nNot included: downloading LibriSpeech (~60 GB; bandwidth-bound), the BPE stage (SentencePiece on\n"
          "281k transcripts, minutes), the tune sweep (each trial a shortened training run: its steps x the step above),\n"
          "STT decoding and the judges (Whisper, WavLM; on GPUs with evaluate.score_device, speed unmeasured) in evaluation.")

    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"benchmark": "librispeech_estimate", "machine": info | {"load_average_at_end": load_average()},
           "measured": {"features": feats, "codebook": book, "training_flops_check": check, "gemm_peak_gflops": peak},
           "assumed": {k: getattr(args, k) for k in ("gpus", "gpu_tflops", "mfu", "allreduce_gbs", "gpu_mem_gbs", "read_gbs",
                                                      "feature_workers", "decode_ms")},
           "rows": [{"stage": n, "seconds": s, "basis": b} for n, s, b in rows], "total_seconds": total}
    (RESULTS / f"{args.out}.json").write_text(json.dumps(out, indent=2, default=float))
    print(f"wrote bench/results/{args.out}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
