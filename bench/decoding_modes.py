"""MELD TTS generation through the three decoding steps of ``backbone.configure_decoding``, side by side.

- ``sliced``: the default eager step; attention over the filled part of the cache, finished
  rows leave the batch.
- ``fixed``: the fixed-shape step, eager: the batch keeps its allocated rows and attention
  covers the whole allocated cache under a mask (what compiling needs).
- ``compiled``: the fixed-shape step through ``torch.compile`` (inductor; with
  ``mode="reduce-overhead"``, i.e. CUDA graphs, on a GPU).

One process, one set of weights (a copy per mode), ``bench.generation``'s model and inputs
(real transcripts and 3 s prompts, 10 s of speech = 313 grouped frames, <EOS> masked so every
row runs to the end, which also means the fixed shape wastes no finished rows here). Each
mode's first generation is timed apart (it includes the compile); then ``--rounds`` rounds run
the modes back to back and each keeps its best. The table gives seconds per generation,
ms per step, utterances/s, RTF, and whether the mode sampled the same codes as ``sliced`` (same
seeds; float rounding may flip a rare draw).

Run (from the repository root; ``--device cuda`` on a GPU, where the compiled row is the point):
    .venv/bin/python -m bench.decoding_modes --data data --threads 1 --clock cpu [--config paper] [--device cuda]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

from bench._common import fmt, machine_info, result_stem, table, write_result

ROOT = Path(__file__).resolve().parent.parent
FRAMES = 313  # 10 s of speech at r = 2
SPEECH_SECONDS = 10.0
MODES = ("sliced", "fixed", "compiled")


def _timed_generation(G, model, batch_inputs, frames: int, device) -> tuple[object, float]:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = G.now()
    gen = G.run_path(model, "kv", batch_inputs, frames, seed=0)[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return gen, G.now() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(ROOT / "data"), help="pipeline outputs: bpe/, codebook/, features/")
    p.add_argument("--config", choices=("tiny", "paper"), default="tiny")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--batches", default="1,16", help="comma-separated batch sizes")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--frames", type=int, default=FRAMES, help="grouped frames per generation (313 = 10 s at r=2)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=("wall", "cpu"), default="cpu", help="cpu: this process's CPU seconds (CPU only)")
    p.add_argument("--quick", action="store_true", help="smoke run: 24 frames, 1 round, batch 1 and 2")
    p.add_argument("--out", type=result_stem, default="decoding_modes")
    args = p.parse_args(argv)
    if args.quick:
        args.frames, args.rounds, args.batches = 24, 1, "1,2"

    import torch

    from bench import generation as G
    from meld.models.backbone import configure_decoding

    device = torch.device(args.device)
    if device.type == "cuda" and args.clock == "cpu":
        args.clock = "wall"  # CPU seconds say nothing about GPU work
    G.DATA = Path(args.data).resolve()
    G.set_threads(args.threads)
    G.use_clock(args.clock)
    base, _ = G.build(args.config)
    base = base.to(device)
    models = {}
    for mode in MODES:
        models[mode] = copy.deepcopy(base)
        configure_decoding(models[mode], fixed_shape=mode == "fixed", compile=mode == "compiled")
    batches = [int(b) for b in args.batches.split(",")]
    inputs = {b: tuple(t.to(device) for t in G.inputs(b)) for b in batches}

    first: dict[tuple[str, int], float] = {}
    best: dict[tuple[str, int], float] = {}
    codes: dict[tuple[str, int], list] = {}
    for b in batches:
        for mode in MODES:
            gen, first[mode, b] = _timed_generation(G, models[mode], inputs[b], args.frames, device)
            codes[mode, b] = gen.codes
            print(f"first generation, {mode}, batch {b}: {first[mode, b]:.2f} s (compile included)", flush=True)
    for r in range(args.rounds):
        for b in batches:
            for mode in MODES:
                seconds = _timed_generation(G, models[mode], inputs[b], args.frames, device)[1]
                best[mode, b] = min(best.get((mode, b), float("inf")), seconds)
        print(f"round {r + 1}: " + ", ".join(f"{m} b{b} {best[m, b]:.3f} s" for b in batches for m in MODES), flush=True)

    speech = SPEECH_SECONDS * args.frames / FRAMES
    rows = []
    for b in batches:
        for mode in MODES:
            s = best[mode, b]
            rows.append({
                "mode": mode, "batch": b, "first_s": first[mode, b], "s_per_generation": s,
                "ms_per_step": 1e3 * s / args.frames, "utt_per_s": b / s, "rtf": s / (speech * b),
                "vs_sliced": best["sliced", b] / s, "same_codes": codes[mode, b] == codes["sliced", b],
            })
    print()
    print(f"{args.config} config, {device}, {args.threads} thread(s), {args.clock} clock, "
          f"{args.frames} grouped frames ({speech:g} s of speech) per utterance, best of {args.rounds}:")
    print(table(rows, [("mode", "decoding step"), ("batch", "batch"), ("first_s", "first call s (compile)"),
                       ("s_per_generation", "s per batch"), ("ms_per_step", "ms/step"), ("utt_per_s", "utt/s"),
                       ("rtf", "RTF"), ("vs_sliced", "speed vs sliced"), ("same_codes", "same codes")]))
    info = machine_info(args.threads)
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    path = write_result(args.out, {"config": args.config, "device": str(device), "frames": args.frames,
                                   "rounds": args.rounds, "rows": rows, "machine": info})
    print(f"\nwrote {path.relative_to(ROOT)}  ({fmt(info['cpu_model'])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
