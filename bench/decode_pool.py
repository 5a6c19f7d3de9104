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

Then (CPU only) what the pool's actors hold in memory, from each actor process's /proc/<pid>/smaps_rollup
summed over the ``--workers`` actors: PSS (a page shared by n processes counted 1/n in each), private
(Private_Clean + Private_Dirty) and RSS, once the pool has started and again once every actor has loaded
the checkpoint and decoded; plus the PSS of the checkpoint file's own mapped pages (from /proc/<pid>/smaps).
Two pools, one after the other, each with fresh actors, decode the same weights (a joint MELD of
``--memory-config``, with an exported model's extras) from two files:

* ``decoding layout``: saved after ``prepare_for_decoding``, as the training driver exports model.pt: the
  actors decode on the file's pages, shared through the page cache (one copy on the node);
* ``training layout``: saved without it (a training checkpoint): decoding re-lays each Linear weight into
  the actor's private memory, one copy per actor.

Run (from the repository root):
    .venv/bin/python -m bench.decode_pool                      # 32 utterances, 1 and 2 actors (~1.5 min on 2 cores)
    .venv/bin/python -m bench.decode_pool --quick              # 4 utterances of 1 s, batch 2
    .venv/bin/python -m bench.decode_pool --device cuda --workers 8 --utterances 512 --batch-size 16
    .venv/bin/python -m bench.decode_pool --memory-config paper   # the memory rows on the paper model (0.7 GB file)
Options: --utterances N, --batch-size B, --workers W, --rounds R, --device cpu|cuda, --quick,
--memory-config tiny|paper, --out NAME.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import load_average, machine_info, result_stem, smaps_rollup, table, write_result  # noqa: E402

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
MB = 2**20
LAYOUTS = ("decoding layout", "training layout")  # the memory rows' checkpoints, in the order they are measured
MEMORY_FRAMES = 16  # frames each actor generates in the memory rows: enough to run the decoding path


class NotThisNode(RuntimeError):
    """A decoding actor runs on another node of the cluster: its /proc is not readable here."""


def actor_pids(pool) -> list[int]:
    """The process ids of ``pool``'s actors, through Ray's State API (the dashboard ``init_ray`` starts).

    ``pool.actors`` and a handle's ``_actor_id`` are private: the pool exposes no process ids, and this
    bench may not change it. /proc is read here, so every actor must run on this node."""
    import ray
    from ray.util.state import get_actor

    here = ray.get_runtime_context().get_node_id()
    pids = []
    for handle in pool.actors:
        state = get_actor(handle._actor_id.hex())
        if state is None or not state.pid:
            raise RuntimeError(f"decoding actor {handle._actor_id.hex()}: the Ray State API knows no process for it")
        if state.node_id != here:
            raise NotThisNode(f"decoding actor {state.actor_id} runs on node {state.node_id}, not this one: its "
                              "memory is read from this node's /proc (run the bench on a local Ray cluster)")
        pids.append(state.pid)
    return pids


def file_pss(pid: int, path: Path) -> int:
    """PSS in bytes of ``path``'s pages mapped into process ``pid`` (its mappings of the file in /proc/<pid>/smaps)."""
    total, inside = 0, False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5 and not fields[0].endswith(":"):  # a mapping's header
            inside = len(fields) >= 6 and " ".join(fields[5:]) == str(path)
        elif inside and fields[0] == "Pss:":
            total += int(fields[1]) * 1024
    return total


def actors_memory(pool, layout: str, stage: str, checkpoint: Path) -> dict:
    """``pool``'s actors' memory now, summed over them (one row of the memory table)."""
    pids = actor_pids(pool)
    each = [smaps_rollup(pid) for pid in pids]
    return {"checkpoint": layout, "stage": stage, "actors": len(pids), "pss_mb": sum(m["Pss"] for m in each) / MB,
            "private_mb": sum(m["Private_Clean"] + m["Private_Dirty"] for m in each) / MB,
            "rss_mb": sum(m["Rss"] for m in each) / MB,
            "file_pss_mb": sum(file_pss(pid, checkpoint) for pid in pids) / MB}


def memory_rows(config: str, workers: int, folder: Path) -> tuple[list[dict], float]:
    """The actors' memory of a pool per :data:`LAYOUTS`, each pool started afresh (its own actor
    processes: no model of the other file held); and the checkpoint's size in MB."""
    from bench._common import config_meld_kwargs
    from bench.model_loading import make_checkpoint, make_decoding_layout_copy
    from meld.features import N_MELS
    from ray_jobs.decode_pool import DecodePool

    training = make_checkpoint(config, folder)
    files = {"training layout": training, "decoding layout": make_decoding_layout_copy(training)}
    kwargs = config_meld_kwargs(config)
    r = int(kwargs["frame_dim"]) // N_MELS
    # one utterance per actor, batch 1: the first dispatch hands each idle actor one task, so every actor loads and decodes
    items = utterances(workers, MEMORY_FRAMES, int(kwargs["n_text"]), seed=2)
    rows = []
    for layout in LAYOUTS:
        path = files[layout].resolve()
        with DecodePool(workers, "cpu") as pool:
            rows.append(actors_memory(pool, layout, "started", path))
            pool.map("tts_continue", str(path), items, dict(OPTIONS, reduction=r), batch_size=1)
            if min(pool.tasks_run) < 1:
                raise RuntimeError(f"memory rows, {layout}: an actor decoded nothing ({pool.tasks_run} tasks per actor)")
            rows.append(actors_memory(pool, layout, "decoded", path))
        print(f"memory, {layout}: {rows[-1]['pss_mb']:.0f} MB PSS over {workers} actors after decoding", flush=True)
    return rows, training.stat().st_size / MB


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--utterances", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=2, help="the largest pool; rows for 1..W actors (powers of 2 and W)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--rounds", type=int, default=2, help="each row's time is the best of this many runs")
    p.add_argument("--quick", action="store_true", help="4 utterances of 1 s, batch 2")
    p.add_argument("--memory-config", choices=("tiny", "paper"), default="tiny",
                   help="the model of the memory rows (CPU only): tiny (params.yaml) or paper (configs/paper.yaml)")
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
        memory, checkpoint_mb = [], None
        if args.device == "cpu":  # a GPU actor copies the weights to its device: nothing of the file is shared
            os.mkdir(Path(tmp) / "memory")
            try:
                memory, checkpoint_mb = memory_rows(args.memory_config, args.workers, Path(tmp) / "memory")
            except NotThisNode as err:  # the timing rows above still count: written without the memory rows
                print(f"memory rows left out: {err}", flush=True)

    print(f"\n# sharded decoding: {n} utterances x {frames / 62.5:.1f} s, batch {batch_size}, {args.device}, "
          f"load average {info['load_average_at_start']}\n")
    print(table(rows, [("how", "decoding"), ("seconds", "s"), ("utt_per_s", "utt/s"), ("speedup", "speed-up"),
                       ("efficiency", "per worker"), ("device_s", "actors' decoding s"), ("same_codes", "same codes"),
                       ("pool_start_s", "pool start s")]))
    if memory:
        print(f"\n# the actors' memory, summed over {args.workers} actors: a joint MELD ({args.memory_config} config, "
              f"a {checkpoint_mb:.0f} MB checkpoint) decoded from each file by a fresh pool\n")
        print(table(memory, [("checkpoint", "checkpoint"), ("stage", "once"), ("pss_mb", "PSS (MB)"),
                             ("private_mb", "private (MB)"), ("rss_mb", "RSS (MB)"),
                             ("file_pss_mb", "the file's pages, PSS (MB)")]))
    out = write_result(args.out, {
        "benchmark": "decode_pool", "quick": args.quick, "machine": info | {"load_average_at_end": load_average()},
        "utterances": n, "frames": frames, "batch_size": batch_size, "device": args.device, "rows": rows,
        "memory_config": args.memory_config, "memory_checkpoint_mb": checkpoint_mb, "memory": memory,
        "seconds": time.perf_counter() - started,
    })
    print(f"wrote {out.relative_to(Path.cwd()) if out.is_relative_to(Path.cwd()) else out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
