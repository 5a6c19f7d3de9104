"""Helpers shared by the benchmarks: machine description, memory probes, tables, result files.

Not a benchmark itself. Every benchmark writes ``bench/results/<name>.json`` holding
``machine`` (from :func:`machine_info`), its settings and its rows.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> list[float]:
    """1/5/15-minute load averages: other processes on a shared machine slow every timing."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine_info(threads: int | None = None) -> dict:
    """CPU model, cores, library versions and the thread count the timings ran with."""
    import numpy as np
    import torch

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "torch": torch.__version__,
        "torch_threads": threads if threads is not None else torch.get_num_threads(),
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": commit,
        "clock": clock_name(),
        "load_average_at_start": load_average(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


CLOCKS = ("wall", "cpu")


def use_clock(name: str) -> None:
    """Pick the timer for this process and the cells it starts: ``wall`` (``perf_counter``) or
    ``cpu`` (``process_time``: CPU seconds of this process, all threads). On a shared, loaded
    machine a one-thread run timed in CPU seconds is immune to time-slicing, which inflates wall time
    by the load factor; with several threads ``cpu`` counts every thread's time."""
    if name not in CLOCKS:
        raise ValueError(f"clock must be one of {CLOCKS}, got {name!r}")
    os.environ["BENCH_CLOCK"] = name


def now() -> float:
    """The chosen clock (see :func:`use_clock`), in seconds."""
    return time.process_time() if os.environ.get("BENCH_CLOCK", "wall") == "cpu" else time.perf_counter()


def clock_name() -> str:
    return os.environ.get("BENCH_CLOCK", "wall")


def current_rss() -> int:
    """Resident set size of this process now, in bytes (/proc/self/statm)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """High-water RSS of this process so far, in bytes.

    Linux's ``VmHWM`` (/proc/self/status), which starts afresh at ``exec``. Not ``ru_maxrss``: Linux
    carries it over from the parent that started the process, so a fresh process per cell reported
    at least its parent's RSS (bench.model_loading's parent, having written a 0.7 GB checkpoint, made
    every row's peak 0.7 GB too high). ``ru_maxrss`` only where there is no /proc.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def smaps_rollup(pid: int | str = "self") -> dict[str, int]:
    """A process's memory totals over its mappings (Rss, Pss, Private_Clean, Private_Dirty, ...), in bytes:
    where pages shared between processes (PSS) matter, which RSS counts in full in each."""
    lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]
    return {f[0].rstrip(":"): int(f[1]) * 1024 for f in (line.split() for line in lines) if len(f) >= 2}


def reset_peak_rss() -> bool:
    """Restart this process's high-water RSS (``VmHWM``) from its RSS now, so that :func:`peak_rss` then
    reports the peak of what runs after this call alone.

    Freed heap memory goes back to the OS first (glibc's ``malloc_trim``), so the new baseline holds
    only live memory. Returns False where Linux's ``/proc/self/clear_refs`` is missing: the peak then
    still counts from the process start.
    """
    from meld.training import return_freed_heap

    return_freed_heap()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # 5: reset the peak RSS (Documentation/filesystems/proc.rst)
    except OSError:
        return False
    return True


def fmt(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int) and abs(v) >= 10_000:
        return f"{v:,}"
    if isinstance(v, float):
        if v != v:
            return "nan"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}g}" if abs(v) < 1 else f"{v:.{max(1, digits - 1)}f}".rstrip("0").rstrip(".")
    return str(v)


def table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A markdown table: ``columns`` = [(key, header)]."""
    head = "| " + " | ".join(h for _, h in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def result_stem(name: str) -> str:
    """argparse type of ``--out``: a file stem under bench/results/, checked before a long run, not after it."""
    import argparse

    if not name or name != Path(name).name or name in (".", ".."):
        raise argparse.ArgumentTypeError(
            f"--out {name!r}: give a file stem (e.g. generation-xeon); results always go to {RESULTS.relative_to(ROOT)}/"
        )
    return name


def write_result(name: str, payload: dict, also: Path | None = None) -> Path:
    """Write ``bench/results/<name>.json`` atomically, and the same file into the folder ``also`` if given;
    returns the first path."""
    text = json.dumps(payload, indent=2, default=float) + "\n"
    for folder in (RESULTS, *([also] if also is not None else [])):
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return RESULTS / f"{name}.json"


def run_cell(module: str, cell: dict, threads: int, timeout: float = 900) -> dict:
    """Run one measurement in a fresh interpreter (so ``ru_maxrss`` peaks don't leak between cells).

    The child is ``python -m <module> --cell '<json>' --threads N`` and must print one line
    ``RESULT <json>`` on stdout.
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):  # numpy/faiss BLAS too
        env[var] = str(threads)
    cmd = [sys.executable, "-m", module, "--cell", json.dumps(cell), "--threads", str(threads)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(
        f"cell {cell} failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )


def emit(result: dict) -> None:
    """What a cell prints for :func:`run_cell`."""
    print("RESULT " + json.dumps(result, default=float), flush=True)


def set_threads(n: int) -> None:
    """Thread count for torch (intra-op) and, through the environment, for BLAS/OpenMP in children."""
    import torch

    torch.set_num_threads(n)


PAPER_CONFIG = ROOT / "configs" / "paper.yaml"


@functools.cache
def paper_config() -> dict:
    """``configs/paper.yaml``, read once per process (every paper row of every bench asks for it)."""
    import yaml

    return yaml.safe_load(PAPER_CONFIG.read_text())


def paper_meld_kwargs(reduction_factor: int | None = None) -> dict:
    """MELD constructor kwargs of ``configs/paper.yaml`` (its model section, BPE and codebook sizes),
    so the benchmarks time exactly the configuration a paper-scale run trains.

    ``reduction_factor``, when given, replaces the file's: the generation benches time the paper
    model on the tiny config's frame grouping, so 10 s of speech is the same number of decoding
    steps in both rows.
    """
    import dataclasses

    from meld.config import ModelConfig
    from meld.models.builders import system_kwargs
    from ray_jobs.train import _merge

    raw = paper_config()
    section = raw.get("meld") or {}  # MELD's own overrides and args, merged as the training driver merges them
    cfg = ModelConfig.from_dict(_merge(raw["model"], section.get("model") or {}), "model")
    if reduction_factor is not None:
        cfg = dataclasses.replace(cfg, reduction_factor=reduction_factor)
    return system_kwargs("meld", cfg, n_text=int(raw["bpe"]["vocab_size"]), codebook_size=int(raw["codebook"]["size"]),
                         args=section.get("args"))


def paper_frames_per_worker() -> int:
    """Frames one of the paper run's workers trains on per step: ``configs/paper.yaml``'s ``frames_per_batch``."""
    return int(paper_config()["train"]["frames_per_batch"])


def paper_frames_per_batch() -> int:
    """The paper's global batch in frames: ``configs/paper.yaml``'s workers x frames per worker (50k)."""
    return int(paper_config()["train"]["num_workers"]) * paper_frames_per_worker()


def config_meld_kwargs(config: str) -> dict:
    """MELD constructor kwargs of ``config``: ``paper`` (configs/paper.yaml, :func:`paper_meld_kwargs`)
    or ``tiny`` (params.yaml's model, BPE and codebook sizes)."""
    if config == "paper":
        return paper_meld_kwargs()
    import yaml

    from meld.config import ModelConfig
    from meld.models.builders import meld_kwargs

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    return meld_kwargs(ModelConfig.from_dict(raw["model"], "model"), n_text=int(raw["bpe"]["vocab_size"]),
                       codebook_size=int(raw["codebook"]["size"]))


def memory_bench_args(doc: str, default_out: str, argv=None):
    """The arguments of a memory benchmark whose rows each run in a fresh process (:func:`run_cell`):
    ``--config paper|tiny``, ``--out`` and the hidden ``--cell`` / ``--threads`` of a row's process."""
    import argparse

    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--config", choices=("paper", "tiny"), default="paper")
    p.add_argument("--out", type=result_stem, default=default_out, help="results file stem under bench/results/")
    p.add_argument("--cell", help=argparse.SUPPRESS)  # one row, in a fresh process (run_cell)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    return p.parse_args(argv)
