"""faiss k-means codebook: near-optimal quantisation of a known distribution, sub-sampling, seeding."""

from __future__ import annotations

import numpy as np
import pytest

from meld.codebook import assign, fit_kmeans, grouped_vectors, keep_probability, thinned_grouped_vectors
from meld.config import ConfigError


@pytest.mark.parametrize("max_points_per_centroid", [256, 64])
def test_fit_kmeans_quantises_the_unit_square_near_the_optimum(max_points_per_centroid):
    """16 codes over the uniform unit square: the best 16-cell quantiser (hexagonal cells) has a mean
    squared error of 0.0802 / 16 = 0.0050 per dimension, a 4 x 4 grid 1/12 / 16 = 0.0052. Lloyd from a
    random start lands a little above; one centroid for everything would give 1/12 = 0.083."""
    vectors = np.random.default_rng(0).random((20_000, 2)).astype(np.float32)
    codebook, distortion = fit_kmeans(vectors, 16, niter=20, seed=0, max_vectors=100_000,
                                      max_points_per_centroid=max_points_per_centroid)
    assert codebook.shape == (16, 2) and codebook.dtype == np.float32
    assert 0.0802 / 16 * 0.95 < distortion < 1 / 12 / 16 * 1.2
    # the reported distortion is the mean squared distance to the assigned code, per dimension
    codes = assign(vectors, codebook)
    assert ((vectors - codebook[codes]) ** 2).mean() == pytest.approx(distortion, rel=1e-4)
    assert len(np.unique(codes)) == 16  # no dead code


def test_fit_kmeans_is_seeded_and_subsamples_to_max_vectors():
    vectors = np.random.default_rng(1).random((5_000, 4)).astype(np.float32)
    a, _ = fit_kmeans(vectors, 8, niter=5, seed=3, max_vectors=1000)
    b, _ = fit_kmeans(vectors, 8, niter=5, seed=3, max_vectors=1000)
    c, _ = fit_kmeans(vectors, 8, niter=5, seed=4, max_vectors=1000)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # the reported distortion is measured over the 1,000 kept vectors only: not the error over all
    # 5,000 (what a fit without sub-sampling reports, see above), but close to it (a uniform sample)
    _, kept_distortion = fit_kmeans(vectors, 8, niter=5, seed=3, max_vectors=1000)
    codes = assign(vectors, a)
    all_distortion = float(((vectors - a[codes]) ** 2).mean())
    assert kept_distortion != pytest.approx(all_distortion, rel=1e-4)
    assert kept_distortion == pytest.approx(all_distortion, rel=0.1)


def _correlated_frames(n: int, dim: int = 40, rank: int = 4, clusters: int = 32, seed: int = 0) -> np.ndarray:
    """Vectors like log-mel frames: a few latent factors spread over many correlated dimensions,
    clustered, plus a little isotropic noise."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(rank, dim))
    centres = rng.normal(size=(clusters, rank)) * 3
    latent = centres[rng.integers(clusters, size=n)] + rng.normal(size=(n, rank)) * 0.3
    return (latent @ mix + rng.normal(size=(n, dim)) * 0.05).astype(np.float32)


def test_pca_kmeans_matches_full_space_kmeans_and_reports_its_own_assignment_error():
    vectors = _correlated_frames(20_000)
    full, full_err = fit_kmeans(vectors, 32, niter=20, seed=0, max_vectors=100_000, init="k-means++")
    pca, pca_err = fit_kmeans(vectors, 32, niter=20, seed=0, max_vectors=100_000, pca_dims=6, init="k-means++")
    assert pca.shape == full.shape == (32, 40) and pca.dtype == np.float32
    assert np.isfinite(pca).all()
    # the codes are full-space means: the PCA fit loses (almost) nothing against a full-space fit
    nearest = ((vectors - pca[assign(vectors, pca)]) ** 2).mean()
    assert nearest <= full_err * 1.05
    # the reported error is that of the fit's own (PCA-space) assignment: an upper bound, and tight
    assert nearest <= pca_err * (1 + 1e-4) and pca_err <= nearest * 1.05


def test_kmeans_plus_plus_spreads_the_start_over_the_clusters():
    from meld.codebook import kmeans_plus_plus

    vectors = _correlated_frames(5_000, clusters=16, seed=2)
    rng = np.random.default_rng(0)
    start = kmeans_plus_plus(vectors, 16, rng)
    assert start.shape == (16, 40)
    assert all(any(np.array_equal(s, v) for v in vectors[:5000]) for s in start[:3])  # rows of the input
    random_start = vectors[np.random.default_rng(0).choice(5_000, 16, replace=False)]

    def err(c):
        return ((vectors - c[assign(vectors, c)]) ** 2).mean()

    assert err(start) < err(random_start)  # a better start than 16 random vectors
    # a seeded start: the same generator state gives the same centres
    again = kmeans_plus_plus(vectors, 16, np.random.default_rng(0))
    np.testing.assert_array_equal(start, again)
    with pytest.raises(ValueError, match="too few"):
        kmeans_plus_plus(vectors[:10], 16, rng)


def test_fit_kmeans_refuses_bad_options():
    vectors = np.random.default_rng(1).random((500, 4)).astype(np.float32)
    with pytest.raises(ValueError, match="init"):
        fit_kmeans(vectors, 8, niter=2, seed=0, max_vectors=1000, init="kmeans++")
    with pytest.raises(ValueError, match="pca_dims"):
        fit_kmeans(vectors, 8, niter=2, seed=0, max_vectors=1000, pca_dims=-1)


def test_fewer_vectors_than_pca_axes_fit_in_the_full_space():
    """faiss's PCA cannot find more principal axes than it has vectors (it stopped in a RuntimeError):
    such a fit runs in the full space, as ``pca_dims: 0`` does."""
    vectors = np.random.default_rng(5).normal(size=(12, 40)).astype(np.float32)
    full = fit_kmeans(vectors, 4, niter=5, seed=0, max_vectors=1000, init="k-means++")
    pca = fit_kmeans(vectors, 4, niter=5, seed=0, max_vectors=1000, pca_dims=16, init="k-means++")
    np.testing.assert_array_equal(pca[0], full[0])
    assert pca[1] == full[1]


def test_thinning_while_reading_keeps_about_max_vectors_drawn_uniformly_from_the_split():
    """The codebook stage reads a split utterance by utterance and keeps each grouped vector with
    one probability, so it never holds the whole split (LibriSpeech: ~216M frames)."""
    rng = np.random.default_rng(0)
    # each frame's first value is its index in the split, so kept vectors can be traced back
    lengths = [int(n) for n in rng.integers(50, 400, size=300)]
    offsets = np.cumsum([0] + lengths)
    mels = [np.stack([np.arange(a, b), *np.zeros((79, b - a))], axis=1).astype(np.float32)
            for a, b in zip(offsets[:-1], offsets[1:])]
    everything = grouped_vectors(mels, 2)
    assert len(everything) == sum(n // 2 for n in lengths)  # odd tails dropped

    # a split no larger than max_vectors is kept whole, bit for bit
    assert keep_probability(lengths, 2, len(everything)) == 1.0
    whole = np.concatenate([thinned_grouped_vectors(m, 2, 1.0, None) for m in mels])
    np.testing.assert_array_equal(whole, everything)

    max_vectors = len(everything) // 5
    keep = keep_probability(lengths, 2, max_vectors)
    draw = np.random.default_rng(1)
    kept = np.concatenate([thinned_grouped_vectors(m, 2, keep, draw) for m in mels])
    # about 5 % more than max_vectors survive (Bernoulli: std ~ sqrt(n)), so fit_kmeans can draw exactly max_vectors
    assert max_vectors <= len(kept) <= 1.1 * max_vectors
    # every kept vector is one of the split's, none twice, and the draw spans the whole split
    first = kept[:, 0].astype(np.int64)
    assert np.isin(first, everything[:, 0].astype(np.int64)).all() and len(np.unique(first)) == len(first)
    halves = np.histogram(first, bins=2, range=(0, offsets[-1]))[0]
    assert abs(halves[0] - halves[1]) < 0.1 * len(kept)
    with pytest.raises(ValueError, match="no frames"):
        grouped_vectors([np.zeros((1, 80), np.float32)], 2)


def test_full_space_means_are_each_codes_mean_and_report_its_squared_error():
    from meld.codebook import _full_space_means

    rng = np.random.default_rng(0)
    vectors = (rng.normal(size=(20_000, 24)) * 3 + 30).astype(np.float32)  # far from 0: the sum-of-squares form must not cancel badly
    label = rng.integers(0, 7, size=len(vectors))
    label[label == 5] = 6  # code 5 left empty
    means, distortion = _full_space_means(vectors, label, 7)
    for k in (0, 3, 6):
        np.testing.assert_allclose(means[k], vectors[label == k].mean(0), rtol=1e-5)
    assert np.isnan(means[5]).all()
    direct = ((vectors.astype(np.float64) - means[label].astype(np.float64)) ** 2).mean()
    assert distortion == pytest.approx(direct, rel=1e-5)


def test_the_stage_writes_the_same_bytes_on_every_run(tmp_path_factory, tmp_path):
    """DVC hashes the whole output folder, and every train stage depends on it: a byte that changes
    from run to run (a clock reading in summary.json did) reruns them all for the same centroids."""
    from test_faults import make_tiny_data

    from pipeline import codebook

    data = make_tiny_data(tmp_path_factory)
    outs = []
    for run in ("a", "b"):
        out = tmp_path / run
        assert codebook.main(["--params", str(data / "params.yaml"), "--features", str(data / "features"),
                              "--out", str(out)]) == 0
        outs.append({p.name: p.read_bytes() for p in sorted(out.iterdir())})
    assert outs[0].keys() == {"r1.npy", "r2.npy", "summary.json"}
    assert outs[0] == outs[1]


def test_a_training_split_with_fewer_vectors_than_codes_ends_the_stage_as_a_params_error(tmp_path):
    """The stage's own check names the split and what to change; as a ConfigError, ``run_stage`` prints it as one
    line instead of a traceback (a plain ValueError is taken for a bug). Nothing is written."""
    import json

    import yaml

    from meld.features import N_MELS, NormStats
    from meld.store import write_store
    from pipeline import codebook

    features = tmp_path / "features"
    rng = np.random.default_rng(0)
    mels = [rng.normal(size=(10, N_MELS)).astype(np.float32) for _ in range(3)]
    write_store(features / "train", ((({"id": f"u{i}", "speaker": "s", "text": "a", "duration": 0.16}), m)
                                     for i, m in enumerate(mels)), [])
    (features / "stats.json").write_text(json.dumps(NormStats(np.zeros(N_MELS), np.ones(N_MELS)).to_dict()))
    (features / "summary.json").write_text("{}")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"codebook": {"size": 16, "reduction_factors": [1, 2], "max_vectors": 1000}}))
    with pytest.raises(ConfigError, match=rf"codebook r=2: 15 training vectors in {features / 'train'} are too few "
                                          r"for 16 codes: lower codebook.size"):
        codebook.main(["--params", str(params), "--features", str(features), "--out", str(tmp_path / "codebook")])
    assert not (tmp_path / "codebook").exists()


@pytest.mark.parametrize("max_vectors", [16, 256, 1000])
def test_thinning_keeps_at_least_max_vectors_when_the_split_holds_more(max_vectors):
    """A 5 % margin is ~1 std of the Bernoulli count at max_vectors = 1000 and less below: the stage
    kept fewer than max_vectors often, and fewer than codebook.size (allowed to equal max_vectors),
    which it then reported as "too few for codebook.size: give the corpus more audio"."""
    lengths = [400] * 100  # 40,000 vectors at r = 1, far more than max_vectors
    keep = keep_probability(lengths, 1, max_vectors)
    mel = np.zeros((400, 2), np.float32)
    for seed in range(100):
        draw = np.random.default_rng(seed)
        kept = sum(len(thinned_grouped_vectors(mel, 1, keep, draw)) for _ in lengths)
        assert kept >= max_vectors, f"seed {seed}: {kept} of {max_vectors}"
    # at scale the margin stays 5 %: what is read per utterance is unchanged there
    assert keep_probability([400] * 10_000, 1, 200_000) == pytest.approx(1.05 * 200_000 / 4_000_000)


def test_fit_kmeans_refuses_a_max_vectors_below_the_code_count_before_faiss_does():
    """Enough vectors, but a sub-sample cap under K: faiss stopped in a C++ assertion naming neither."""
    vectors = np.random.default_rng(1).random((500, 4)).astype(np.float32)
    with pytest.raises(ValueError, match="max_vectors=10 is below the 32 codes"):
        fit_kmeans(vectors, 32, niter=2, seed=0, max_vectors=10)
