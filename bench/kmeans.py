"""k-means benchmark: faiss (``meld.codebook.fit_kmeans``) vs scikit-learn ``MiniBatchKMeans``.

Both fit the same vectors: the real training split's log-mel frames, normalised with the
training statistics and grouped by the reduction factor of params.yaml (r=2: 166,658
vectors of 160 dims on the mini corpus; ``--reduction 1`` gives 333,857 x 80, subsampled to
``--max-vectors``). For 256 codes (params.yaml) and 1024 codes:

* faiss: ``fit_kmeans(vectors, K, niter=codebook.niter, seed, max_vectors)`` exactly as the
  codebook stage calls it, and with fewer iterations (``--faiss-niter``, default 5 and 10) to
  compare at equal inertia;
* scikit-learn ``MiniBatchKMeans(n_clusters=K, random_state=seed, n_init=1)`` with its default
  batch size (1024) and early stopping, and with ``batch_size=8192`` (sklearn advises large
  batches on several cores).

Reported: fit seconds (best of ``--repeats``), inertia = mean squared Euclidean distance of every
vector to its nearest centroid (computed the same way for all, exact search), codes used, and
ratios against faiss. Same thread count for all (OpenMP in both libraries).

Run (from the repository root):
    .venv/bin/python -m bench.kmeans            # full (~2-4 min on 2 cores)
    .venv/bin/python -m bench.kmeans --quick    # 256 codes only, 50k vectors
Options: --threads N, --clock wall|cpu, --reduction R, --max-vectors N, --repeats N, --faiss-niter 5,10,
--data DIR, --out NAME.
Needs scikit-learn (in the project's ``test`` extra).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="256 codes only, 50k vectors, one repeat")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count(), help="OpenMP threads for faiss and sklearn"
    )
    parser.add_argument(
        "--reduction", type=int, default=None, help="frames per vector (default: params.yaml)"
    )
    parser.add_argument("--max-vectors", type=int, default=170_000, help="uniform subsample above this many")
    parser.add_argument("--repeats", type=int, default=2, help="fits per method; the fastest counts")
    parser.add_argument(
        "--faiss-niter",
        type=lambda v: [int(x) for x in v.split(",") if x],
        default=[5, 10],
        help="extra faiss rows with fewer Lloyd iterations (comma-separated), to compare at equal inertia",
    )
    parser.add_argument("--data", default=None, help="pipeline outputs: features/ (default: ./data)")
    parser.add_argument("--out", default="kmeans", help="results file stem under bench/results/")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall (default) or cpu: CPU seconds (all threads), immune to time-slicing; use with --threads 1",
    )
    args = parser.parse_args(argv)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):  # before numpy/faiss load
        os.environ[var] = str(args.threads)

    import faiss
    import numpy as np
    import sklearn
    import yaml
    from sklearn.cluster import MiniBatchKMeans
    from threadpoolctl import threadpool_limits

    from bench._common import ROOT, load_average, machine_info, now, table, use_clock, write_result

    use_clock(args.clock)
    from meld.codebook import fit_kmeans, grouped_vectors
    from meld.store import FeatureStore, load_stats

    faiss.omp_set_num_threads(args.threads)
    data = Path(args.data or ROOT / "data").resolve()
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    cb = params["codebook"]
    r = args.reduction or int(params["model"]["reduction_factor"])
    q = args.quick
    max_vectors = 50_000 if q else args.max_vectors
    repeats = 1 if q else args.repeats
    sizes = [256] if q else [256, 1024]
    seed = int(cb["seed"])

    store = FeatureStore(data / "features/train")
    stats = load_stats(data / "features/stats.json")
    vectors = grouped_vectors([stats.normalise(store[i]) for i in range(len(store))], r)
    total = len(vectors)
    if total > max_vectors:
        vectors = vectors[np.random.default_rng(seed).choice(total, max_vectors, replace=False)]
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    info = machine_info(args.threads)
    info["faiss"] = faiss.__version__
    info["sklearn"] = sklearn.__version__
    print(
        f"# k-means benchmark: {len(vectors):,} vectors x {vectors.shape[1]} dims (r={r}, of {total:,}), "
        f"{args.threads} thread(s), load average {info['load_average_at_start']}",
        flush=True,
    )

    def inertia(centroids: np.ndarray) -> tuple[float, int]:
        index = faiss.IndexFlatL2(centroids.shape[1])
        index.add(np.ascontiguousarray(centroids, dtype=np.float32))
        dist, idx = index.search(vectors, 1)
        return float(dist.mean()), int(len(np.unique(idx)))

    methods = {
        "faiss (fit_kmeans)": lambda k: fit_kmeans(
            vectors, k, niter=int(cb["niter"]), seed=seed, max_vectors=int(cb["max_vectors"])
        )[0],
        **{
            f"faiss (fit_kmeans, niter={n})": (
                lambda k, n=n: fit_kmeans(vectors, k, niter=n, seed=seed, max_vectors=int(cb["max_vectors"]))[
                    0
                ]
            )
            for n in args.faiss_niter
        },
        "sklearn MiniBatchKMeans (batch 1024)": lambda k: (
            MiniBatchKMeans(n_clusters=k, random_state=seed, n_init=1).fit(vectors).cluster_centers_
        ),
        "sklearn MiniBatchKMeans (batch 8192)": lambda k: (
            MiniBatchKMeans(n_clusters=k, random_state=seed, n_init=1, batch_size=8192)
            .fit(vectors)
            .cluster_centers_
        ),
    }
    rows = []
    t_all = time.perf_counter()
    with threadpool_limits(limits=args.threads):
        for k in sizes:
            base = None
            for name, fit in methods.items():
                times, cents = [], None
                for _ in range(repeats):
                    t = now()
                    cents = fit(k)
                    times.append(now() - t)
                mse, used = inertia(cents)
                row = {
                    "codes": k,
                    "method": name,
                    "seconds": min(times),
                    "all_seconds": times,
                    "inertia": mse,
                    "inertia_per_dim": mse / vectors.shape[1],
                    "codes_used": used,
                }
                if base is None:
                    base = row
                row["time_vs_faiss"] = row["seconds"] / base["seconds"]
                row["inertia_vs_faiss"] = row["inertia"] / base["inertia"]
                rows.append(row)
                print(f"  K={k} {name}: {row['seconds']:.2f} s, inertia {mse:.3f}", flush=True)
    print()
    print(
        table(
            rows,
            [
                ("codes", "K"),
                ("method", "method"),
                ("seconds", "fit s"),
                ("time_vs_faiss", "time / faiss"),
                ("inertia", "inertia (mean sq. dist)"),
                ("inertia_vs_faiss", "inertia / faiss"),
                ("codes_used", "codes used"),
            ],
        )
    )
    info["load_average_at_end"] = load_average()
    path = write_result(
        args.out,
        {
            "benchmark": "kmeans",
            "quick": q,
            "machine": info,
            "data": str(data),
            "reduction": r,
            "vectors": len(vectors),
            "dim": int(vectors.shape[1]),
            "total_vectors": total,
            "niter": int(cb["niter"]),
            "repeats": repeats,
            "rows": rows,
            "seconds": time.perf_counter() - t_all,
        },
    )
    print(f"wrote {path.relative_to(ROOT)} in {time.perf_counter() - t_all:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
