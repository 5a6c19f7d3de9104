"""Sharded evaluation decoding (``evaluate.decode_workers``): one process vs a pool of Ray actors.

What it measures, side by side in one run: ``tts_continue`` over the same list of utterances
(10 s of speech each from a 3 s prompt, the tiny config of params.yaml with random weights and
<EOS> made unreachable, so every utterance decodes its full 313 steps at r=2), batch ``--batch-size``,

* in this process, one torch thread (what one actor runs);
* through :class:`ray_jobs.decode_pool.DecodePool` with 1, 2, ... ``--workers`` actors, one core (or,
  with ``--device cuda``, one GPU) each.

Per row: seconds for the whole list (best of ``--rounds``), utterances/s, speed-up over one process, the parallel
efficiency (speed-up / workers), the actors' decoding time summed (what the evaluation's RTF counts;
its gap to workers x seconds is the hand-off), and whether the codes equal one process's. The pool's start
(Ray, the actors, each actor's first model load) is timed on its own and left out of the rows: it is
paid once per evaluate stage, not per list. A local Ray cluster of ``--workers`` CPUs is started.

Run (from the repository root):
    .venv/bin/python -m bench.decode_pool                      # 32 utterances, 1 and 2 actors (~1.5 min on 2 cores)
    .venv/bin/python -m bench.decode_pool --quick              # 4 utterances of 1 s, batch 2
    .venv/bin/python -m bench.decode_pool --device cuda --workers 8 --utterances 512 --batch-size 16
Options: --utterances N, --batch-size B, --workers W, --rounds R, --device cpu|cuda, --quick, --out NAME.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import load_average, machine_info, result_stem, table, write_result  # noqa: E402

FRAMES = 626  # 10.016 s of mel frames at 62.5 Hz (313 grouped frames at r=2)
PROMPT_FRAMES = 188  # 3 s


def tiny_checkpoint(folder: Path) -> tuple[Path, object]:
    """The tiny config's MELD with random weights, <EOS> never sampled, saved as a checkpoint."""
    import torch

    from bench.gpu import build
    from meld.models.vocab import EOS
    from meld.training import save_checkpoint

    model, kwargs = build("tiny", "cpu", no_eos=False)
    with torch.no_grad():
        model.head.bias[EOS] = -1e4  # a plain MELD, as the actors rebuild it from the checkpoint
    path = save_checkpoint(folder / "model.pt", system="meld", model=model, model_kwargs=kwargs, extra={"task": "tts"})
    return path, model.eval()


def utterances(n: int, frames: int, n_text: int, seed: int = 0) -> dict:
    """Per-utterance arguments of ``tts_continue``: texts of 40-80 tokens, 3 s prompts, a 10 s guard."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return {
        "texts": [list(rng.integers(1, n_text, rng.integers(40, 81))) for _ in range(n)],
        "prompts": [rng.standard_normal((PROMPT_FRAMES, 80)).astype(np.float32) for _ in range(n)],
        "max_frames": [frames] * n,
    }


OPTIONS = dict(reduction=2, temperature=1.0, top_k=10, top_p=0.95, repetition_penalty=1.2, seed=0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--utterances", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=2, help="the largest pool; rows for 1..W actors (powers of 2 and W)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--rounds", type=int, default=2, help="each row's time is the best of this many runs")
    p.add_argument("--quick", action="store_true", help="4 utterances of 1 s, batch 2")
    p.add_argument("--out", type=result_stem, default="decode_pool")
    args = p.parse_args(argv)
    for name in ("utterances", "batch_size", "workers", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")

    import torch

    from bench.gpu import TINY_TEXT
    from meld.generate import tts_continue
    from ray_jobs.cluster import init_ray
    from ray_jobs.decode_pool import DecodePool

    torch.set_num_threads(1)
    n, frames = (4, 63) if args.quick else (args.utterances, FRAMES)
    batch_size = 2 if args.quick else args.batch_size
    info = machine_info(threads=1)
    pools = sorted({w for w in (1, 2, 4, 8, 16, 32, 64) if w < args.workers} | {args.workers})
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path, model = tiny_checkpoint(Path(tmp))
        items = utterances(n, frames, TINY_TEXT)
        if args.device == "cuda":
            model = model.to("cuda")
        tts_continue(model, **utterances(1, 2, TINY_TEXT, seed=1), batch_size=1, **OPTIONS)  # warm, as the actors are
        one = float("inf")
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            local = tts_continue(model, **items, batch_size=batch_size, **OPTIONS)
            one = min(one, time.perf_counter() - t0)
        rows = [{"how": f"one process ({args.device}, 1 thread)", "workers": 1, "seconds": one, "utt_per_s": n / one,
                 "speedup": 1.0, "efficiency": 1.0, "same_codes": True}]
        print(f"one process: {one:.2f} s", flush=True)
        init_ray(num_cpus=max(pools) if args.device == "cpu" else None)
        for w in pools:
            t0 = time.perf_counter()
            with DecodePool(w, args.device) as pool:
                warm = utterances(w, 2, TINY_TEXT, seed=1)  # each actor loads the model on its first task
                pool.map("tts_continue", str(path), warm, OPTIONS, batch_size=1)
                start_s = time.perf_counter() - t0
                s = float("inf")
                for _ in range(args.rounds):
                    t1 = time.perf_counter()
                    sharded = pool.map("tts_continue", str(path), items, OPTIONS, batch_size=batch_size)
                    if time.perf_counter() - t1 < s:
                        s, device_s = time.perf_counter() - t1, pool.device_seconds
                tasks = list(pool.tasks_run)
            same = [c.codes for c in sharded] == [c.codes for c in local]
            rows.append({"how": f"DecodePool, {w} actor{'s' if w > 1 else ''}", "workers": w, "seconds": s,
                         "utt_per_s": n / s, "speedup": one / s, "efficiency": one / s / w, "same_codes": same,
                         "pool_start_s": start_s, "tasks_per_actor": tasks, "device_s": device_s})
            print(f"{w} actor(s): {s:.2f} s (pool start {start_s:.1f} s)", flush=True)

    print(f"\n# sharded decoding: {n} utterances x {frames / 62.5:.1f} s, batch {batch_size}, {args.device}, "
          f"load average {info['load_average_at_start']}\n")
    print(table(rows, [("how", "decoding"), ("seconds", "s"), ("utt_per_s", "utt/s"), ("speedup", "speed-up"),
                       ("efficiency", "per worker"), ("device_s", "actors' decoding s"), ("same_codes", "same codes"),
                       ("pool_start_s", "pool start s")]))
    out = write_result(args.out, {
        "benchmark": "decode_pool", "quick": args.quick, "machine": info | {"load_average_at_end": load_average()},
        "utterances": n, "frames": frames, "batch_size": batch_size, "device": args.device, "rows": rows,
        "seconds": time.perf_counter() - started,
    })
    print(f"wrote {out.relative_to(Path.cwd()) if out.is_relative_to(Path.cwd()) else out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
