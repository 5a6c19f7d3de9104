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

Run (from the repository root):
    .venv/bin/python -m bench.model_loading                  # paper config (~1 min, ~4 GB peak)
    .venv/bin/python -m bench.model_loading --config tiny
Options: --config paper|tiny, --out NAME.
"""

from __future__ import annotations

import gc
import json
import sys
import tempfile
import time
from pathlib import Path

from bench import _common as C

MB = 2**20
ROWS = ("torch.load + load_state_dict", "load_model", "load_model(weights=False)",
        "evaluate, in-process", "evaluate, each loaded")


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
        C.emit(cell(json.loads(args.cell)))
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-loading-") as tmp:
        path = make_checkpoint(args.config, Path(tmp))
        size_mb = path.stat().st_size / MB
        rows = [C.run_cell("bench.model_loading", {"row": row, "path": str(path)}, threads=1) for row in ROWS]
    print(f"{args.config} config: a joint MELD checkpoint of {size_mb:.0f} MB, each row in a fresh process\n")
    print(C.table(rows, [("row", "loads"), ("weight_copies", "weight copies"), ("held_mb", "RSS held (MB)"),
                       ("peak_mb", "peak RSS growth (MB)"), ("seconds", "seconds")]))
    out = C.write_result(args.out, {"bench": "model_loading", "config": args.config, "checkpoint_mb": size_mb,
                                  "machine": C.machine_info(1), "rows": rows, "command": " ".join(sys.argv)})
    print(f"\nwritten: {out.relative_to(C.ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
