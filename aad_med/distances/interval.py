"""Stage 5, distances: the confidence interval of the cohort distance ``||μ_A - μ_B||``.

The interval is built for the unbiased squared distance ``U`` (:func:`~aad_med.distances.aad.
aad2_unbiased`, the two-sample U-statistic of Chen & Qin 2010) and mapped to the distance scale
with ``sqrt(max(0, .))``, so its lower bound is 0 when the data cannot rule out equal means.

Why not a bootstrap of AAD: AAD is biased upwards by ``tr(Σ_A)/n_A + tr(Σ_B)/n_B``, and a
percentile bootstrap inherits the bias twice, so with D >= 32 the old interval covered the true
distance in 0% of simulated data sets. A subject bootstrap of ``U`` does not help at high D
either: its variance plugs in ``tr(S²)``, biased by ``(tr Σ)²/n`` (about 20x ``tr Σ²`` at
D 256, n 12). Here every variance component is estimated without bias from the subjects' Gram
matrices, and the skew of ``U`` (a shifted noncentral chi-square when D is small) is kept:

* ``Var(U) = V0 + 4 δᵀΣ_Δδ`` exactly (Chen & Qin 2010, Prop. 1), with ``Σ_Δ = Σ_A/n_A + Σ_B/n_B``
  and ``V0 = 2tr(Σ_A²)/(n_A(n_A-1)) + 2tr(Σ_B²)/(n_B(n_B-1)) + 4tr(Σ_AΣ_B)/(n_A n_B)``.
  ``tr(Σ²)`` comes from the unbiased fourth-order U-statistic (Song et al. 2012, the HSIC
  estimator with linear kernels), ``tr(Σ_AΣ_B)`` from ``tr(S_A S_B)``, and ``δᵀΣ_Aδ`` from
  leave-two-out mean differences, so no term uses a subject's own squared norm twice and all
  stay finite for heavy tails (t with 3 df).
* For a candidate ``θ² = ||δ||²`` the distribution of ``U`` is approximated by a gamma
  (Pearson) law with mean ``θ²``, variance ``V0 + 4κθ²`` and the third cumulant of the
  matching scaled noncentral chi-square; the interval is every ``θ²`` whose central 95% range
  contains the observed ``U`` (test inversion). ``κ`` (how much of ``Σ_Δ`` lies along ``δ``)
  is estimated from ``δᵀΣ_Δδ / U`` and shrunk towards ``tr(Σ_Δ²)/tr(Σ_Δ)`` (its value for
  an isotropic spread) when ``U`` is small next to its noise.
* The tails are widened as a t law's, with the degrees of freedom of the ``δᵀΣδ`` estimate
  (about ``n - 1`` of the cohort that dominates it), which matters when a cohort is small.

Deterministic (no resampling), so it does not depend on the seed (and it came out bit-identical
with 1 and 2 BLAS threads in a 60-vs-70-subject, 300-dimension check).
Coverage is measured by ``scripts/coverage.py`` (BENCHMARKS.md, "Interval coverage").
Pure numpy/scipy; never touches files.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy import special

from aad_med.distances._common import check_pair
from aad_med.distances.aad import aad2_unbiased

#: Bisection steps for the interval bounds (relative precision 2^-60 of the search range).
BISECTION_STEPS = 60

#: Above this gamma shape the standardised gamma quantile is replaced by the normal one.
NORMAL_SHAPE = 1e7


@dataclass(frozen=True)
class DistanceMoments:
    """What the interval needs from one pair of cohorts (all floats, or arrays of them).

    Attributes:
        u: the unbiased squared distance ``||Δ||² - tr(S_A)/n_A - tr(S_B)/n_B``.
        var_null: ``V0``, the variance of ``u`` when the means coincide (unbiased estimate).
        var_linear: ``4 δᵀΣ_Δδ``, the part of the variance that grows with the distance
            (estimate clipped at 0).
        trace: ``tr(S_A)/n_A + tr(S_B)/n_B``, the sampling-noise part of ``AAD²``.
        df_linear: degrees of freedom of the ``var_linear`` estimate (``inf`` when it is 0):
            the cohorts' ``n - 1`` averaged (harmonically) with their shares of it; with 8
            subjects in the dominant cohort about 8. The interval's tails are widened as a t
            law's would be.
    """

    u: np.ndarray | float
    var_null: np.ndarray | float
    var_linear: np.ndarray | float
    trace: np.ndarray | float
    df_linear: np.ndarray | float = np.inf

    @property
    def se(self) -> np.ndarray | float:
        """Standard error of ``u`` at the observed distance: ``sqrt(V0 + 4 δᵀΣ_Δδ)``."""
        return np.sqrt(np.asarray(self.var_null) + np.asarray(self.var_linear))


def _trace_sq_unbiased(xc: np.ndarray) -> float:
    """Unbiased ``tr(Σ²)`` from centred rows (Song et al. 2012, eq. 5, linear kernel).

    Needs ``n >= 4``; with fewer rows it returns the plug-in ``tr(S²)`` (biased upwards, so the
    interval errs on the wide side).
    """
    n = xc.shape[0]
    gram = xc @ xc.T
    if n < 4:
        return float(np.sum(gram * gram)) / (n - 1) ** 2
    np.fill_diagonal(gram, 0.0)
    rows = gram.sum(axis=1)
    total = float(rows.sum())
    value = (
        float(np.sum(gram * gram))
        + total * total / ((n - 1) * (n - 2))
        - 2.0 * (rows @ rows) / (n - 2)
    ) / (n * (n - 3))
    return max(value, 0.0)


def _direction_variance(
    xc: np.ndarray, delta: np.ndarray, t_own: float, t_cross_term: float
) -> float:
    """Unbiased ``δᵀΣδ`` for one cohort (centred rows ``xc``, ``delta`` its mean minus the other's).

    Averages ``((x_i - x_j)ᵀ δ̂_{-ij})² / 2`` over pairs, ``δ̂_{-ij}`` the mean difference without
    subjects ``i`` and ``j``: in centred coordinates that is the sample variance of
    ``x_iᵀΔ - ||x_i||²/(n-2)``. Its expectation exceeds ``δᵀΣδ`` by ``tr(Σ²)/(n-2) +
    tr(Σ Σ_other)/n_other`` (``t_own + t_cross_term``), which is subtracted, so the value is
    unbiased and may be negative. With 2 subjects the plug-in ``ΔᵀSΔ`` (biased upwards) is used.
    """
    n = xc.shape[0]
    proj = xc @ delta
    if n < 3:
        return float(proj @ proj) / (n - 1)
    x = proj - np.einsum("ij,ij->i", xc, xc) / (n - 2)
    return float(np.var(x, ddof=1)) - t_own / (n - 2) - t_cross_term


def distance_moments(x_a: ArrayLike, x_b: ArrayLike) -> DistanceMoments:
    """The unbiased squared distance of two cohorts and the pieces of its variance.

    Args:
        x_a: embeddings of cohort A, ``(n_a, dim)``, ``n_a >= 2``.
        x_b: embeddings of cohort B, ``(n_b, dim)``, ``n_b >= 2``.

    Returns:
        A :class:`DistanceMoments` of floats; costs ``O((n_a + n_b)² dim)``.
    """
    a, b = check_pair(x_a, x_b)
    na, nb = a.shape[0], b.shape[0]
    ac = a - a.mean(axis=0)
    bc = b - b.mean(axis=0)
    delta = a.mean(axis=0) - b.mean(axis=0)
    u = aad2_unbiased(a, b)
    trace = float(delta @ delta) - u
    t_aa = _trace_sq_unbiased(ac)
    t_bb = _trace_sq_unbiased(bc)
    cross = ac @ bc.T
    t_ab = float(np.sum(cross * cross)) / ((na - 1) * (nb - 1))
    var_null = 2 * t_aa / (na * (na - 1)) + 2 * t_bb / (nb * (nb - 1)) + 4 * t_ab / (na * nb)
    q_a = _direction_variance(ac, delta, t_aa, t_ab / nb) / na
    q_b = _direction_variance(bc, -delta, t_bb, t_ab / na) / nb
    # Clipped once, on the sum: clipping each cohort's term would add more upward bias.
    total = max(q_a + q_b, 0.0)
    df = np.inf
    pos_a, pos_b = max(q_a, 0.0), max(q_b, 0.0)
    if pos_a + pos_b > 0:
        # Weighted harmonic mean of the cohorts' n - 1 (Welch–Satterthwaite would square the
        # weights): the leave-two-out estimate is noisier than a sample variance, and with
        # Satterthwaite's df the 8-vs-30 cells covered 0.92 (studentised U: t quantiles ~2.4).
        w_a = pos_a / (pos_a + pos_b)
        df = 1.0 / (w_a / (na - 1) + (1.0 - w_a) / (nb - 1))
    return DistanceMoments(u, var_null, 4.0 * total, trace, float(df))


def _standard_quantile(shape: np.ndarray, q: float) -> np.ndarray:
    """Quantile ``q`` of a gamma law of the given shape, standardised to mean 0 and sd 1."""
    shape = np.asarray(shape, dtype=np.float64)
    normal = special.ndtri(q)
    big = ~(shape < NORMAL_SHAPE)
    safe = np.where(big, 1.0, shape)
    gam = (special.gammaincinv(safe, q) - safe) / np.sqrt(safe)
    return np.where(big, normal, gam)


def interval_from_moments(
    moments: DistanceMoments, level: float = 0.95
) -> tuple[np.ndarray, np.ndarray]:
    """The ``level`` interval of ``||μ_A - μ_B||`` from :func:`distance_moments` (vectorised).

    Args:
        moments: one pair's moments, or arrays of them (one interval per element).
        level: coverage, in ``(0, 1)``.

    Returns:
        ``(lo, hi)`` on the distance scale, ``0 <= lo <= sqrt(max(0, u)) <= hi``; ``lo`` is 0
        when ``θ = 0`` is inside the interval, and ``hi > 0`` unless the cohorts have no
        spread at all.
    """
    u = np.atleast_1d(np.asarray(moments.u, dtype=np.float64))
    raw_v0 = np.atleast_1d(np.asarray(moments.var_null, dtype=np.float64))
    # No spread at all (constant cohorts): the distance is known exactly.
    exact = ~(raw_v0 > 0) & ~(np.asarray(moments.var_linear) > 0)
    v0 = np.where(exact, 1.0, raw_v0)
    q_delta = np.atleast_1d(np.asarray(moments.var_linear, dtype=np.float64)) / 4.0
    trace = np.maximum(np.atleast_1d(np.asarray(moments.trace, dtype=np.float64)), 1e-300)
    df_lin = np.atleast_1d(np.asarray(moments.df_linear, dtype=np.float64))
    u, v0, q_delta, trace, df_lin = np.broadcast_arrays(u, v0, q_delta, trace, df_lin)
    sd0 = np.sqrt(v0)
    # Scale of the matching noncentral chi-square: its null variance 2c²ν equals V0 and its
    # mean cν the noise trace. κ, the variance of Δ along δ per unit θ², is estimated at the
    # observed distance and shrunk to c (the isotropic value) when U is within its noise.
    c = np.minimum(v0 / (2.0 * trace), np.sqrt(v0 / 2.0))
    kappa = (q_delta + c * sd0) / (np.maximum(u, 0.0) + sd0)
    kappa = np.minimum(kappa, np.sqrt(v0 / 2.0))

    def cutoff(theta2: np.ndarray, q: float) -> np.ndarray:
        lin = 4.0 * kappa * theta2
        var = v0 + lin
        k3 = 4.0 * c * v0 + 24.0 * c * kappa * theta2
        gamma = k3 / var**1.5
        shape = 4.0 / np.maximum(gamma, 1e-300) ** 2
        # The linear variance is estimated from few subjects when a cohort is small: widen the
        # tails as Student's t does, with the Satterthwaite df of the total variance.
        with np.errstate(divide="ignore", invalid="ignore"):
            df = np.where(lin > 0, df_lin * (var / np.where(lin > 0, lin, 1.0)) ** 2, np.inf)
        widen = np.where(
            np.isfinite(df) & (df < 1e6),
            special.stdtrit(np.minimum(df, 1e6), q) / special.ndtri(q),
            1.0,
        )
        return theta2 + np.sqrt(var) * widen * _standard_quantile(shape, q)

    def bisect(lo: np.ndarray, hi: np.ndarray, inside, active: np.ndarray) -> np.ndarray:
        lo, hi = lo.copy(), hi.copy()
        for _ in range(BISECTION_STEPS):
            mid = (lo + hi) / 2
            ok = inside(mid)
            lo = np.where(ok, mid, lo)
            hi = np.where(ok, hi, mid)
        return np.where(active, (lo + hi) / 2, 0.0)

    q_hi, q_lo = (1 + level) / 2, (1 - level) / 2
    # Lower bound: the smallest θ² whose upper cutoff reaches U (0 if θ² = 0 already does).
    need_lo = cutoff(np.zeros_like(u), q_hi) < u
    low2 = bisect(np.zeros_like(u), np.maximum(u, 0.0), lambda t: cutoff(t, q_hi) < u, need_lo)
    # Upper bound: the largest θ² whose lower cutoff stays at or below U. A negative U (the
    # cohorts are less different than chance allows) is treated as 0, so the interval is
    # never empty and its upper end says how large a distance a zero estimate leaves open.
    u_top = np.maximum(u, 0.0)
    has_hi = cutoff(np.zeros_like(u), q_lo) <= u_top
    top = u_top + sd0 + kappa
    for _ in range(200):
        grow = has_hi & (cutoff(top, q_lo) <= u_top)
        if not np.any(grow):
            break
        top = np.where(grow, top * 2, top)
    high2 = bisect(np.zeros_like(u), top, lambda t: cutoff(t, q_lo) <= u_top, has_hi)
    point = np.maximum(u, 0.0)
    low2 = np.where(exact, point, low2)
    high2 = np.where(exact, point, np.maximum(high2, low2))
    return np.sqrt(low2), np.sqrt(high2)


def aad_interval(x_a: ArrayLike, x_b: ArrayLike, level: float = 0.95) -> tuple[float, float]:
    """Confidence interval of the distance between the two population means.

    Args:
        x_a: embeddings of cohort A, ``(n_a, dim)``, ``n_a >= 2``.
        x_b: embeddings of cohort B, ``(n_b, dim)``, ``n_b >= 2``.
        level: coverage.

    Returns:
        ``(lo, hi)``: contains the true ``||μ_A - μ_B||`` in about ``level`` of data sets
        (measured: BENCHMARKS.md, "Interval coverage").
    """
    lo, hi = interval_from_moments(distance_moments(x_a, x_b), level)
    return float(lo[0]), float(hi[0])
