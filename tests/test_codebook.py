"""faiss k-means codebook: near-optimal quantisation of a known distribution, sub-sampling, seeding."""

from __future__ import annotations

import numpy as np
import pytest

from meld.codebook import assign, fit_kmeans


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
