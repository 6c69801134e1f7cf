"""Stage 5, distances: AAD and its statistics (permutation p-values, bootstrap intervals,
effect sizes, complementary tests, attribution). Pure numpy/scipy on arrays: never touches files.

Entry points: :func:`compare_embeddings` (every pair of k cohorts, the statistical part of
``distances.json``) and :func:`combine_encoder_runs` (several encoders' results combined). Each
statistic is also a small function in its own module: ``aad`` (AAD, unbiased AAD², attribution),
``permutation`` (vectorised label shuffles), ``bootstrap``, ``covariance`` (Ledoit–Wolf),
``hotelling`` (standardised AAD, T²), ``kernels`` (MMD², energy), ``frechet``, ``univariate``
(KS with FDR, ``akld``), ``multi`` (MDS, dendrogram).
"""

from aad_med.distances.aad import aad, aad2_unbiased, dimension_shares
from aad_med.distances.compare import ALL_TESTS, DEFINITIONS, compare_embeddings
from aad_med.distances.encoders import combine_encoder_runs
from aad_med.distances.permutation import aad_permutation_test

__all__ = [
    "ALL_TESTS",
    "DEFINITIONS",
    "aad",
    "aad2_unbiased",
    "aad_permutation_test",
    "combine_encoder_runs",
    "compare_embeddings",
    "dimension_shares",
]
