"""Model-loading memory benchmark: what loading a checkpoint for inference holds, side by side.

One joint MELD checkpoint (``--config paper``: configs/paper.yaml's model, ~187M parameters, ~0.75 GB;
``tiny``: params.yaml's), with random weights and the extras an exported ``model.pt`` carries, is
loaded in a fresh process per row (so one row's peak does not leak into the next):

* ``torch.load + load_state_dict``: the straightforward loader (the file read whole, the model
  built and filled, the state kept for its extras), which ``load_model`` was until the twenty-eighth
  session;
* ``load_model``: the file mapped, the weights copied into the model, the state returned without them;
* ``load_model(weights=False)``: structure only, on the meta device (the pooled evaluation's process);
* ``evaluate, in-process``: what the evaluate stage loads for a joint model judged by itself
  (``evaluate.stt_judge_model`` naming the evaluated checkpoint, as the e2e test's params do): the
  model, its STT side as a :func:`meld.training.weight_sharing_copy`, the judge the same STT side;
* ``evaluate, each loaded``: the same three models each loaded from the file (the stage before).

Reported per row: the distinct copies of the weights it holds, RSS held once loaded (the models and
states still referenced, after garbage collection), peak RSS growth (``VmHWM``), and wall seconds.

Then, side by side, what :data:`PROCESSES` processes loading the checkpoint at once hold (the decode
pool's CPU actors on one node), summed over them from /proc/<pid>/smaps_rollup: PSS (shared pages
counted once in all) and private memory, each process's growth from just before its load, once
every process has loaded and again after each has generated a few frames:

* ``copied``: ``load_model``, every process its own copy of the weights;
* ``mapped``: ``load_model(share_file_pages=True)``, the weights the file's pages in the page cache;
* ``mapped, decoding-layout file``: the same of a copy of the checkpoint saved after
  ``prepare_for_decoding`` (its Linear weights stored (in, out)-contiguous), which decoding on CPU
  does not re-lay into private memory as it does a checkpoint's usual (out, in) order.

Run (from the repository root):
    .venv/bin/python -m bench.model_loading                  # paper config (~1.5 min, ~6 GB peak in all)
    .venv/bin/python -m bench.model_loading --config tiny
Options: --config paper|tiny, --out NAME.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from bench import _common as C

MB = 2**20
ROWS = ("torch.load + load_state_dict", "load_model", "load_model(weights=False)",
        "evaluate, in-process", "evaluate, each loaded")
PROCESSES = 4  # loading one checkpoint at once in the side-by-side rows: a node's CPU decoding actors
SHARING = ("copied", "mapped", "mapped, decoding-layout file")
STAGES = ("loaded", "decoded")


def make_checkpoint(config: str, folder: Path) -> Path:
    """A joint MELD of ``config`` with random weights and an exported model's extras."""
    import numpy as np
    import torch

    from meld.features import N_MELS
    from meld.models.builders import build_model
    from meld.text import train_bpe
    from meld.training import save_checkpoint

    kwargs = C.config_meld_kwargs(config)
    bpe = train_bpe(["the quick brown fox jumps over the lazy dog"] * 4, folder / "bpe", vocab_size=30)
    r = int(kwargs["frame_dim"]) // N_MELS
    extra = {"task": "joint", "reduction_factor": r, "norm_mean": torch.zeros(N_MELS), "norm_std": torch.ones(N_MELS),
             "bpe_model": torch.from_numpy(np.frombuffer(bpe.read_bytes(), dtype=np.uint8).copy())}
    torch.manual_seed(0)
    return save_checkpoint(folder / "model.pt", system="meld", model=build_model("meld", kwargs), model_kwargs=kwargs,
                           step=1, extra=extra)


def load(row: str, path: str) -> list:
    """What ``row`` loads from ``path``; returned so that it stays referenced while RSS is read."""
    import torch

    from meld.models.builders import build_model
    from meld.training import load_model, weight_sharing_copy
    from pipeline.evaluate import load_stt_judge, load_stt_model, stt_model

    if row == "torch.load + load_state_dict":
        state = torch.load(path, map_location="cpu", weights_only=True)
        model = build_model(state["system"], state["model_kwargs"])
        model.load_state_dict(state["model"])
        return [model, state]
    if row in ("load_model", "load_model(weights=False)"):
        return list(load_model(path, weights=row == "load_model"))
    model, state = load_model(path)
    if row == "evaluate, in-process":
        stt = stt_model(weight_sharing_copy(model), state, path)
        return [model, state, stt, load_stt_judge(path, 0.0, "cpu", evaluated=stt)]
    return [model, state, load_stt_model(path), load_stt_judge(path, 0.0, "cpu")]


def make_decoding_layout_copy(path: Path) -> Path:
    """``path``'s checkpoint saved again after :func:`prepare_for_decoding`: the same values, each CPU
    Linear weight stored in the order a decoding step reads it."""
    from meld.models.backbone import prepare_for_decoding
    from meld.training import load_model, save_checkpoint

    model, state = load_model(path)
    prepare_for_decoding(model)
    return save_checkpoint(path.with_name("model-decoding-layout.pt"), system=state["system"], model=model,
                           model_kwargs=state["model_kwargs"], step=state["step"], extra=state["extra"])


def sharing_cell(spec: dict) -> None:
    """One of the side-by-side processes: loads, then generates, and after each stage prints ``STAGE
    <name>``, waits for a line on stdin (every process has reached it: pages several of them map are
    then shared), and prints its memory's growth since before the load as ``MEASURE <json>``."""
    import numpy as np

    import meld.models.meld  # noqa: F401 (the model's code in memory before the first reading)
    from meld.generate import tts_continue
    from meld.training import load_model

    def reached(stage: str) -> None:
        print(f"STAGE {stage}", flush=True)
        sys.stdin.readline()
        now = C.smaps_rollup()
        print("MEASURE " + json.dumps({k: now[k] - before[k] for k in ("Rss", "Pss", "Private_Clean", "Private_Dirty")}),
              flush=True)

    gc.collect()
    before = C.smaps_rollup()
    model, state = load_model(spec["path"], share_file_pages=spec["sharing"] != "copied")
    gc.collect()
    reached("loaded")
    r = int(state["extra"]["reduction_factor"])
    tts_continue(model, [[5, 6, 7]], [np.zeros((2 * r, 80), dtype=np.float32)], reduction=r, max_frames=2 * r,
                 temperature=1.0, top_k=8, top_p=0.95, repetition_penalty=1.2, batch_size=1)
    gc.collect()
    reached("decoded")
    sys.stdin.readline()  # exit only once every process has measured: its pages stay shared till then


def side_by_side(sharing: str, path: Path) -> list[dict]:
    """:data:`PROCESSES` processes loading ``path`` at once, ``sharing`` it or not: one row per stage."""
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(C.ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "bench.model_loading", "--cell", json.dumps({"sharing": sharing, "path": str(path)}),
           "--threads", "1"]
    procs = [subprocess.Popen(cmd, cwd=C.ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for _ in range(PROCESSES)]

    def next_line(proc, prefix: str) -> str:
        for line in proc.stdout:
            if line.startswith(prefix):
                return line[len(prefix):].strip()
        raise RuntimeError(f"{sharing}: a loading process ended (rc={proc.wait()}) before {prefix.strip()}")

    rows = []
    try:
        for stage in STAGES:
            for proc in procs:
                next_line(proc, "STAGE ")
            for proc in procs:
                proc.stdin.write("measure\n")
                proc.stdin.flush()
            grown = [json.loads(next_line(proc, "MEASURE ")) for proc in procs]
            private = [g["Private_Clean"] + g["Private_Dirty"] for g in grown]
            rows.append({"sharing": sharing, "stage": stage, "pss_mb": sum(g["Pss"] for g in grown) / MB,
                         "private_mb": sum(private) / MB, "rss_mb": sum(g["Rss"] for g in grown) / MB,
                         "private_each_mb": max(private) / MB})
        for proc in procs:
            proc.communicate("exit\n", timeout=120)
    finally:
        for proc in procs:
            proc.kill()
    return rows


def cell(spec: dict) -> dict:
    # every module a row uses imported first: RSS then grows by what is loaded, not by code
    import importlib

    for module in ("torch", "meld.models.builders", "meld.models.meld", "meld.training", "pipeline.evaluate"):
        importlib.import_module(module)
    gc.collect()
    before_rss, before_peak = C.current_rss(), C.peak_rss()
    start = time.perf_counter()
    held = load(spec["row"], spec["path"])
    seconds = time.perf_counter() - start
    gc.collect()
    return {"row": spec["row"], "held_mb": (C.current_rss() - before_rss) / MB,
            "peak_mb": (C.peak_rss() - max(before_peak, before_rss)) / MB, "seconds": seconds,
            "weight_copies": weight_copies(held)}


def weight_copies(held: list) -> int:
    """Distinct sets of weights in memory among what a row holds (models, STT models, states), told
    apart by where their first tensor's data lies; meta tensors hold none."""
    import torch

    where = set()
    for h in held:
        h = getattr(h, "model", h)  # an STTModel's module
        first = (next(h.parameters()) if isinstance(h, torch.nn.Module)
                 else next(iter(h["model"].values()), None) if isinstance(h, dict) and "model" in h else None)
        if first is not None and not first.is_meta:
            where.add(first.data_ptr())
    return len(where)


def main(argv=None) -> int:
    args = C.memory_bench_args(__doc__, "model_loading", argv)
    if args.cell:
        spec = json.loads(args.cell)
        if "sharing" in spec:
            sharing_cell(spec)
        else:
            C.emit(cell(spec))
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-loading-") as tmp:
        path = make_checkpoint(args.config, Path(tmp))
        size_mb = path.stat().st_size / MB
        rows = [C.run_cell("bench.model_loading", {"row": row, "path": str(path)}, threads=1) for row in ROWS]
        decoding_layout = make_decoding_layout_copy(path)
        shared = [row for sharing in SHARING
                  for row in side_by_side(sharing, decoding_layout if "decoding-layout" in sharing else path)]
    print(f"{args.config} config: a joint MELD checkpoint of {size_mb:.0f} MB, each row in a fresh process\n")
    print(C.table(rows, [("row", "loads"), ("weight_copies", "weight copies"), ("held_mb", "RSS held (MB)"),
                       ("peak_mb", "peak RSS growth (MB)"), ("seconds", "seconds")]))
    print(f"\n{PROCESSES} processes loading it at once, growth summed over them (one process's most in the last column)\n")
    print(C.table(shared, [("sharing", "weights"), ("stage", "once"), ("pss_mb", "PSS (MB)"),
                         ("private_mb", "private (MB)"), ("rss_mb", "RSS (MB)"), ("private_each_mb", "private, one (MB)")]))
    out = C.write_result(args.out, {"bench": "model_loading", "config": args.config, "checkpoint_mb": size_mb,
                                  "machine": C.machine_info(1), "rows": rows, "processes": PROCESSES,
                                  "side_by_side": shared, "command": " ".join(sys.argv)})
    print(f"\nwritten: {out.relative_to(C.ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
