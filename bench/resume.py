"""Resume memory benchmark: what a training worker holds when it resumes, before and after mapping.

A resuming worker (``ray_jobs/train.py``) has two candidate checkpoints: the run's own folder and
the copy Ray persisted. It keeps the newer one of its configuration. Both are full training
checkpoints: the weights, AdamW's two moments, the scheduler and the sampler. This bench writes
two such checkpoints of one MELD (``--config paper``: configs/paper.yaml's model, ~187M parameters,
~2.2 GB a file; ``tiny``: params.yaml's). Then each row runs in a fresh process, on the CPU:

* ``read both, keep the state``: both files read whole; the state kept for the rest of the run.
  This is what the worker did until the thirty-third session.
* ``map both, drop the state``: both files mapped (``latest_good_checkpoint(..., mmap=True)``), the
  newer restored, the state dropped. This is what it does now.

Each row then takes one AdamW step, as the run's first step would. Reported per row:
- peak RSS growth (``VmHWM``);
- RSS held after restoring and after the first step, split into anonymous memory and file pages
  (``RssAnon`` / ``RssFile``). File pages are the page cache: the kernel can drop them and read
  them back.
- wall seconds to restore.

On a CPU, AdamW's moments stay the mapped file's pages (``Optimizer.load_state_dict`` casts
without copying). The step writes over them privately. On a GPU they are copied to the device,
and nothing of the file stays in host memory. That case is not measured here.

Run (from the repository root):
    .venv/bin/python -m bench.resume                  # paper config (~2 min, ~4.5 GB of /tmp, ~6 GB peak)
    .venv/bin/python -m bench.resume --config tiny
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
ROWS = ("read both, keep the state", "map both, drop the state")


def build(config: str):
    """(system, kwargs, model) of ``config``: the paper's MELD, or params.yaml's."""
    from meld.models.builders import build_model

    kwargs = C.config_meld_kwargs(config)
    return "meld", kwargs, build_model("meld", kwargs)


def make_checkpoints(config: str, folder: Path) -> list[Path]:
    """Two training checkpoint folders, as the run's own and Ray's copy: steps 2 and 4 of one run, with
    AdamW moments for every parameter (written by a real step, as a run's would be)."""
    import torch

    from meld.store import FrameBudgetSampler
    from meld.training import build_optimizer, build_scheduler, save_checkpoint

    torch.manual_seed(0)
    system, kwargs, model = build(config)
    optimizer = build_optimizer(model, 1e-3, 0.01, fused=False)
    scheduler = build_scheduler(optimizer, 1, 10, 10)
    for p in model.parameters():  # moments as a step leaves them, without a forward pass of the model
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()
    sampler = FrameBudgetSampler([100] * 64, 800)
    folders = []
    for step in (2, 4):
        d = folder / f"step{step}"
        save_checkpoint(d / f"step-{step}.pt", system=system, model=model, model_kwargs=kwargs, optimizer=optimizer,
                        scheduler=scheduler, step=step, sampler_state=sampler.state_dict(), extra={"fingerprint": "f"})
        folders.append(d)
    return folders


def rss_split() -> dict:
    """This process's RSS now, as anonymous memory and file pages (MB), freed heap handed back first."""
    from meld.training import return_freed_heap

    return_freed_heap()
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) * 1024 / MB
    return fields


def cell(spec: dict) -> dict:
    import torch

    from meld.store import FrameBudgetSampler
    from meld.training import build_optimizer, build_scheduler, latest_good_checkpoint, restore_training_state

    system, kwargs, model = build(spec["config"])  # built before the baseline: a run builds its model first
    optimizer = build_optimizer(model, 1e-3, 0.01, fused=False)
    scheduler = build_scheduler(optimizer, 1, 10, 10)
    sampler = FrameBudgetSampler([100] * 64, 800)
    gc.collect()
    C.reset_peak_rss()  # the peak of the resume alone, from the built model's RSS
    before, base = rss_split(), C.current_rss()
    start = time.perf_counter()
    mapped = spec["row"].startswith("map")
    candidates = [latest_good_checkpoint(d, mmap=mapped) for d in spec["folders"]]
    state = max(candidates, key=lambda s: int(s["step"]))
    restore_training_state(state, model, optimizer, scheduler)
    sampler.load_state_dict(state["sampler"])
    del candidates
    if mapped:
        state = None
    seconds = time.perf_counter() - start
    gc.collect()
    restored = rss_split()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for p in model.parameters():
        p.grad = None
    gc.collect()
    stepped = rss_split()

    def growth(now: dict, key: str) -> float:
        return now[key] - before[key]

    return {"row": spec["row"], "seconds": seconds, "peak_mb": (C.peak_rss() - base) / MB,
            "restored_anon_mb": growth(restored, "RssAnon"), "restored_file_mb": growth(restored, "RssFile"),
            "stepped_anon_mb": growth(stepped, "RssAnon"), "stepped_file_mb": growth(stepped, "RssFile"),
            "state_held": state is not None}


def main(argv=None) -> int:
    args = C.memory_bench_args(__doc__, "resume", argv)
    if args.cell:
        C.emit(cell(json.loads(args.cell)))
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-resume-") as tmp:
        folders = make_checkpoints(args.config, Path(tmp))
        size_mb = sum(f.stat().st_size for d in folders for f in d.iterdir()) / len(folders) / MB
        rows = [C.run_cell("bench.resume", {"row": row, "config": args.config, "folders": [str(d) for d in folders]},
                           threads=1) for row in ROWS]
    print(f"{args.config} config: two training checkpoints of {size_mb:.0f} MB each, each row in a fresh process, "
          "growth over the built model\n")
    print(C.table(rows, [("row", "resume"), ("peak_mb", "peak RSS growth (MB)"),
                       ("restored_anon_mb", "restored: anon (MB)"), ("restored_file_mb", "restored: file (MB)"),
                       ("stepped_anon_mb", "after a step: anon (MB)"), ("stepped_file_mb", "after a step: file (MB)"),
                       ("seconds", "restore seconds")]))
    out = C.write_result(args.out, {"bench": "resume", "config": args.config, "checkpoint_mb": size_mb,
                                  "machine": C.machine_info(1), "rows": rows, "command": " ".join(sys.argv)})
    print(f"\nwritten: {out.relative_to(C.ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
