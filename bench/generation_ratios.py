"""The two tiny-config generation targets of issue 6, alone and repeated: KV-cached vs full
recompute at batch 1, and batch-16 vs batch-1 throughput, for 10 s of speech (313 grouped frames).

It runs ``bench.generation``'s own cells (each in a fresh process) for ``kv`` batch 1, ``kv`` batch
16 and ``full`` batch 1, ``--rounds`` times interleaved, and prints the best of each with the two
ratios: a quicker, repeatable check than the full ``bench.generation`` table (~1 min per round).

Run (from the repository root):
    .venv/bin/python -m bench.generation_ratios --data data --rounds 3 --threads 1 --clock cpu
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CELLS = [("kv", 1, 3), ("kv", 16, 2), ("full", 1, 1)]  # path, batch, repeats inside the cell
TARGETS = {"kv_vs_full": 10.0, "b16_vs_b1": 6.0}


def run_cell(data: str, path: str, batch: int, repeats: int, threads: int, clock: str) -> float:
    cell = {"data": data, "kind": "gen", "config": "tiny", "path": path, "batch": batch, "frames": 313,
            "mode": "measured", "steps": 0, "repeats": repeats}
    out = subprocess.run(
        [sys.executable, "-m", "bench.generation", "--threads", str(threads), "--clock", clock,
         "--cell", json.dumps(cell)],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout
    result = json.loads([line for line in out.splitlines() if line.startswith("RESULT ")][-1][len("RESULT "):])
    return float(result["wall_s"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(ROOT / "data"), help="pipeline outputs: bpe/, codebook/, features/")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=("wall", "cpu"), default="cpu")
    args = p.parse_args(argv)
    data = str(Path(args.data).resolve())
    best: dict[tuple, float] = {}
    for r in range(args.rounds):
        for path, batch, repeats in CELLS:
            s = run_cell(data, path, batch, repeats, args.threads, args.clock)
            best[(path, batch)] = min(s, best.get((path, batch), float("inf")))
            print(f"round {r + 1}: {path} batch {batch}: {s:.3f} s", flush=True)
    kv1, kv16, full1 = best[("kv", 1)], best[("kv", 16)], best[("full", 1)]
    ratios = {"kv_vs_full": full1 / kv1, "b16_vs_b1": 16 * kv1 / kv16}
    print(f"\nbest of {args.rounds}, {args.threads} thread(s), {args.clock} clock: KV batch 1 {kv1:.3f} s, "
          f"KV batch 16 {kv16:.3f} s, full recompute batch 1 {full1:.3f} s")
    for name, value in ratios.items():
        verdict = "met" if value >= TARGETS[name] else "NOT met"
        print(f"{name}: {value:.2f}x (target {TARGETS[name]:g}x: {verdict})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
