"""Every figure function writes a valid PNG from fabricated inputs; display summaries are right."""

from __future__ import annotations

import matplotlib.image as mpimg
import numpy as np
import pytest

from aad_med.plots.images import plot_mean_difference, plot_regional_aad
from aad_med.plots.latent import plot_attribution, plot_latent_means, plot_latent_pca
from aad_med.plots.statistics import (
    plot_dendrogram,
    plot_mds,
    plot_null_distribution,
    plot_pairwise_aad,
)
from aad_med.plots.style import OKABE_ITO, cohort_colors
from aad_med.plots.summaries import (
    bootstrap_mean_bands,
    covariance_ellipse,
    dimension_order,
    pca_2d,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path, min_side: int = 100):
    assert path.exists()
    assert path.read_bytes()[:8] == PNG_MAGIC
    img = mpimg.imread(path)
    assert img.shape[0] >= min_side and img.shape[1] >= min_side
    # A figure that drew something is not one flat colour.
    assert float(np.std(img[..., :3])) > 0.01


@pytest.fixture
def vectors():
    rng = np.random.default_rng(0)
    return {
        "siteA": rng.normal(0, 1, (12, 8)),
        "siteB": rng.normal(0, 1, (10, 8)) + np.r_[2.0, np.zeros(7)],
        "siteC": rng.normal(0, 1, (9, 8)),
    }


@pytest.fixture
def pairs():
    rng = np.random.default_rng(1)
    return [
        {
            "a": "siteA",
            "b": "siteB",
            "aad": 2.1,
            "aad_p": 0.0002,
            "null_aad_sample": list(rng.gamma(2, 0.2, 500)),
            "top_dims": [[0, 0.9], [3, 0.05]],
        },
        {
            "a": "siteA",
            "b": "siteC",
            "aad": 0.3,
            "aad_p": 0.61,
            "null_aad_sample": list(rng.gamma(2, 0.2, 500)),
            "top_dims": [[5, 0.4], [1, 0.3]],
        },
    ]


def test_palette_is_okabe_ito_and_stable():
    c = cohort_colors(["b", "a", "c"])
    assert c == {"b": OKABE_ITO[0], "a": OKABE_ITO[1], "c": OKABE_ITO[2]}
    assert len(set(cohort_colors([str(i) for i in range(8)]).values())) == 8


def test_bootstrap_bands_contain_mean_and_shrink_with_n():
    rng = np.random.default_rng(0)
    small = rng.normal(0, 1, (10, 4))
    large = rng.normal(0, 1, (400, 4))
    b_small = bootstrap_mean_bands(small, 500, seed=0)
    b_large = bootstrap_mean_bands(large, 500, seed=0)
    assert b_small.shape == (2, 4)
    assert np.all(b_small[0] <= small.mean(0)) and np.all(small.mean(0) <= b_small[1])
    assert np.all(b_large[1] - b_large[0] < b_small[1] - b_small[0])
    # Width close to 2 * 1.96 * sd / sqrt(n) for the large sample.
    np.testing.assert_allclose(b_large[1] - b_large[0], 2 * 1.96 / np.sqrt(400), rtol=0.25)
    np.testing.assert_array_equal(
        bootstrap_mean_bands(small, 500, seed=3), bootstrap_mean_bands(small, 500, seed=3)
    )


def test_pca_and_ellipse_geometry():
    rng = np.random.default_rng(0)
    a = rng.normal(0, 1, (300, 3)) * [5.0, 1.0, 0.1]
    proj, explained = pca_2d({"a": a})
    assert proj["a"].shape == (300, 2)
    assert explained[0] > 0.9 and explained.sum() <= 1.0 + 1e-12
    ell = covariance_ellipse(proj["a"])
    # About 95% of Gaussian points fall inside the 95% ellipse.
    cov = np.cov(proj["a"], rowvar=False)
    d2 = np.einsum(
        "ij,jk,ik->i",
        proj["a"] - proj["a"].mean(0),
        np.linalg.inv(cov),
        proj["a"] - proj["a"].mean(0),
    )
    assert 0.91 < np.mean(d2 <= 5.991) < 0.99
    assert ell.shape == (100, 2)
    assert covariance_ellipse(np.zeros((2, 2))) is None


def test_dimension_order():
    np.testing.assert_array_equal(dimension_order(np.array([0.1, 0.6, 0.0, 0.3])), [1, 3, 0, 2])


def test_latent_figures(tmp_path, vectors, pairs):
    means = {k: v.mean(0) for k, v in vectors.items()}
    bands = {k: bootstrap_mean_bands(v, 200) for k, v in vectors.items()}
    delta = means["siteB"] - means["siteA"]
    shares = delta**2 / np.sum(delta**2)
    assert_png(plot_latent_means(means, bands, tmp_path / "plots" / "latent_means.png", shares))
    assert_png(plot_latent_means(means, None, tmp_path / "plain.png"))
    assert_png(plot_latent_pca(vectors, tmp_path / "latent_pca.png"))
    assert_png(plot_attribution(pairs, tmp_path / "attribution.png"))
    assert not list(tmp_path.rglob(".*.tmp"))


def test_statistics_figures(tmp_path, pairs):
    names = ["siteA", "siteB", "siteC"]
    m = np.array([[0, 2.1, 0.3], [2.1, 0, 2.0], [0.3, 2.0, 0]])
    assert_png(plot_null_distribution(pairs, tmp_path / "null_distribution.png"))
    assert_png(plot_pairwise_aad(names, m, tmp_path / "pairwise_aad.png"))
    assert_png(
        plot_mds(names, np.array([[-1.0, 0.1], [1.1, 0.0], [-0.9, -0.1]]), tmp_path / "mds.png")
    )
    from scipy.cluster.hierarchy import linkage
    from scipy.spatial.distance import squareform

    z = linkage(squareform(m), method="average")
    assert_png(plot_dendrogram(z, names, tmp_path / "dendrogram.png"))
    # Two cohorts: one-row linkage, one-dimensional MDS.
    assert_png(plot_dendrogram(np.array([[0, 1, 2.1, 2]]), names[:2], tmp_path / "d2.png"))
    assert_png(plot_mds(names[:2], np.array([[-1.0], [1.0]]), tmp_path / "m2.png"))


def test_image_figures(tmp_path):
    rng = np.random.default_rng(0)
    diff = rng.normal(0, 1, (4, 8, 8, 8))
    assert_png(plot_mean_difference(diff, tmp_path / "mean_difference_A_vs_B.png"))
    m = np.full((24, 28, 20), np.nan)
    m[4:16, 4:20, 4:12] = rng.uniform(0, 2, (12, 16, 8))
    bg = rng.uniform(0, 1, (24, 28, 20))
    assert_png(plot_regional_aad(m, bg, tmp_path / "regional_aad.png"))
    assert_png(plot_regional_aad(np.full((24, 28, 20), np.nan), bg, tmp_path / "empty.png"))
