"""The intensity fingerprint statistic of aad-compare: raw foreground percentiles compared with
the AAD permutation test, seeing a global intensity scale the encoder's features cannot."""

from __future__ import annotations

import numpy as np
import pytest

from aad_med.data.intensity import intensity_fingerprint
from aad_med.data.validation import load_cohort
from aad_med.distances import aad_permutation_test
from aad_med.embedding.acquisition import standardize_jointly
from aad_med.pipelines.compare import CompareSettings
from aad_med.pipelines.intensity_step import INTENSITY_KEYS, intensity_statistics
from tests.nifti_factory import write_brats_cohort


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory):
    root = tmp_path_factory.mktemp("intensity")
    # Same anatomy (same seeds) in all three; "bright" has every intensity x1.5.
    return {
        "a": load_cohort(write_brats_cohort(root / "a", n=5)),
        "twin": load_cohort(write_brats_cohort(root / "twin", n=5)),
        "bright": load_cohort(write_brats_cohort(root / "bright", n=5, scale=1.5)),
    }


def test_sees_a_global_scale_and_not_identical_images(cohorts):
    settings = CompareSettings(n_permutations=199, n_bootstrap=50, seed=0)
    raw, pairs, seconds = intensity_statistics(cohorts, settings)
    assert seconds > 0 and {k: v.shape for k, v in raw.items()} == {
        "a": (5, 28),
        "twin": (5, 28),
        "bright": (5, 28),
    }
    np.testing.assert_allclose(raw["bright"], 1.5 * raw["a"], rtol=1e-4)
    for key in pairs:
        assert set(pairs[key]) == set(INTENSITY_KEYS)
    same = pairs[("a", "twin")]
    assert same["intensity_distance"] == 0.0 and same["intensity_p"] == 1.0
    shifted = pairs[("a", "bright")]
    # 5 vs 5 subjects: 2/C(10,5) = 0.008 is the smallest exact p; 199 shuffles resolve 0.005.
    assert shifted["intensity_p"] <= 0.02 and shifted["intensity_null_ratio"] > 2


def test_is_the_aad_permutation_test_on_jointly_standardised_fingerprints(cohorts):
    settings = CompareSettings(n_permutations=99, n_bootstrap=20, seed=3)
    pair = {k: cohorts[k] for k in ("a", "bright")}
    _, pairs, _ = intensity_statistics(pair, settings)
    z = standardize_jointly({k: intensity_fingerprint(c.subjects) for k, c in pair.items()})
    direct = aad_permutation_test(z["a"], z["bright"], n_permutations=99, seed=0)
    assert pairs[("a", "bright")]["intensity_distance"] == pytest.approx(direct.statistic)


def test_a_pair_gets_the_same_numbers_whatever_else_is_compared(cohorts):
    settings = CompareSettings(n_permutations=99, n_bootstrap=20, seed=3)
    _, alone, _ = intensity_statistics({k: cohorts[k] for k in ("a", "bright")}, settings)
    _, three, _ = intensity_statistics(cohorts, settings)
    for key in ("intensity_distance", "intensity_p", "intensity_null_ratio"):
        assert three[("a", "bright")][key] == alone[("a", "bright")][key]
    # The adjustment is across the pairs of the call: with three pairs, q >= p.
    q, p = three[("a", "bright")]["intensity_p_fdr"], three[("a", "bright")]["intensity_p"]
    assert alone[("a", "bright")]["intensity_p_fdr"] == alone[("a", "bright")]["intensity_p"]
    assert q >= p and q <= 1.0


def test_fingerprints_are_cached_by_file(cohorts, tmp_path):
    from aad_med.data.intensity import cached_fingerprint

    cache = tmp_path / "cache"
    first = cached_fingerprint(cohorts["a"], cache)
    entries = list(cache.glob("intensity-*.npz"))
    assert len(entries) == 1 and not list(cache.glob(".*tmp"))
    np.testing.assert_array_equal(first, intensity_fingerprint(cohorts["a"].subjects))
    # A second call reads the entry, not the volumes: a planted entry is what comes back.
    with open(entries[0], "wb") as f:
        np.savez(f, fingerprint=first + 1.0)
    np.testing.assert_array_equal(cached_fingerprint(cohorts["a"], cache), first + 1.0)
    # Other files, other key.
    cached_fingerprint(cohorts["bright"], cache)
    assert len(list(cache.glob("intensity-*.npz"))) == 2
    np.testing.assert_array_equal(cached_fingerprint(cohorts["a"], None), first)


def test_histogram_percentiles_equal_numpy_to_rounding():
    from aad_med.data.intensity import percentiles_of

    rng = np.random.default_rng(0)
    q = np.concatenate(
        [np.asarray([1.0, 5, 25, 50, 75, 95, 99]), rng.uniform(0, 100, 20), [0, 100]]
    )
    for n, hi in [(1, 10), (7, 3), (1000, 50), (5000, 3000)]:
        ints = rng.integers(-hi, hi + 1, n).astype(np.float32)
        np.testing.assert_allclose(percentiles_of(ints, q), np.percentile(ints, q), rtol=1e-13)
    floats = rng.normal(size=500).astype(np.float32)  # not integers: numpy itself
    np.testing.assert_array_equal(percentiles_of(floats, q), np.percentile(floats, q))


@pytest.mark.parametrize("dtype", [np.int16, np.uint16, np.int8, np.uint8])
def test_percentiles_of_stored_integers_equal_those_of_their_float32_cast(dtype):
    """Stored integers (load_subject(native=True)) give the float32 image's row bit for bit,
    the full range of the type included (no overflow in the offset; numpy's own percentile of
    int16 overflows there, so the reference is its percentile of the float64 values)."""
    from aad_med.data.intensity import fingerprint_row, percentiles_of

    rng = np.random.default_rng(1)
    info = np.iinfo(dtype)
    q = np.asarray([0.0, 1, 5, 25, 50, 75, 95, 99, 100, 33.3])
    for n in (1, 2, 999):
        ints = rng.integers(info.min, info.max, n, endpoint=True).astype(dtype)
        ints[0] = info.min
        np.testing.assert_array_equal(
            percentiles_of(ints, q), percentiles_of(ints.astype(np.float32), q)
        )
        np.testing.assert_allclose(
            percentiles_of(ints, q), np.percentile(ints.astype(np.float64), q), rtol=1e-13
        )
    volume = rng.integers(0, 3, (4, 6, 7, 5)).astype(dtype) * rng.integers(
        1, 100, (4, 6, 7, 5)
    ).astype(dtype)
    fortran = np.asfortranarray(volume.transpose(0, 3, 2, 1)).transpose(0, 3, 2, 1)
    np.testing.assert_array_equal(
        fingerprint_row(fortran), fingerprint_row(volume.astype(np.float32))
    )
