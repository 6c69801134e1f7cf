"""Stage 7, calibration: encoding a reference cohort under artificial shifts.

Every reference subject is read once; for each (artefact, severity), including the clean
severity 0, the artefact is applied to the RAW volume (:mod:`~aad_med.data.artefacts`),
the rest of the checkpoint's preprocessing follows, and the subject is encoded on the evaluation
patch grid exactly as :func:`aad_med.embedding.embed_cohort` does. Each (subject, artefact,
severity) is embedded exactly once and reused by every repeat and cohort size. Nothing is
written and no statistic is computed here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from aad_med import DEFAULT_FEATURES
from aad_med.calibration.curves import ConditionEmbeddings
from aad_med.data.artefacts import apply_artefact, artefact_seed
from aad_med.data.preprocessing import PreprocessingConfig
from aad_med.data.records import SubjectRecord
from aad_med.data.transforms import AddBrainMaskd, SafeCompose, monai_transforms
from aad_med.device import resolve_device
from aad_med.embedding.encode import check_model_matches, encode_subject
from aad_med.embedding.features import FeatureSet, get_feature_set
from aad_med.errors import InputError

log = logging.getLogger("aad_med.calibrate")


def split_preprocessing(preprocessing: PreprocessingConfig) -> tuple[SafeCompose, SafeCompose]:
    """The checkpoint's deterministic preprocessing cut after the brain mask: ``(read, finish)``.

    ``read`` loads the raw subject and records its brain mask (voxels non-zero in any channel of
    the clean volume); ``finish`` reorients, resamples, crops, z-scores and pads. Artefacts go in
    between, so they act on raw intensities but never move the brain crop. The step-by-step
    MONAI chain (:func:`aad_med.data.transforms.monai_transforms`) is cut: its re-masking with
    the clean brain keeps artefacts out of the background, which the fused path skips.
    """
    steps = list(monai_transforms(preprocessing).transforms)
    cut = next((i for i, t in enumerate(steps) if isinstance(t, AddBrainMaskd)), None)
    if cut is None:
        raise RuntimeError("the preprocessing has no brain-mask step to insert artefacts after")
    return (
        SafeCompose(steps[: cut + 1], log_stats=False),
        SafeCompose(steps[cut + 1 :], log_stats=False),
    )


def encode_preprocessed(
    model: torch.nn.Module,
    item: Mapping[str, Any],
    preprocessing: PreprocessingConfig,
    device: torch.device,
    batch_size: int,
    feature_set,
) -> np.ndarray:
    """One preprocessed subject (keys of ``PREPROCESSED_KEYS``) -> its feature vector, on the
    same evaluation grid and with the same reduction as :func:`aad_med.embedding.embed_cohort`
    (both run :func:`aad_med.embedding.encode.encode_subject`)."""
    return encode_subject(model, item, preprocessing, device, batch_size, feature_set).vector


def _shifted_item(raw: Mapping[str, Any], artefact: str, severity: float, seed: int) -> dict:
    d = dict(raw)
    if severity == 0.0:
        d["image"] = raw["image"].clone()
    else:
        d["image"] = apply_artefact(raw["image"], artefact, severity, seed, brain=raw["brain"])
    d["seg"] = raw["seg"].clone()
    d["brain"] = raw["brain"].clone()
    return d


def embed_conditions(
    model: torch.nn.Module,
    records: Sequence[SubjectRecord],
    preprocessing: PreprocessingConfig,
    ladders: Mapping[str, Sequence[float]],
    seed: int = 0,
    device: str | torch.device = "cpu",
    batch_size: int = 32,
    features: str | FeatureSet = DEFAULT_FEATURES,
    progress: bool = True,
) -> ConditionEmbeddings:
    """Encode every subject clean and under every (artefact, severity > 0) of ``ladders``.

    Each subject is read from disk once; memory holds one subject's raw volume at a time.

    Raises:
        CheckpointError: the model does not fit the preprocessing.
        InputError: a subject's file cannot be read (named).
    """
    device = resolve_device(device)
    check_model_matches(model, preprocessing)
    model = model.to(device).eval()
    feature_set = get_feature_set(features)
    conditions: list[tuple[str, float]] = [("none", 0.0)]
    for name, ladder in ladders.items():
        conditions.extend((name, float(s)) for s in ladder if float(s) > 0)
    read, finish = split_preprocessing(preprocessing)
    per_subject: list[np.ndarray] = []
    ids: list[str] = []
    t0 = time.perf_counter()
    bar = tqdm(
        total=len(records) * len(conditions),
        desc="encoding shifted subjects",
        unit="volume",
        disable=None if progress else True,
        leave=False,
    )
    try:
        for record in records:
            raw = read(record.as_dict())
            vecs = []
            for artefact, severity in conditions:
                item = finish(
                    _shifted_item(
                        raw, artefact, severity, artefact_seed(seed, record.subject_id, artefact)
                    )
                )
                try:
                    vecs.append(
                        encode_preprocessed(
                            model, item, preprocessing, device, batch_size, feature_set
                        )
                    )
                except ValueError as e:
                    folder = Path(next(iter(record.images.values())).path).parent
                    raise InputError(folder, f"cannot be encoded ({e})") from None
                bar.update(1)
            per_subject.append(np.stack(vecs))
            ids.append(record.subject_id)
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    vectors = np.stack(per_subject, axis=1)
    # With a fixed reference (feature_set.reference) every subject under every condition is
    # mapped on its own: the scale of aad-compare with this checkpoint. Without one, the
    # standardisation is fitted over all subjects under all conditions.
    finalized = feature_set.finalize({str(i): vectors[i] for i in range(len(conditions))})
    vectors = np.stack([finalized[str(i)] for i in range(len(conditions))])
    log.info(
        "encoded %d subjects x %d conditions in %.1f s (%.2f volumes/s)",
        len(ids),
        len(conditions),
        seconds,
        len(ids) * len(conditions) / max(seconds, 1e-9),
    )
    return ConditionEmbeddings(ids, conditions, vectors.astype(np.float64), seconds)
