"""Stage 7, calibration: shift calibration of an encoder's AAD.

Owns shift calibration: it builds artificially shifted copies of a reference cohort with MRI
artefacts at graded severities (:mod:`~aad_med.calibration.artefacts`: bias field, Rician noise,
Gibbs ringing, blur, downsampling, global intensity scale, contrast gamma), splits the reference
into disjoint halves, and measures AAD, standardised AAD and the permutation p-value for every
(artefact, severity, subjects per cohort, repeat) (:mod:`~aad_med.calibration.curves`). The result
translates an observed AAD into "about as different as noise at severity s" and tells how many
subjects are needed to see a given shift.

It reads cohorts only through :mod:`aad_med.data` and encodes only through the checkpoint's model;
statistics come from :mod:`aad_med.distances`; figures from :mod:`aad_med.plots.calibration`.
Writing the run folder is left to ``aad-calibrate`` (:mod:`aad_med.cli.calibrate`), except the
small atomic writers in :mod:`~aad_med.calibration.curves`.
"""

from aad_med.calibration.artefacts import (
    ARTEFACTS,
    DEFAULT_SEVERITIES,
    apply_artefact,
    artefact_seed,
)
from aad_med.calibration.curves import (
    CALIBRATION_COLUMNS,
    CalibrationSettings,
    annotate_pairs,
    calibration_summary,
    describe_equivalent_severity,
    equivalent_severity,
    read_calibration_table,
    run_calibration,
)

__all__ = [
    "ARTEFACTS",
    "CALIBRATION_COLUMNS",
    "DEFAULT_SEVERITIES",
    "CalibrationSettings",
    "annotate_pairs",
    "apply_artefact",
    "artefact_seed",
    "calibration_summary",
    "describe_equivalent_severity",
    "equivalent_severity",
    "read_calibration_table",
    "run_calibration",
]
