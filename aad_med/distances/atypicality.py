"""Stage 5, distances: per-subject atypicality against a reference cohort, with calibrated
p-values. Pure numpy/scipy on arrays of already-standardised feature vectors; never touches
files and writes no prose.

Scores (``method``):

* ``"knn"`` (default): the mean squared Euclidean distance from the subject to its ``k``
  nearest reference subjects, ``s(x; A) = (1/k) Σ_{j ∈ kNN_A(x)} ‖x − a_j‖²``. Works for any
  ``D``, also ``D ≫ n_ref``.
* ``"mahalanobis"``: the squared Mahalanobis distance to the reference mean under the
  Ledoit–Wolf shrunk covariance of the reference (:mod:`aad_med.distances.covariance`),
  ``s(x; A) = (x − ā)ᵀ Σ_A⁻¹ (x − ā)``; well defined when ``D > n_ref``.

A reference subject is scored against the reference without it (leave-one-out, LOO); a test
subject against the whole reference.

p-values (rank-based, "conformal"). Test subject with score ``s``:
``p = (1 + #{i : s_i^LOO ≥ s}) / (n_ref + 1)``. Reference subject ``i``:
``p_i = #{j : s_j^LOO ≥ s_i^LOO} / n_ref`` (its own LOO score ranked among all LOO scores,
itself included).

Guarantees, under the null that the subject and the reference subjects are exchangeable (same
distribution, independent) and that the standardisation of the features is symmetric in them
(fitted on all compared subjects jointly, as ``FeatureSet.finalize`` does, or fixed
independently of them; one fitted on the reference alone is not symmetric and makes the LOO
scores slightly too small):

* reference subjects, both methods: the ``n_ref`` LOO scores are an exchangeable sequence, so
  for every fixed ``i``, ``P(p_i ≤ α) ≤ ⌊α n_ref⌋ / n_ref ≤ α`` exactly (ties count against
  the subject).
* test subjects, ``knn``: ``s(x; A)`` can only decrease when points are added to ``A``. The
  full-conformal p-value ranks ``s(x; R)`` among ``s(r_i; R∖{r_i} ∪ {x})``, which are
  ``≤ s_i^LOO``; so the p-value above is ≥ the full-conformal one and
  ``P(p ≤ α) ≤ α`` holds exactly (it is conservative by at most the effect of one point).
* test subjects, ``mahalanobis``: the score is not monotone in ``A`` (the mean and covariance
  move), so the rule is the plain jackknife rank and validity is approximate; it is measured
  in ``BENCHMARKS.md`` ("Atypical subjects"), not guaranteed.

The guarantees are marginal, per subject: over many clean subjects the fraction with
``p ≤ α`` is ≤ α in expectation, not in every cohort. Rank p-values cannot go below
``1/(n_ref + 1)``. :func:`tail_pvalues` refines them beyond the largest LOO score with a
distribution fitted to the LOO scores (:func:`fit_tail`); they equal the rank p-values
wherever those exceed ``1/(n_ref + 1)``, so the guarantee above holds for every
``α ≥ 1/(n_ref + 1)``; below it there is no finite-sample guarantee: the calibration is
measured in the benchmark. (A tail fitted to the whole LOO distribution and used alone,
:func:`tail_sf`, was measured too and is not calibrated: ``BENCHMARKS.md``.)

Drivers (:func:`contributions`): per-dimension signed terms that add up to the score exactly:
``knn``: ``c_d = (1/k) Σ_j (x_d − a_{j,d})²`` (all ≥ 0); ``mahalanobis``:
``c_d = δ_d (Σ⁻¹ δ)_d`` with ``δ = x − ā`` (negative when a dimension's deviation is explained
by correlated ones). :func:`block_contributions` sums them per named feature block.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

from aad_med.distances.covariance import shrunk_covariance

METHODS = ("knn", "mahalanobis")
TAIL_FAMILIES = ("lognormal", "gamma")
DEFAULT_K = 5


def _as_matrix(x: ArrayLike, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (subjects x features), got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return a


def _check(reference: ArrayLike, test: ArrayLike | None, method: str, k: int):
    if method not in METHODS:
        raise ValueError(f"unknown atypicality method {method!r}; choose one of {METHODS}")
    ref = _as_matrix(reference, "reference")
    if ref.shape[0] < 3:
        raise ValueError(f"a reference needs at least 3 subjects, got {ref.shape[0]}")
    if ref.shape[1] == 0:
        raise ValueError("reference has no feature columns")
    if method == "knn" and not 1 <= k <= ref.shape[0] - 1:
        raise ValueError(f"k must be in [1, n_ref - 1] = [1, {ref.shape[0] - 1}], got {k}")
    if test is None:
        return ref, None
    tst = _as_matrix(test, "test")
    if tst.shape[1] != ref.shape[1]:
        raise ValueError(f"test has {tst.shape[1]} features but the reference has {ref.shape[1]}")
    return ref, tst


def _sq_dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.clip(d, 0.0, None)


def _knn_index(test: np.ndarray, ref: np.ndarray, k: int, exclude_self: bool) -> np.ndarray:
    d = _sq_dist(test, ref)
    if exclude_self:
        np.fill_diagonal(d, np.inf)
    # Stable sort: ties broken by reference order, so results are deterministic.
    return np.argsort(d, axis=1, kind="stable")[:, :k]


def _inverse_apply(ref: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """``Σ⁻¹ δ`` for rows ``δ`` under the Ledoit–Wolf covariance of ``ref`` (rows)."""
    cov = shrunk_covariance(ref - ref.mean(0))
    v, vals, floor = cov.vectors, cov.values, cov.floor
    coef = delta @ v
    resid = delta - coef @ v.T
    pos = vals > 0
    inside = (coef[:, pos] / vals[pos]) @ v[:, pos].T
    if floor > 0:
        return inside + resid / floor
    # No shrinkage floor (no variance at all off the data span): residuals there are ignored.
    return inside


def contributions(
    reference: ArrayLike,
    test: ArrayLike | None = None,
    method: str = "knn",
    k: int = DEFAULT_K,
) -> np.ndarray:
    """Per-dimension signed contributions to each subject's score; rows sum to the score.

    Args:
        reference: reference vectors, shape ``(n_ref, D)``, already standardised.
        test: test vectors ``(n, D)``, each scored against the whole reference; ``None``:
            the reference subjects, each scored against the reference without it (LOO).
        method: ``"knn"`` or ``"mahalanobis"`` (module docstring).
        k: neighbours for ``"knn"``, in ``[1, n_ref - 1]``.

    Returns:
        ``(n, D)`` float64 (``n = n_ref`` when ``test`` is None).

    Raises:
        ValueError: not 2-D, non-finite, fewer than 3 reference subjects, feature counts
            differ, unknown method or ``k`` out of range.
    """
    ref, tst = _check(reference, test, method, k)
    loo = tst is None
    x = ref if loo else tst
    if method == "knn":
        idx = _knn_index(x, ref, k, exclude_self=loo)
        return ((x[:, None, :] - ref[idx]) ** 2).mean(axis=1)
    out = np.empty_like(x)
    if loo:
        for i in range(ref.shape[0]):
            others = np.delete(ref, i, axis=0)
            delta = x[i : i + 1] - others.mean(0)
            out[i] = delta[0] * _inverse_apply(others, delta)[0]
        return out
    delta = x - ref.mean(0)
    return delta * _inverse_apply(ref, delta)


def scores(
    reference: ArrayLike,
    test: ArrayLike | None = None,
    method: str = "knn",
    k: int = DEFAULT_K,
) -> np.ndarray:
    """Atypicality scores (sums of :func:`contributions`); ``test=None`` gives LOO scores.

    Args and Raises: as :func:`contributions`.

    Returns:
        ``(n,)`` float64, larger is more atypical.
    """
    return contributions(reference, test, method, k).sum(axis=1)


def conformal_pvalues(test_scores: ArrayLike, loo_scores: ArrayLike) -> np.ndarray:
    """``(1 + #{i : loo_i ≥ s}) / (n_ref + 1)`` for each test score ``s``.

    Raises:
        ValueError: no LOO scores, or non-finite scores.
    """
    s = np.atleast_1d(np.asarray(test_scores, dtype=np.float64))
    ref = np.sort(np.asarray(loo_scores, dtype=np.float64).ravel())
    if ref.size == 0 or not (np.all(np.isfinite(ref)) and np.all(np.isfinite(s))):
        raise ValueError("conformal p-values need finite scores and at least one LOO score")
    n_ge = ref.size - np.searchsorted(ref, s, side="left")
    return (1.0 + n_ge) / (ref.size + 1.0)


def reference_pvalues(loo_scores: ArrayLike) -> np.ndarray:
    """``#{j : loo_j ≥ loo_i} / n_ref`` for each reference subject (itself counted).

    Raises:
        ValueError: no scores, or non-finite scores.
    """
    ref = np.asarray(loo_scores, dtype=np.float64).ravel()
    if ref.size == 0 or not np.all(np.isfinite(ref)):
        raise ValueError("reference p-values need at least one finite LOO score")
    srt = np.sort(ref)
    return (ref.size - np.searchsorted(srt, ref, side="left")) / ref.size


def fit_tail(loo_scores: ArrayLike, family: str = "lognormal") -> dict:
    """A parametric distribution fitted to the LOO scores, to extrapolate beyond their maximum.

    Families:

    * ``"lognormal"`` (default): ``log s ~ Normal``; :func:`tail_sf` uses the predictive
      Student-t, ``P(S > x) = T_{n-1}((m − log x) / (sd √(1 + 1/n)))`` with ``m``, ``sd`` the
      mean and sample standard deviation of the ``n`` log-scores, so the uncertainty of the
      fit itself widens the tail at small ``n``.
    * ``"gamma"``: maximum-likelihood gamma with location 0 (a scaled chi-square with free
      degrees of freedom).

    Args:
        loo_scores: the reference subjects' LOO scores, all > 0.
        family: ``"lognormal"`` or ``"gamma"``.

    Returns:
        ``{"family", "n", "max"}`` plus ``"log_mean", "log_sd"`` or ``"shape", "scale"``.

    Raises:
        ValueError: fewer than 3 scores, a score ≤ 0, all scores equal or unknown family.
    """
    s = np.asarray(loo_scores, dtype=np.float64).ravel()
    if family not in TAIL_FAMILIES:
        raise ValueError(f"unknown tail family {family!r}; choose one of {TAIL_FAMILIES}")
    if s.size < 3 or not np.all(np.isfinite(s)):
        raise ValueError(f"a tail fit needs at least 3 finite LOO scores, got {s.size}")
    if np.any(s <= 0):
        raise ValueError("a tail fit needs positive scores (duplicate subjects score 0)")
    if np.ptp(s) <= 1e-12 * s.mean():
        raise ValueError("all LOO scores are equal; no tail can be fitted")
    out: dict = {"family": family, "n": int(s.size), "max": float(s.max())}
    if family == "gamma":
        shape, _, scale = stats.gamma.fit(s, floc=0.0)
        out.update(shape=float(shape), scale=float(scale))
    else:
        logs = np.log(s)
        out.update(log_mean=float(logs.mean()), log_sd=float(logs.std(ddof=1)))
    return out


def tail_sf(x: ArrayLike, tail: Mapping) -> np.ndarray:
    """``P(S > x)`` under a :func:`fit_tail` fit (the pure parametric p-value)."""
    x = np.atleast_1d(np.asarray(x, dtype=np.float64))
    if tail["family"] == "gamma":
        return stats.gamma.sf(x, a=tail["shape"], scale=tail["scale"])
    n = tail["n"]
    with np.errstate(divide="ignore"):
        t = (np.log(x) - tail["log_mean"]) / (tail["log_sd"] * np.sqrt(1.0 + 1.0 / n))
    return stats.t.sf(t, n - 1)


def tail_pvalues(test_scores: ArrayLike, loo_scores: ArrayLike, tail: Mapping) -> np.ndarray:
    """Rank p-values, refined by the fitted tail beyond the largest LOO score.

    ``p = (1 + #{i : loo_i ≥ s}) / (n_ref + 1)`` when ``s ≤ max loo`` (the conformal p-value),
    else ``p = sf(s) / sf(max loo) / (n_ref + 1)`` with ``sf`` = :func:`tail_sf`: the fit only
    estimates how far beyond the reference's most atypical subject ``s`` lies. Hence
    ``P(p ≤ α)`` equals that of the conformal p-value for every ``α ≥ 1/(n_ref + 1)`` (same
    guarantee); below ``1/(n_ref + 1)`` it is calibrated only as well as the tail fits.

    Args:
        test_scores: scores to assess.
        loo_scores: the LOO scores ``tail`` was fitted to.
        tail: a :func:`fit_tail` dict.

    Returns:
        ``(n,)`` p-values in ``(0, 1]``.
    """
    s = np.atleast_1d(np.asarray(test_scores, dtype=np.float64))
    loo = np.asarray(loo_scores, dtype=np.float64).ravel()
    p = conformal_pvalues(s, loo)
    top = loo.max()
    over = s > top
    if np.any(over):
        ratio = tail_sf(s[over], tail) / max(float(tail_sf(top, tail)[0]), np.finfo(float).tiny)
        p[over] = np.clip(ratio, 0.0, 1.0) / (loo.size + 1.0)
    return p


def reference_tail_pvalues(loo_scores: ArrayLike, family: str = "lognormal") -> np.ndarray:
    """:func:`tail_pvalues` of each reference subject against the others' LOO scores.

    Subject ``i``'s p-value is ``(1 + #{j ≠ i : loo_j ≥ loo_i}) / n_ref`` (= its
    :func:`reference_pvalues`) unless it exceeds every other LOO score; then the tail fitted
    to the other ``n_ref − 1`` scores refines it below ``1/n_ref``.
    """
    loo = np.asarray(loo_scores, dtype=np.float64).ravel()
    p = reference_pvalues(loo)
    for i in np.flatnonzero(p <= 1.0 / loo.size):
        others = np.delete(loo, i)
        p[i] = tail_pvalues(loo[i : i + 1], others, fit_tail(others, family))[0]
    return p


def bh_qvalues(pvalues: ArrayLike) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (q-values), in the input order.

    ``q_(i) = min_{j ≥ i} min(1, m p_(j) / j)`` over the sorted p-values.

    Raises:
        ValueError: a p-value outside ``[0, 1]`` or NaN.
    """
    p = np.asarray(pvalues, dtype=np.float64).ravel()
    if p.size == 0:
        return p.copy()
    if not np.all((p >= 0) & (p <= 1)):
        raise ValueError("p-values must lie in [0, 1]")
    order = np.argsort(p, kind="stable")
    m = p.size
    adj = p[order] * m / np.arange(1, m + 1)
    adj = np.minimum.accumulate(adj[::-1])[::-1]
    q = np.empty(m)
    q[order] = np.minimum(adj, 1.0)
    return q


def block_contributions(
    contrib: ArrayLike, blocks: Mapping[str, int] | Sequence[tuple[str, int]]
) -> dict[str, np.ndarray]:
    """Sums of :func:`contributions` over consecutive named feature blocks.

    Args:
        contrib: ``(n, D)`` contributions.
        blocks: block name → width, in column order; widths must add up to ``D``.

    Returns:
        ``{name: (n,)}``; the blocks' values add up to the scores.

    Raises:
        ValueError: widths do not add up to ``D`` or a width is negative.
    """
    c = np.asarray(contrib, dtype=np.float64)
    items = list(blocks.items()) if isinstance(blocks, Mapping) else list(blocks)
    widths = [int(w) for _, w in items]
    if any(w < 0 for w in widths) or sum(widths) != c.shape[1]:
        raise ValueError(f"block widths {widths} do not add up to the {c.shape[1]} features")
    edges = np.cumsum([0, *widths])
    return {
        name: c[:, lo:hi].sum(axis=1)
        for (name, _), lo, hi in zip(items, edges[:-1], edges[1:], strict=True)
    }


def top_drivers(contrib: ArrayLike, m: int = 3) -> np.ndarray:
    """Column indices of the ``m`` largest contributions of each subject, largest first."""
    c = np.asarray(contrib, dtype=np.float64)
    m = min(m, c.shape[1])
    return np.argsort(-c, axis=1, kind="stable")[:, :m]


def atypicality(
    reference: ArrayLike,
    tests: Mapping[str, ArrayLike] | None = None,
    method: str = "knn",
    k: int = DEFAULT_K,
    tail: str | None = "lognormal",
) -> dict:
    """Scores, p-values and q-values of the reference (LOO) and of every test cohort.

    Args:
        reference: reference vectors ``(n_ref, D)``, standardised symmetrically (module
            docstring).
        tests: ``{cohort: (n_c, D)}`` vectors to test against the whole reference.
        method: ``"knn"`` or ``"mahalanobis"``.
        k: neighbours for ``"knn"``.
        tail: tail family for ``p_tail``/``q_tail`` (:func:`fit_tail`); ``None``: none.

    Returns:
        ``{"method", "k", "n_reference", "tail", "reference", "tests"}``: ``tail`` is the
        :func:`fit_tail` dict (or ``None``); ``reference`` and each ``tests[cohort]`` hold
        ``score``, ``p``, ``q`` (BH within that cohort), ``contributions`` ``(n, D)`` and,
        with ``tail``, ``p_tail`` and ``q_tail``.

    Raises:
        ValueError: as :func:`contributions`, or a non-positive LOO score with ``tail``
            (duplicated subjects).
    """
    ref, _ = _check(reference, None, method, k)
    loo_c = contributions(ref, None, method, k)
    loo = loo_c.sum(axis=1)
    fit = fit_tail(loo, tail) if tail else None

    def pack(contrib: np.ndarray, p: np.ndarray, p_tail: np.ndarray | None) -> dict:
        out = {"score": contrib.sum(axis=1), "p": p, "q": bh_qvalues(p), "contributions": contrib}
        if p_tail is not None:
            out.update(p_tail=p_tail, q_tail=bh_qvalues(p_tail))
        return out

    result_tests = {}
    for name, vecs in (tests or {}).items():
        c = contributions(ref, vecs, method, k)
        s = c.sum(axis=1)
        pt = tail_pvalues(s, loo, fit) if fit is not None else None
        result_tests[name] = pack(c, conformal_pvalues(s, loo), pt)
    return {
        "method": method,
        "k": int(k) if method == "knn" else None,
        "n_reference": int(ref.shape[0]),
        "tail": fit,
        "reference": pack(
            loo_c, reference_pvalues(loo), reference_tail_pvalues(loo, tail) if tail else None
        ),
        "tests": result_tests,
    }
