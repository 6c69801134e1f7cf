"""Stage 5, distances: AAD and its statistics (permutation p-values, bootstrap intervals,
effect sizes, complementary tests, attribution). Pure numpy/scipy on arrays: never touches files.

Entry points: :func:`compare_embeddings` (every pair of k cohorts, the statistical part of
``distances.json``) and :func:`combine_encoder_runs` (several encoders' results combined). Each
statistic is also a small function in its own module: ``aad`` (AAD, unbiased AAD² and its root, attribution),
``interval`` (the confidence interval of the distance), ``permutation`` (vectorised label
shuffles), ``bootstrap`` (cohort-mean bands), ``covariance`` (Ledoit–Wolf), ``hotelling``
(standardised AAD, T²), ``kernels`` (MMD², energy), ``frechet``, ``univariate``
(KS with FDR, ``akld``), ``multi`` (MDS, dendrogram).
"""

from aad_med.distances.aad import aad, aad2_unbiased, aad_unbiased, dimension_shares
from aad_med.distances.compare import ALL_TESTS, compare_embeddings
from aad_med.distances.encoders import combine_encoder_runs
from aad_med.distances.interval import aad_interval
from aad_med.distances.permutation import aad_permutation_test

__all__ = [
    "ALL_TESTS",
    "aad",
    "aad2_unbiased",
    "aad_interval",
    "aad_unbiased",
    "aad_permutation_test",
    "combine_encoder_runs",
    "compare_embeddings",
    "dimension_shares",
]
