"""codebook stage: faiss k-means on normalised training frames, one codebook per reduction factor.

    python -m pipeline.codebook --params params.yaml --features data/features --out data/codebook

Writes ``<out>/r{r}.npy`` (K, 80r) centroids and ``<out>/summary.json`` (distortion, usage).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from meld.codebook import assign, fit_kmeans, keep_probability, thinned_grouped_vectors
from meld.config import CodebookConfig, ConfigError, load_section, run_stage
from meld.progress import progress
from meld.staging import staged_folder
from meld.store import FeatureStore, load_stats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--features", default="data/features")
    p.add_argument("--out", default="data/codebook")
    args = p.parse_args(argv)
    cfg = load_section(args.params, "codebook", CodebookConfig)
    features, out = Path(args.features), Path(args.out)
    stats = load_stats(features / "stats.json")
    store = FeatureStore(features / "train")
    # one pass over the split, thinning as it reads: memory ~ max_vectors per reduction factor, not
    # the whole split (LibriSpeech: ~216M frames); the mini corpus at r=2 keeps every vector
    keep = {r: keep_probability(store.lengths, r, cfg.max_vectors) for r in cfg.reduction_factors}
    rng = np.random.default_rng(cfg.seed)
    parts: dict[int, list[np.ndarray]] = {r: [] for r in cfg.reduction_factors}
    # every reduction factor's centroids of one run, or the old ones untouched; entered before the
    # read so that an --out the stage must not replace is refused before the long part
    with staged_folder(out, holds="r*.npy", inputs=[features]) as work:
        for i in progress(range(len(store)), desc="codebook: read frames", unit="utt"):
            mel = stats.normalise(store[i])
            for r in cfg.reduction_factors:
                parts[r].append(thinned_grouped_vectors(mel, r, keep[r], rng))
        write_codebooks(parts, cfg, store, features, work)
    return 0


def write_codebooks(parts: dict[int, list[np.ndarray]], cfg: CodebookConfig, store: FeatureStore, features: Path,
                    out: Path) -> None:
    """Fit and save each reduction factor's centroids (``r{r}.npy``) and ``summary.json`` into ``out``."""
    # every reduction factor is checked before any is fitted (a fit can take minutes); a ConfigError, so that
    # the stage ends in this one line rather than a traceback
    for r in cfg.reduction_factors:
        n = sum(len(v) for v in parts[r])
        if n < cfg.size:
            raise ConfigError(f"codebook r={r}: {n} training vectors in {features / 'train'} are too few "
                              f"for {cfg.size} codes: lower codebook.size or give the corpus more training audio")
    summary = {}
    for r in cfg.reduction_factors:
        vectors = np.concatenate(parts.pop(r))
        t0 = time.perf_counter()
        centroids, distortion = fit_kmeans(vectors, cfg.size, niter=cfg.niter, seed=cfg.seed, max_vectors=cfg.max_vectors,
                                            max_points_per_centroid=cfg.max_points_per_centroid,
                                            pca_dims=cfg.pca_dims, init=cfg.init)
        usage = np.bincount(assign(vectors[: cfg.max_vectors], centroids), minlength=cfg.size)
        np.save(out / f"r{r}.npy", centroids)
        summary[f"r{r}"] = {
            "codes": cfg.size, "dim": int(vectors.shape[1]),
            "vectors": sum(n // r for n in store.lengths), "vectors_read": int(len(vectors)),
            "mean_sq_error_per_dim": distortion, "codes_used": int((usage > 0).sum()),
        }
        # the time goes to the log, not to summary.json: a clock reading in the output folder gave the
        # same centroids a new hash on every run, and DVC then retrained every system that uses them
        print(f"r={r}: {summary[f'r{r}']} ({time.perf_counter() - t0:.2f} s)")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    sys.exit(run_stage("codebook", main))
