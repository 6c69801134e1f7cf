"""Warnings about a comparison's inputs that the numbers alone would hide: the same folder given
as two cohorts, the same checkpoint twice, cohorts too small for stable statistics.

Used by :func:`aad_med.pipelines.compare.run_comparison` (logged, and listed in
``distances.json`` as ``caveats`` and in the report). Reads file metadata only (paths, sizes and
hashes of checkpoints); computes no statistic.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from aad_med.data.records import Cohort
from aad_med.io_utils import file_digest

TINY_COHORT = 5
"""Below this many subjects per cohort, effect sizes and p-values are very unstable."""


def smallest_p(n_a: int, n_b: int, n_permutations: int) -> float:
    """The smallest p-value a permutation test with subject-level shuffles can give for cohorts
    of ``n_a`` and ``n_b`` subjects and ``n_permutations`` random shuffles: the larger of
    ``1/(B+1)`` and the exact bound (a symmetric statistic takes each value at least twice
    among the ``C(n_a+n_b, n_a)`` labellings when ``n_a == n_b``; then it equals
    :func:`aad_med.calibration.curves.smallest_attainable_p`, which covers equal sizes only)."""
    labellings = math.comb(n_a + n_b, n_a)
    exact = (2 if n_a == n_b else 1) / labellings
    return max(1.0 / (n_permutations + 1), exact)


def same_files(a: Path, b: Path) -> bool:
    """Whether two paths name one file or folder (links and relative spellings included)."""
    try:
        return a.resolve() == b.resolve() or a.samefile(b)
    except OSError:
        return False


def input_caveats(
    cohort_paths: Mapping[str, str | Path],
    cohorts: Mapping[str, Cohort],
    checkpoints: Sequence[str | Path],
    n_permutations: int,
) -> list[str]:
    """One sentence per caveat about the inputs (empty when there is none).

    Args:
        cohort_paths: ``{name: folder or manifest}`` as given.
        cohorts: the loaded cohorts (for their sizes).
        checkpoints: the checkpoint files (several for an encoder ensemble).
        n_permutations: permutations of the AAD test (for the smallest attainable p).
    """
    out: list[str] = []
    names = list(cohort_paths)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            if same_files(Path(cohort_paths[a]), Path(cohort_paths[b])):
                out.append(
                    f"cohorts {a} and {b} are the same folder ({cohort_paths[a]}): their AAD is "
                    "0 by construction and says nothing about two sites"
                )
    paths = [Path(c) for c in checkpoints]
    seen: dict[str, Path] = {}
    for p in paths:
        try:
            key = file_digest(p)
        except OSError:
            continue
        if key in seen:
            twice = "is given twice" if same_files(p, seen[key]) else f"is a copy of {seen[key]}"
            out.append(
                f"checkpoint {p} {twice}: the encoder-to-encoder spread of the combined "
                "interval is underestimated"
            )
        else:
            seen[key] = p
    sizes = {name: len(c.subjects) for name, c in cohorts.items()}
    small = {n: k for n, k in sizes.items() if k < TINY_COHORT}
    if small:
        listed = ", ".join(f"{n} ({k})" for n, k in small.items())
        ordered = sorted(sizes.values())
        floor = smallest_p(ordered[0], ordered[1], n_permutations) if len(ordered) > 1 else 1.0
        out.append(
            f"small cohorts: {listed} subject(s), fewer than {TINY_COHORT}: effect sizes and "
            f"p-values are very unstable (the smallest attainable p of the two smallest "
            f"cohorts is {floor:.3g}); read them as a sketch, not evidence"
        )
    return out
