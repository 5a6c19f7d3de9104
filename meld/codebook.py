"""The frozen k-means codebook over normalised (grouped) log-mel frames, fitted with faiss."""

from __future__ import annotations

import numpy as np


def grouped_vectors(mels: list[np.ndarray], reduction: int) -> np.ndarray:
    """Concatenate r consecutive frames of each utterance into (N, 80r) vectors (odd tails dropped)."""
    out = [thinned_grouped_vectors(m, reduction, 1.0, None) for m in mels]
    if not sum(len(v) for v in out):
        raise ValueError("no frames to fit a codebook on")
    return np.concatenate(out)


def keep_probability(lengths: list[int], reduction: int, max_vectors: int) -> float:
    """The share of a split's grouped vectors to keep while reading it, so that more than
    ``max_vectors`` survive (``fit_kmeans`` then draws exactly ``max_vectors`` of them): 1 when the
    split has no more than that. ``lengths``: each utterance's frame count (the store's index).

    The survivors are a binomial count of mean mu = keep * total and std below sqrt(mu). mu is 5 %
    over ``max_vectors``, and at least enough that ``max_vectors`` lies 6 std under it: 5 % alone is
    about one std at 1000 vectors, and a shortfall below ``codebook.size`` stopped the stage as if
    the corpus were too small. From ~15,000 vectors up the 5 % is the larger margin.
    """
    total = sum(n // reduction for n in lengths)
    if total <= max_vectors:
        return 1.0
    # mu - 6 sqrt(mu) >= max_vectors  <=>  sqrt(mu) >= (6 + sqrt(36 + 4 max_vectors)) / 2
    six_std = ((6.0 + np.sqrt(36.0 + 4.0 * max_vectors)) / 2.0) ** 2
    return min(1.0, max(1.05 * max_vectors, six_std) / total)


def thinned_grouped_vectors(mel: np.ndarray, reduction: int, keep: float, rng: np.random.Generator | None) -> np.ndarray:
    """One utterance's (T // r, 80r) grouped vectors, each kept with probability ``keep``.

    The codebook stage calls this per utterance while it reads a split, so what it holds is
    ~``keep`` of the split: LibriSpeech's 960 h are ~216M frames, 69 GB in float32, which no
    worker should concatenate to sub-sample 4M of them afterwards. A Bernoulli draw per vector
    keeps the sample uniform over frames, like drawing from the whole concatenation.
    """
    n = (mel.shape[0] // reduction) * reduction
    vectors = np.ascontiguousarray(mel[:n], dtype=np.float32).reshape(n // reduction, mel.shape[1] * reduction)
    return vectors if keep >= 1.0 else vectors[rng.random(len(vectors)) < keep]


def fit_kmeans(
    vectors: np.ndarray,
    n_codes: int,
    *,
    niter: int,
    seed: int,
    max_vectors: int,
    max_points_per_centroid: int = 256,
    pca_dims: int = 0,
    init: str = "random",
    verbose: bool = False,
) -> tuple[np.ndarray, float]:
    """faiss k-means with uniform sub-sampling, optionally k-means++ seeded and run in a PCA space.

    Args:
        vectors: (N, D) float32 training vectors.
        n_codes: K (paper: 8192).
        niter: Lloyd iterations.
        seed: faiss and sub-sampling seed.
        max_vectors: at most this many vectors are kept (LibriSpeech has ~200M frames).
        max_points_per_centroid: the Lloyd iterations run on at most this many of them per code
            (faiss's own default is 256).
        pca_dims: > 0 and < D: the Lloyd iterations run on the vectors projected on their first
            ``pca_dims`` principal axes (faiss.PCAMatrix), which makes each one D / pca_dims times
            cheaper; every kept vector is then assigned in that space and each code becomes the
            mean of its vectors in the full space (one full-space Lloyd update), so the codebook
            lives where the frames do. Log-mel frames are strongly correlated across bands: at
            16 of 160 dimensions the fit reaches MiniBatchKMeans's inertia at a fraction of its
            time (bench/kmeans.py). 0, or fewer vectors than ``pca_dims``: Lloyd in the full space
            (faiss as is).
        init: ``"random"`` (faiss: K random vectors) or ``"k-means++"`` (greedy k-means++ over
            max(3K, 3072) vectors of the Lloyd sample, as scikit-learn seeds MiniBatchKMeans): a
            better start, so fewer Lloyd iterations reach the same inertia.

    Returns:
        (K, D) float32 centroids and the mean squared distance of the kept vectors (all
        ``min(N, max_vectors)``, not only the Lloyd sample) to their code, per dimension: to the
        nearest code without PCA; with PCA, to the code the fit assigned them to (nearest in the
        PCA space), an upper bound of the nearest-code distance that costs no extra search.
    """
    import faiss

    if vectors.ndim != 2:
        raise ValueError(f"expected (N, D) vectors, got {vectors.shape}")
    if not np.isfinite(vectors).all():
        raise ValueError("codebook vectors hold NaN or inf")
    if len(vectors) < n_codes:
        raise ValueError(f"{len(vectors)} vectors are too few for {n_codes} codes")
    if max_vectors < n_codes:  # the sub-sample would be too few (faiss's own check names neither number)
        raise ValueError(f"max_vectors={max_vectors} is below the {n_codes} codes: nothing to fit them on")
    if init not in ("random", "k-means++"):
        raise ValueError(f"codebook init must be 'random' or 'k-means++', got {init!r}")
    if pca_dims < 0:
        raise ValueError(f"pca_dims must be >= 0, got {pca_dims}")
    rng = np.random.default_rng(seed)
    if len(vectors) > max_vectors:
        vectors = vectors[rng.choice(len(vectors), max_vectors, replace=False)]
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    pca = None
    space = vectors
    if 0 < pca_dims < dim and pca_dims <= n:  # fewer vectors than axes have no such principal subspace
        pca = faiss.PCAMatrix(dim, pca_dims)
        pca.train(vectors[rng.choice(n, min(n, max(20_000, 20 * dim)), replace=False)])
        space = pca.apply(vectors)
    sample = space
    if n > n_codes * max_points_per_centroid:
        sample = space[rng.choice(n, n_codes * max_points_per_centroid, replace=False)]
    start = None
    if init == "k-means++":
        seeds_from = sample[rng.choice(len(sample), min(len(sample), max(3 * n_codes, 3072)), replace=False)]
        start = kmeans_plus_plus(seeds_from, n_codes, rng)
    km = faiss.Kmeans(space.shape[1], n_codes, niter=niter, seed=seed, verbose=verbose,
                      max_points_per_centroid=max(max_points_per_centroid, -(-len(sample) // n_codes)))
    km.train(np.ascontiguousarray(sample), init_centroids=start)
    if pca is None:
        dist, _ = km.index.search(vectors, 1)
        return km.centroids.astype(np.float32), float(dist.mean() / dim)
    _, label = km.index.search(space, 1)
    centroids, distortion = _full_space_means(vectors, label[:, 0], n_codes)
    empty = ~np.isfinite(centroids).all(axis=1)
    if empty.any():  # a code no vector chose: keep its PCA-space centre, mapped back
        centroids[empty] = pca.reverse_transform(np.ascontiguousarray(km.centroids))[empty]
    return centroids, distortion


def kmeans_plus_plus(points: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Greedy k-means++ seeding (Arthur & Vassilvitskii 2007): each new centre is the best of
    2 + ln k candidates drawn with probability proportional to the squared distance to the
    centres so far. (P, D) -> (k, D) float32 rows of ``points``."""
    pts = np.ascontiguousarray(points, dtype=np.float32)
    if len(pts) < k:
        raise ValueError(f"{len(pts)} points are too few to seed {k} centres")
    sq = (pts * pts).sum(1)
    trials = 2 + int(np.log(k))
    first = int(rng.integers(len(pts)))
    chosen = [first]
    closest = np.maximum(sq - 2.0 * (pts @ pts[first]) + sq[first], 0.0)  # squared distance to the nearest centre
    for _ in range(k - 1):
        total = float(closest.sum())
        if total <= 0:  # every point sits on a centre: any unused point will do
            cand = rng.choice(np.setdiff1d(np.arange(len(pts)), chosen), 1)
        else:
            cand = rng.choice(len(pts), trials, p=closest / total)
        d2 = np.maximum(sq[None, :] - 2.0 * (pts[cand] @ pts.T) + sq[cand][:, None], 0.0)  # (trials, P)
        d2 = np.minimum(d2, closest[None, :])
        best = int(d2.sum(1).argmin())
        closest = d2[best]
        chosen.append(int(cand[best]))
    return pts[chosen]


def _full_space_means(vectors: np.ndarray, label: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """Each code's mean vector (NaN rows for empty codes) and the mean squared distance per
    dimension of the vectors to their own code's mean."""
    import torch

    x = torch.from_numpy(vectors)
    idx = torch.from_numpy(label.astype(np.int64))
    sums = torch.zeros(k, x.shape[1]).index_add_(0, idx, x)  # float32 sums: 6x faster than float64 here
    counts = torch.bincount(idx, minlength=k).to(torch.float32)
    means = sums / counts[:, None]  # NaN for empty codes
    # sum ||x - mean_k||^2 = sum ||x||^2 - sum_k ||sum_k||^2 / n_k (the means are the exact cluster
    # means), totals in float64: no (N, D) temporary and no gather of each vector's mean
    filled = counts > 0
    # each row's norm by a reduction kernel, no (N, D) temporary of squares: 5x faster than
    # x.pow(2).sum(1) at 166k x 160 (12 vs 57 ms, 1 thread), the total within 3e-10 (relative) of float64
    total_sq = float(torch.linalg.vector_norm(x, dim=1).to(torch.float64).pow(2).sum())
    explained = float((sums[filled].to(torch.float64).pow(2).sum(1) / counts[filled].to(torch.float64)).sum())
    return means.numpy(), max(total_sq - explained, 0.0) / (len(vectors) * vectors.shape[1])


def assign(vectors: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Nearest code of each vector: (N, D) -> (N,) int64."""
    import faiss

    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    _, idx = index.search(np.ascontiguousarray(vectors, dtype=np.float32), 1)
    return idx[:, 0].astype(np.int64)
