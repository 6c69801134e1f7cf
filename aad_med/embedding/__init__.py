"""Stage 4, embedding: encode every subject of a cohort to one vector (streamed, cached).
Knows the model and the evaluation patch grid; computes no statistics.

``embed_cohort`` encodes one cohort; ``embed_cohorts`` several, with the on-disk cache and the
feature set's joint standardisation; ``write_embeddings_csv``/``_npz`` write the outputs.
"""

import aad_med.embedding.acquisition  # noqa: F401  (registers the acquisition feature sets)
from aad_med.embedding import input_texture as _input_texture
from aad_med.embedding import intensity_shape as _intensity_shape
from aad_med.embedding.cache import embed_cohorts
from aad_med.embedding.encode import CohortEmbedding, EmbedSettings, embed_cohort
from aad_med.embedding.features import (
    FeatureSet,
    available_feature_sets,
    get_feature_set,
    register_feature_set,
)
from aad_med.embedding.io import (
    read_embeddings_csv,
    read_embeddings_npz,
    write_embeddings_csv,
    write_embeddings_npz,
)
from aad_med.io_utils import file_sha256

# The intensity blocks (and the default, multiscale+input_texture+intensity_shape) are measured
# in BENCHMARKS.md and described in the report (report/text.py DETECTION_RATES), so they are
# selectable by name like the others.
_intensity_shape.register()
_input_texture.register()

__all__ = [
    "CohortEmbedding",
    "EmbedSettings",
    "FeatureSet",
    "available_feature_sets",
    "embed_cohort",
    "embed_cohorts",
    "file_sha256",
    "get_feature_set",
    "read_embeddings_csv",
    "read_embeddings_npz",
    "register_feature_set",
    "write_embeddings_csv",
    "write_embeddings_npz",
]
