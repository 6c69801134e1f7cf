"""Stage 7, calibration: shift calibration of an encoder's AAD.

Owns shift calibration: artificially shifted copies of a reference cohort with MRI artefacts at
graded severities (:mod:`~aad_med.data.artefacts`: bias field, Rician noise, Gibbs
ringing, blur, downsampling, global intensity scale, contrast gamma), encoded once per condition
(:mod:`~aad_med.calibration.conditions`); AAD, the Mahalanobis distance of the means and the permutation p-value for
every (artefact, severity, subjects per cohort, repeat) on disjoint halves
(:mod:`~aad_med.calibration.curves`); the table as files (:mod:`~aad_med.calibration.table`); and
the translation of an observed AAD into "about as different as noise at severity s"
(:mod:`~aad_med.calibration.equivalence`).

It reads cohorts only through :mod:`aad_med.data` and encodes only through the checkpoint's
model; statistics come from :mod:`aad_med.distances`. The whole run and its run folder are
:mod:`aad_med.pipelines.calibrate` (``aad-calibrate``).
"""

from aad_med.calibration.curves import CALIBRATION_COLUMNS, calibration_summary
from aad_med.calibration.equivalence import (
    annotate_pairs,
    describe_equivalent_severity,
    equivalent_severity,
)
from aad_med.calibration.table import read_calibration_table
from aad_med.data.artefacts import (
    ARTEFACTS,
    DEFAULT_SEVERITIES,
    apply_artefact,
    artefact_seed,
)

__all__ = [
    "ARTEFACTS",
    "CALIBRATION_COLUMNS",
    "DEFAULT_SEVERITIES",
    "annotate_pairs",
    "apply_artefact",
    "artefact_seed",
    "calibration_summary",
    "describe_equivalent_severity",
    "equivalent_severity",
    "read_calibration_table",
]
