"""Stage 1, data: cohort discovery (layouts), validation, NIfTI reading, MONAI preprocessing
and patch datasets, fingerprints, and the synthetic BraTS-style cohort generator.

Nothing here knows about models or statistics."""
