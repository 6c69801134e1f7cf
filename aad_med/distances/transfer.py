"""Stage 5, distances: relating dataset distances to what a model loses on the other cohort.

Given one distance per target cohort (source → target) and the model's performance drop on each
target, this module measures how well the distance orders the drops (Spearman and Kendall rank
correlation with a bootstrap interval over targets), fits a monotone (isotonic, non-decreasing)
curve that predicts the drop from a distance with an interval, and scores source selection
(does the closest source give the best model: top-1 hit rate, strict and within the sampling
noise of the target's subjects, rank correlation).

Pure numpy/scipy on arrays: never touches files and writes no prose.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats
from scipy.optimize import isotonic_regression

from aad_med.errors import ConfigError

MIN_POINTS = 3
"""Fewest targets for which a rank correlation is reported (with 2 it is always ±1)."""


def _pair_arrays(x: ArrayLike, y: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    b = np.asarray(y, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ConfigError(f"distances and drops differ in length ({a.size} vs {b.size})")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise ConfigError("distances and drops must be finite numbers")
    return a, b


def _rank_pair(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(Spearman, Kendall tau-b); NaN when either side is constant."""
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan"), float("nan")
    rho = stats.spearmanr(x, y).statistic
    tau = stats.kendalltau(x, y).statistic
    return float(rho), float(tau)


def rank_correlations(
    distance: ArrayLike,
    drop: ArrayLike,
    n_bootstrap: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> dict:
    """Spearman and Kendall correlation of a distance with the performance drop across targets.

    The interval resamples targets with replacement (percentile bootstrap); resamples in which
    the distance or the drop is constant have no rank correlation and are left out.

    Args:
        distance: one distance per target.
        drop: the performance drop on each target (source score − target score).
        n_bootstrap: target resamples.
        seed: bootstrap seed.
        level: interval coverage.

    Returns:
        ``{"n", "spearman", "spearman_ci95", "kendall", "kendall_ci95", "n_bootstrap_used"}``;
        ``None`` values when there are fewer than :data:`MIN_POINTS` targets or a side is
        constant.

    Raises:
        ConfigError: lengths differ, non-finite values, or ``n_bootstrap < 1``.
    """
    x, y = _pair_arrays(distance, drop)
    if int(n_bootstrap) < 1:
        raise ConfigError(f"n_bootstrap must be >= 1, got {n_bootstrap}")
    out = {
        "n": int(x.size),
        "spearman": None,
        "spearman_ci95": None,
        "kendall": None,
        "kendall_ci95": None,
        "n_bootstrap_used": 0,
    }
    if x.size < MIN_POINTS:
        return out
    rho, tau = _rank_pair(x, y)
    if not np.isfinite(rho):
        return out
    out["spearman"], out["kendall"] = rho, tau
    rng = np.random.default_rng([int(seed), 17])
    idx = rng.integers(0, x.size, size=(int(n_bootstrap), x.size))
    boots = np.array([_rank_pair(x[i], y[i]) for i in idx])
    ok = np.isfinite(boots[:, 0])
    out["n_bootstrap_used"] = int(ok.sum())
    if ok.sum() >= 2:
        q = [(1 - level) / 2, (1 + level) / 2]
        out["spearman_ci95"] = [float(v) for v in np.quantile(boots[ok, 0], q)]
        out["kendall_ci95"] = [float(v) for v in np.quantile(boots[ok, 1], q)]
    return out


def _isotonic_knots(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Non-decreasing least-squares fit of ``y`` on ``x`` at the distinct values of ``x``
    (tied distances pooled with their counts as weights)."""
    ux, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    means = np.bincount(inverse, weights=y) / counts
    fitted = isotonic_regression(means, weights=counts.astype(np.float64), increasing=True).x
    return ux, np.asarray(fitted, dtype=np.float64)


def _interp(knots_x: np.ndarray, knots_y: np.ndarray, d: np.ndarray) -> np.ndarray:
    # Linear between knots, flat beyond the observed range: no extrapolated trend.
    return np.interp(d, knots_x, knots_y)


@dataclass
class MonotoneFit:
    """Isotonic (non-decreasing) fit of the drop on a distance, with bootstrap refits.

    ``predict(d)`` interpolates the fit linearly between observed distances and holds it flat
    beyond them. ``interval(d)`` is a prediction interval for one new cohort at distance ``d``:
    the spread of the refits on target resamples at ``d``, each plus a residual of the original
    fit drawn at random, so it covers both the uncertainty of the curve and the scatter of
    single cohorts around it.
    """

    knots_x: np.ndarray
    knots_y: np.ndarray
    residuals: np.ndarray
    boot_knots: list[tuple[np.ndarray, np.ndarray]]
    seed: int = 0
    level: float = 0.95

    def predict(self, distance: ArrayLike) -> np.ndarray:
        """The fitted drop at each distance."""
        return _interp(self.knots_x, self.knots_y, np.asarray(distance, dtype=np.float64))

    def interval(self, distance: ArrayLike, level: float | None = None) -> np.ndarray:
        """``(..., 2)`` prediction interval of the drop of one cohort at each distance."""
        level = self.level if level is None else float(level)
        d = np.asarray(distance, dtype=np.float64)
        rng = np.random.default_rng([int(self.seed), 18])
        curves = np.stack([_interp(kx, ky, d) for kx, ky in self.boot_knots])
        noise = rng.choice(self.residuals, size=curves.shape) if self.residuals.size else 0.0
        q = [(1 - level) / 2, (1 + level) / 2]
        return np.moveaxis(np.quantile(curves + noise, q, axis=0), 0, -1)

    @property
    def range(self) -> tuple[float, float]:
        """The distances the fit has seen (outside them the prediction is held flat)."""
        return float(self.knots_x[0]), float(self.knots_x[-1])

    def to_dict(self, grid_points: int = 25) -> dict:
        """JSON-ready: the knots, the residual spread and the interval on a grid of distances."""
        lo, hi = self.range
        grid = np.linspace(lo, hi, grid_points) if hi > lo else np.array([lo])
        band = self.interval(grid)
        return {
            "method": "isotonic (non-decreasing), linear between knots, flat outside",
            "knots_distance": self.knots_x.tolist(),
            "knots_drop": self.knots_y.tolist(),
            "residual_sd": float(self.residuals.std(ddof=1)) if self.residuals.size > 1 else 0.0,
            "grid_distance": grid.tolist(),
            "grid_drop": self.predict(grid).tolist(),
            "grid_interval95": band.tolist(),
            "n_bootstrap": len(self.boot_knots),
        }


def fit_monotone(
    distance: ArrayLike, drop: ArrayLike, n_bootstrap: int = 1000, seed: int = 0
) -> MonotoneFit:
    """A non-decreasing fit of the drop on the distance, with ``n_bootstrap`` refits on target
    resamples for the prediction interval.

    Raises:
        ConfigError: fewer than 2 targets, lengths differ, non-finite values.
    """
    x, y = _pair_arrays(distance, drop)
    if x.size < 2:
        raise ConfigError(f"a monotone fit needs at least 2 targets, got {x.size}")
    if int(n_bootstrap) < 1:
        raise ConfigError(f"n_bootstrap must be >= 1, got {n_bootstrap}")
    kx, ky = _isotonic_knots(x, y)
    residuals = y - _interp(kx, ky, x)
    rng = np.random.default_rng([int(seed), 19])
    boots = []
    for idx in rng.integers(0, x.size, size=(int(n_bootstrap), x.size)):
        boots.append(_isotonic_knots(x[idx], y[idx]))
    return MonotoneFit(kx, ky, residuals, boots, seed=int(seed))


def drop_interval(
    source_scores: ArrayLike,
    target_scores: ArrayLike,
    n_bootstrap: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the drop (source mean − target mean), both cohorts'
    subjects resampled independently: a drop whose interval holds 0 is no measurable loss.

    Raises:
        ConfigError: an empty or non-finite side, or ``n_bootstrap < 1``.
    """
    a = np.asarray(source_scores, dtype=np.float64).reshape(-1)
    b = np.asarray(target_scores, dtype=np.float64).reshape(-1)
    if a.size == 0 or b.size == 0:
        raise ConfigError("a drop interval needs scores on both sides")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise ConfigError("scores must be finite numbers")
    if int(n_bootstrap) < 1:
        raise ConfigError(f"n_bootstrap must be >= 1, got {n_bootstrap}")
    rng = np.random.default_rng([int(seed), 23])
    boots = a[rng.integers(0, a.size, (int(n_bootstrap), a.size))].mean(axis=1) - b[
        rng.integers(0, b.size, (int(n_bootstrap), b.size))
    ].mean(axis=1)
    lo, hi = np.quantile(boots, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


# ---------------------------------------------------------------------------------------------
# Source selection


def rank_sources(distances: Mapping[str, float]) -> list[str]:
    """Candidate sources from the closest (smallest distance) to the farthest; ties keep the
    given order."""
    names = list(distances)
    order = np.argsort([float(distances[n]) for n in names], kind="stable")
    return [names[i] for i in order]


def top1_hit(distances: Mapping[str, float], scores: Mapping[str, float]) -> bool:
    """Whether the closest source reaches the best score (a tie for best counts as a hit).

    Raises:
        ConfigError: the two mappings name different sources.
    """
    if set(distances) != set(scores):
        raise ConfigError(
            f"distances and scores name different sources: {sorted(distances)} vs {sorted(scores)}"
        )
    chosen = rank_sources(distances)[0]
    return bool(float(scores[chosen]) >= max(float(v) for v in scores.values()))


def paired_gap_interval(
    best: ArrayLike,
    chosen: ArrayLike,
    n_bootstrap: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of mean(best − chosen) over the subjects of one target,
    each subject scored by both sources' models (a paired design: one resample of the subjects
    serves both sides, so what the subjects share cancels).

    Args:
        best: per-subject scores of the best-scoring source's model.
        chosen: the same subjects' scores (same order) of the chosen source's model.
        n_bootstrap: subject resamples.
        seed: bootstrap seed.
        level: interval coverage.

    Raises:
        ConfigError: lengths differ, no subjects, non-finite values, or ``n_bootstrap < 1``.
    """
    a, b = _pair_arrays(best, chosen)
    if a.size == 0:
        raise ConfigError("a paired gap interval needs at least one subject")
    if int(n_bootstrap) < 1:
        raise ConfigError(f"n_bootstrap must be >= 1, got {n_bootstrap}")
    diff = a - b
    rng = np.random.default_rng([int(seed), 29])
    boots = diff[rng.integers(0, diff.size, (int(n_bootstrap), diff.size))].mean(axis=1)
    lo, hi = np.quantile(boots, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def _aligned(subject_scores: Mapping[str, Mapping[str, float]], names: Sequence[str]) -> dict:
    """Each source's per-subject scores as arrays in one shared subject order."""
    ids = sorted(subject_scores[names[0]])
    for n in names:
        if sorted(subject_scores[n]) != ids:
            raise ConfigError(
                f"per-subject scores of sources {names[0]!r} and {n!r} name different subjects: "
                "every source's model must score the same target subjects"
            )
    return {n: np.array([float(subject_scores[n][i]) for i in ids]) for n in names}


def selection_agreement(
    distances: Mapping[str, float],
    scores: Mapping[str, float],
    subject_scores: Mapping[str, Mapping[str, float]] | None = None,
    n_bootstrap: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> dict:
    """How well a distance ranks candidate sources for one target.

    "The best source" is only as sharp as the target's subjects allow: two sources whose Dice
    differ by less than the sampling noise are tied in all but name. With ``subject_scores``
    (every source's model scored on the same target subjects) a paired bootstrap over those
    subjects gives an interval of Dice(best) − Dice(chosen); a miss whose interval holds 0 is
    counted *within noise*. The strict ``top1`` is kept as it is.

    Args:
        distances: ``{source: distance to the target}``.
        scores: ``{source: mean score on the target}``.
        subject_scores: ``{source: {subject: score}}`` on the target (optional).
        n_bootstrap: subject resamples of the gap interval.
        seed: bootstrap seed.
        level: interval coverage.

    Returns:
        ``{"ranking": closest first, "best": best-scoring source, "top1": bool, "regret": the
        best score minus the closest source's score (0 on a hit: what trusting the distance
        cost), "spearman": rank correlation of −distance with the score (None below 3 sources
        or when constant)}``; with ``subject_scores`` also ``"regret_ci95"`` (paired bootstrap
        interval of the regret, ``[0, 0]`` on a hit) and ``"top1_within_noise"`` (a hit, or the
        interval holds 0).

    Raises:
        ConfigError: the mappings name different sources or subjects.
    """
    names = list(distances)
    hit = top1_hit(distances, scores)
    d = np.array([float(distances[n]) for n in names])
    s = np.array([float(scores[n]) for n in names])
    rho = None
    if len(names) >= MIN_POINTS:
        r, _ = _rank_pair(-d, s)
        rho = None if not np.isfinite(r) else r
    ranking = rank_sources(distances)
    best = names[int(np.argmax(s))]
    out = {
        "ranking": ranking,
        "best": best,
        "top1": hit,
        "regret": float(s.max() - float(scores[ranking[0]])),
        "spearman": rho,
    }
    if subject_scores is not None:
        if set(subject_scores) != set(distances):
            raise ConfigError(
                f"per-subject scores name sources {sorted(subject_scores)}, "
                f"distances {sorted(distances)}"
            )
        per = _aligned(subject_scores, names)
        if hit:
            ci = (0.0, 0.0)
        else:
            ci = paired_gap_interval(per[best], per[ranking[0]], n_bootstrap, seed, level)
        out["regret_ci95"] = [ci[0], ci[1]]
        out["top1_within_noise"] = bool(hit or ci[0] <= 0.0 <= ci[1])
    return out


def tied_with_best(
    scores: Mapping[str, float],
    subject_scores: Mapping[str, Mapping[str, float]],
    n_bootstrap: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> list[str]:
    """The sources a pick would count as "top-1 within noise" for one target: the best-scoring
    source and every source whose paired interval of Dice(best) − Dice(source) holds 0 (the
    same interval, seed for seed, that :func:`selection_agreement` computes for a chosen
    source). Their share of all sources is what a random pick scores within noise: the chance
    level a distance's within-noise rate must beat.

    Raises:
        ConfigError: the mappings name different sources or subjects.
    """
    names = list(scores)
    if set(subject_scores) != set(names):
        raise ConfigError(
            f"per-subject scores name sources {sorted(subject_scores)}, scores {sorted(names)}"
        )
    per = _aligned(subject_scores, names)
    top = max(float(v) for v in scores.values())
    best = names[int(np.argmax([float(scores[n]) for n in names]))]
    tied = []
    for n in names:
        if float(scores[n]) >= top:
            tied.append(n)
            continue
        lo, hi = paired_gap_interval(per[best], per[n], n_bootstrap, seed, level)
        if lo <= 0.0 <= hi:
            tied.append(n)
    return tied


def top1_hit_rate(selections: Sequence[Mapping], key: str = "top1") -> float:
    """Share of targets whose closest source was (one of) the best (from
    :func:`selection_agreement`); ``key="top1_within_noise"`` counts ties within the sampling
    noise as hits too."""
    if not selections:
        raise ConfigError("no targets to score source selection on")
    if key not in ("top1", "top1_within_noise"):
        raise ConfigError(f"unknown selection verdict {key!r}")
    missing = [i for i, s in enumerate(selections) if key not in s]
    if missing:
        raise ConfigError(
            f"{len(missing)} selection verdict(s) lack {key!r} (no per-subject scores)"
        )
    return float(np.mean([bool(s[key]) for s in selections]))
