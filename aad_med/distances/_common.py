"""Stage 5, distances: shared input checks and JSON cleaning for the statistics modules.

Pure numpy on arrays; never touches files.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from aad_med.errors import ConfigError


def as_cohort_array(x: Any, name: str, min_subjects: int = 2) -> np.ndarray:
    """Checks one cohort's embedding matrix and returns it as float64 ``(n_subjects, dim)``.

    Args:
        x: array-like of shape ``(n_subjects, dim)`` (a 1-D array is one dimension per subject).
        name: the cohort name, used in error messages.
        min_subjects: the fewest subjects a cohort may have.

    Returns:
        A C-contiguous float64 copy.

    Raises:
        ConfigError: wrong shape, too few subjects, or non-finite values.
    """
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise ConfigError(
            f"cohort '{name}': embeddings must be a 2-D array (subjects, dims), got shape {arr.shape}"
        )
    if arr.shape[1] < 1:
        raise ConfigError(f"cohort '{name}': embeddings have no dimensions")
    if arr.shape[0] < min_subjects:
        raise ConfigError(
            f"cohort '{name}' has {arr.shape[0]} subject(s); "
            f"comparing cohorts needs at least {min_subjects} per cohort"
        )
    if not np.all(np.isfinite(arr)):
        bad = int(np.sum(~np.all(np.isfinite(arr), axis=1)))
        raise ConfigError(f"cohort '{name}': {bad} subject vector(s) contain NaN or infinity")
    return np.ascontiguousarray(arr)


def check_pair(x_a: Any, x_b: Any, names: tuple[str, str] = ("a", "b")) -> tuple[np.ndarray, ...]:
    """Checks two cohorts and that they share a dimension.

    Raises:
        ConfigError: as :func:`as_cohort_array`, or differing dimensions.
    """
    a = as_cohort_array(x_a, names[0])
    b = as_cohort_array(x_b, names[1])
    if a.shape[1] != b.shape[1]:
        raise ConfigError(
            f"cohorts '{names[0]}' and '{names[1]}' have different dimensions "
            f"({a.shape[1]} vs {b.shape[1]})"
        )
    return a, b


def to_jsonable(obj: Any) -> Any:
    """Converts numpy scalars/arrays to Python types and NaN/inf to None, recursively."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        val = float(obj)
        return val if math.isfinite(val) else None
    return obj
