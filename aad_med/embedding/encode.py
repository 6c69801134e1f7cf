"""Encoding a cohort: every subject's deterministic evaluation grid of brain patches goes through
the encoder in batches (no gradients; float32 on every device) and is reduced to one vector by the
chosen feature set. Streamed: one subject is in memory at a time, so memory does not grow with the
cohort beyond the per-subject vectors.

:func:`encode_subject` encodes one preprocessed subject; :func:`embed_cohort` runs it over a
cohort, and the calibration stage over artefact-shifted copies of subjects.

Size: one module because the settings, the per-subject encoding and the cohort loop share the
evaluation-grid contract; the caches live in cache.py and preprocessed.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from aad_med import DEFAULT_FEATURES
from aad_med.data.io import MID_SLICES
from aad_med.data.patches import extract_patches
from aad_med.data.preprocessing import PreprocessingConfig
from aad_med.data.records import Cohort, SubjectRecord
from aad_med.device import resolve_device
from aad_med.embedding.features import (
    FeatureSet,
    LatentMeanAccumulator,
    PatchBatch,
    get_feature_set,
)
from aad_med.embedding.preprocessed import (
    DEFAULT_MAX_BYTES,
    PreprocessedCache,
    PreprocessedSubjects,
    eval_positions,
)
from aad_med.embedding.regional import RegionalAccumulator, RegionalLatents
from aad_med.errors import CheckpointError
from aad_med.models import ConvAutoencoder

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 32


@dataclass(frozen=True)
class EmbedSettings:
    """How cohorts are embedded: the options :func:`embed_cohort`,
    :func:`aad_med.embedding.cache.embed_cohorts` and
    :func:`aad_med.embedding.distributed.embed_cohorts_distributed` share.

    Attributes:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``"auto"`` (:func:`aad_med.device.resolve_device`).
        batch_size: patches per forward pass.
        features: feature set name or instance (default :data:`aad_med.DEFAULT_FEATURES`;
            ``"latent"`` is the seed's mean of patch latents).
        keep_positions: also accumulate latents by grid position for the regional map.
        num_workers: DataLoader workers preprocessing the next subjects in the background.
        progress: show a tqdm bar (subjects/s).
        checkpoint_hash: SHA-256 of the checkpoint file (:func:`aad_med.io_utils.file_sha256`);
            caching is off without it (a model in memory has no stable identity).
        cache_dir: embedding cache folder; ``None`` turns caching off.
        cache_mode: ``"write"`` reads and adds cache entries, ``"read"`` only reads them (a
            shared or read-only cache), ``"off"`` neither (both caches).
        preprocessed_dir: preprocessed-subject cache folder
            (:mod:`aad_med.embedding.preprocessed`); ``None`` turns that cache off.
        preprocessed_max_bytes: its size bound (least recently used entries are deleted).
        prefetch: with ``num_workers=0``, a background thread decodes and preprocesses the
            next subject while the current one is encoded. Off by default: on two shared,
            busy cores it measured no gain (BENCHMARKS.md, "Encoding at BraTS size"); it can
            help where a core is idle while the encoder runs.
        quality: also compute every subject's image-quality row
            (:func:`aad_med.data.quality.quality_row`) from the volumes decoded for the
            embedding (the segmentation is then decoded too), kept in the preprocessed cache.
        check_seg: also decode every subject's segmentation and check its voxels and labels,
            so the embedding's one decode of each file does validation's voxel checks
            (:class:`~aad_med.embedding.preprocessed.PreprocessedSubjects`).
    """

    device: str | torch.device = "cpu"
    batch_size: int = DEFAULT_BATCH_SIZE
    features: str | FeatureSet = DEFAULT_FEATURES
    keep_positions: bool = False
    num_workers: int = 0
    progress: bool = True
    checkpoint_hash: str | None = None
    cache_dir: str | Path | None = None
    cache_mode: str = "write"
    preprocessed_dir: str | Path | None = None
    preprocessed_max_bytes: int = DEFAULT_MAX_BYTES
    prefetch: bool = False
    quality: bool = False
    check_seg: bool = False

    @classmethod
    def resolve(cls, settings: EmbedSettings | None, options: Mapping[str, Any]) -> EmbedSettings:
        """``settings`` (default: all defaults) with ``options`` (field names) replaced.

        Raises:
            TypeError: an option that is not a field.
        """
        base = settings if settings is not None else cls()
        unknown = sorted(set(options) - set(cls.__dataclass_fields__))
        if unknown:
            raise TypeError(f"unknown embedding option(s): {', '.join(unknown)}")
        return dataclasses.replace(base, **options) if options else base


@dataclass
class CohortEmbedding:
    """Per-subject vectors of one cohort.

    Attributes:
        name: cohort name.
        subject_ids: one per subject, in cohort order.
        paths: each subject's folder (the common parent of its files).
        n_patches: ``(n,)`` evaluation patches encoded per subject.
        vectors: ``(n, F)`` float64, the vectors the statistics use (``features``).
        latent_means: ``(n, latent_dim)`` float64 mean patch latent (the seed's AAD vector;
            equal to ``vectors`` when ``features == "latent"``).
        features: name of the feature set of ``vectors``.
        regional: position-resolved latents for the regional map (``keep_positions=True``).
        fingerprints: ``(n, 28)`` raw-intensity fingerprints computed from the same decoded
            volumes (:func:`aad_med.data.intensity.fingerprint_row`), or ``None``.
        timings: seconds spent per phase (``decode``, ``fingerprint``, ``quality``,
            ``preprocessing``, ``cache_read``, ``cache_write``, ``forward``, ``features``,
            ``wait``, ``total``).
        quality: ``(n, 40)`` image-quality rows (:data:`aad_med.data.quality.QUALITY_COLUMNS`)
            computed from the same decoded volumes (``EmbedSettings.quality``), or ``None``.
        seg_checked: every subject's segmentation was decoded and its voxels checked.
    """

    name: str
    subject_ids: list[str]
    paths: list[str]
    n_patches: np.ndarray
    vectors: np.ndarray
    latent_means: np.ndarray
    features: str = "latent"
    regional: RegionalLatents | None = field(default=None, repr=False)
    fingerprints: np.ndarray | None = field(default=None, repr=False)
    timings: dict[str, float] = field(default_factory=dict, repr=False)
    quality: np.ndarray | None = field(default=None, repr=False)
    seg_checked: bool = False

    def __len__(self) -> int:
        return len(self.subject_ids)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])


@dataclass
class SubjectEncoding:
    """One subject encoded on its evaluation grid.

    Attributes:
        vector: ``(F,)`` float64, the feature set's vector.
        latent_mean: ``(latent_dim,)`` float64 mean patch latent.
        positions: ``(N, 3)`` int64 patch start corners in the preprocessed (cropped) volume.
        latents: ``(N, latent_dim)`` float32 patch latents (only with ``keep_latents``).
    """

    vector: np.ndarray
    latent_mean: np.ndarray
    positions: np.ndarray
    latents: np.ndarray | None = None

    @property
    def n_patches(self) -> int:
        return int(self.positions.shape[0])


def subject_folder(record: SubjectRecord) -> str:
    """The common parent folder of a subject's files."""
    return os.path.commonpath([str(Path(p).resolve().parent) for p in record.files])


def check_model_matches(model: torch.nn.Module, preprocessing: PreprocessingConfig) -> None:
    """Refuse a model whose input does not fit the preprocessing (patch size, channels).

    Raises:
        CheckpointError: the mismatch, named.
    """
    p = getattr(model, "patch_size", preprocessing.patch_size)
    if int(p) != int(preprocessing.patch_size):
        raise CheckpointError(
            f"model expects {p}-voxel patches but the preprocessing cuts "
            f"{preprocessing.patch_size}-voxel patches"
        )
    c = getattr(model, "in_channels", len(preprocessing.channels))
    if int(c) != len(preprocessing.channels):
        raise CheckpointError(
            f"model expects {c} input channels but the data have {len(preprocessing.channels)} "
            f"({', '.join(preprocessing.channels)})"
        )


def _full_precision(device: torch.device):
    """float32 convolutions on CUDA too: no bf16 autocast and no TF32. The vectors are cached,
    stored in references and compared with vectors encoded elsewhere, so a GPU must give the
    CPU's numbers: bf16 moved features by up to 18% of the between-subject SD (AAD 0.017 on the
    same subjects, measured with CPU bf16 autocast standing in), and the forward pass is ~2-6%
    of a subject's embedding time, so lower precision saves nearly nothing."""
    if device.type == "cuda":
        return torch.backends.cudnn.flags(
            enabled=torch.backends.cudnn.enabled,
            benchmark=torch.backends.cudnn.benchmark,
            deterministic=torch.backends.cudnn.deterministic,
            allow_tf32=False,
        )
    return contextlib.nullcontext()


def _ras_affine(affine: torch.Tensor, crop_start: Sequence[int]) -> np.ndarray:
    """Affine of the uncropped RAS volume from the cropped one: world = A_crop @ (v - start)."""
    a = np.asarray(torch.as_tensor(affine).cpu(), dtype=np.float64)
    shift = np.eye(4)
    shift[:3, 3] = -np.asarray(crop_start, dtype=np.float64)
    return a @ shift


def _encode(model: torch.nn.Module, patches: torch.Tensor, stages: bool):
    """``(model.encode(patches), stage activations or None)``. For the project's autoencoder
    the stages come from the same pass as the latent (``encode`` is the head over the last
    stage), so feature sets that read them (multiscale, texture) need no second encoder pass;
    the latent is bit-identical to ``model.encode``."""
    if stages and isinstance(model, ConvAutoencoder):
        feats = model.encode_features(patches)
        head = model.to_latent(torch.flatten(feats[-1], 1))
        return (head.chunk(2, dim=1)[0] if model.variational else head), feats
    return model.encode(patches), None


class _CannotEncode(ValueError):
    """``model.encode`` refused the patches (told apart from other ``ValueError``s)."""


def encode_subject(
    model: torch.nn.Module,
    item: Mapping[str, Any],
    preprocessing: PreprocessingConfig,
    device: str | torch.device,
    batch_size: int,
    feature_set: FeatureSet,
    keep_latents: bool = False,
    timings: dict[str, float] | None = None,
) -> SubjectEncoding:
    """Encode one preprocessed subject (keys of ``PREPROCESSED_KEYS``) on its evaluation grid.

    The grid is :func:`~aad_med.data.patches.eval_patch_positions` with the preprocessing's
    stride and minimum brain fraction; patches go through ``model.encode`` ``batch_size`` at a
    time (inference mode, float32 without TF32 on CUDA) and are reduced by ``feature_set``. The model
    must already be on ``device`` and in eval mode.

    Args:
        model: the autoencoder (``encode(x) -> (B, latent_dim)``).
        item: the preprocessed subject (``image``, ``brain``, ``crop_start``).
        preprocessing: the preprocessing the model was trained with.
        device: where the patches are cut and encoded (``"cpu"``, ``"cuda:0"``, ...).
        batch_size: patches per forward pass.
        feature_set: the reduction of the patch latents to the subject's vector.
        keep_latents: also return every patch latent (for the regional map).
        timings: when given, seconds are added under ``forward`` (``model.encode``) and
            ``features`` (grid, patch cutting and the feature set's reduction).

    Returns:
        The subject's :class:`SubjectEncoding`.

    Raises:
        ValueError: the model cannot encode these patches (callers name the subject).
    """
    device = torch.device(device)
    image = torch.as_tensor(item["image"]).as_subclass(torch.Tensor).to(device, non_blocking=True)
    crop_start = torch.as_tensor(np.asarray(item["crop_start"], dtype=np.int64))
    p = preprocessing.patch_size
    t_start = time.perf_counter()  # the grid counts under "features"
    positions = eval_positions(item, preprocessing, device)  # the cached grid when it has one
    acc = feature_set.accumulator()
    latent_acc = LatentMeanAccumulator()
    needs_stages = not isinstance(acc, LatentMeanAccumulator)
    latents = []
    forward = 0.0
    for chunk in positions.split(batch_size):
        patches = extract_patches(image, chunk, p)
        with torch.inference_mode(), _full_precision(device):
            t0 = time.perf_counter()
            try:
                z, stages = _encode(model, patches, needs_stages)
            except ValueError as e:
                raise _CannotEncode(str(e)) from None
            z = z.float().cpu()
            forward += time.perf_counter() - t0
            batch = PatchBatch(model, patches, z, chunk.cpu() + crop_start, stages)
            latent_acc.add(batch)
            if not isinstance(acc, LatentMeanAccumulator):
                acc.add(batch)
        if keep_latents:
            latents.append(batch.latents.numpy())
    mean = latent_acc.vector()
    vec = mean if isinstance(acc, LatentMeanAccumulator) else acc.vector()
    if timings is not None:
        timings["forward"] = timings.get("forward", 0.0) + forward
        features = time.perf_counter() - t_start - forward
        timings["features"] = timings.get("features", 0.0) + features
    return SubjectEncoding(
        vector=np.asarray(vec, dtype=np.float64),
        latent_mean=mean,
        positions=positions.cpu().numpy(),
        latents=np.concatenate(latents) if keep_latents else None,
    )


def preprocessed_cache(s: EmbedSettings) -> PreprocessedCache | None:
    """The preprocessed-subject cache of these settings (``None`` when off)."""
    if s.preprocessed_dir is None or s.cache_mode == "off":
        return None
    return PreprocessedCache(s.preprocessed_dir, s.cache_mode, s.preprocessed_max_bytes)


def _subject_iterator(
    records: Sequence[SubjectRecord],
    preprocessing: PreprocessingConfig,
    num_workers: int,
    cache: PreprocessedCache | None = None,
    prefetch: bool = False,
    quality: bool = False,
    check_seg: bool = False,
):
    dataset = PreprocessedSubjects(records, preprocessing, cache, quality, check_seg)
    if num_workers <= 0 and not prefetch:
        for i in range(len(dataset)):
            yield dataset[i]
        return
    if num_workers <= 0:
        # One thread prepares the next subject while this one is encoded: inflating, numpy and
        # the forward pass release the GIL, so decoding and encoding overlap even on 2 cores.
        # At most two subjects are in memory, whatever the cohort size.
        with ThreadPoolExecutor(1, thread_name_prefix="aad-prefetch") as pool:
            pending = pool.submit(dataset.__getitem__, 0) if len(dataset) else None
            for i in range(len(dataset)):
                item = pending.result()
                pending = pool.submit(dataset.__getitem__, i + 1) if i + 1 < len(dataset) else None
                yield item
        return
    # Workers preprocess the next subjects while the current one is encoded; batch size 1
    # keeps one subject per item so memory stays flat.
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=num_workers, prefetch_factor=2
    )
    yield from loader


def embed_cohort(
    model: torch.nn.Module,
    cohort: Cohort,
    preprocessing: PreprocessingConfig,
    settings: EmbedSettings | None = None,
    name: str | None = None,
    **options: Any,
) -> CohortEmbedding:
    """Encode every subject of ``cohort`` to one vector.

    Args:
        model: the autoencoder (``encode(x) -> (B, latent_dim)``); put in eval mode here.
        cohort: the validated cohort.
        preprocessing: the preprocessing the model was trained with (from its checkpoint).
        settings: device, batch size, features, positions, workers, progress
            (:class:`EmbedSettings`; the cache fields are not used here).
        name: cohort name (default: the cohort folder's name).
        **options: :class:`EmbedSettings` fields overriding ``settings`` (``features="latent"``).

    Returns:
        The cohort's :class:`CohortEmbedding` (raw feature vectors; joint standardisation, if
        the feature set has one, is applied by :func:`aad_med.embedding.cache.embed_cohorts`).

    Raises:
        CheckpointError: the model does not fit the preprocessing or the data.
        InputError: a subject's file cannot be read (named).
    """
    s = EmbedSettings.resolve(settings, options)
    device = resolve_device(s.device)
    feature_set = get_feature_set(s.features)
    batch_size, num_workers, progress = s.batch_size, s.num_workers, s.progress
    check_model_matches(model, preprocessing)
    model = model.to(device).eval()
    name = name or Path(cohort.path).name
    regional = (
        RegionalAccumulator(preprocessing.stride, preprocessing.patch_size)
        if s.keep_positions
        else None
    )
    ids, paths, n_patches, vectors, latent_means, fingerprints = [], [], [], [], [], []
    quality = []
    seg_checked = True
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    bar = tqdm(
        total=len(cohort.subjects),
        desc=f"encoding {name}",
        unit="subject",
        disable=None if progress else True,
        leave=False,
    )
    items = _subject_iterator(
        cohort.subjects,
        preprocessing,
        num_workers,
        preprocessed_cache(s),
        s.prefetch,
        s.quality,
        s.check_seg,
    )
    try:
        t_wait = time.perf_counter()
        for record, item in zip(cohort.subjects, items, strict=True):
            # Time the encoder waited for data (all of the data path without prefetching).
            timings["wait"] = timings.get("wait", 0.0) + time.perf_counter() - t_wait
            for phase, sec in item.pop("timings", {}).items():
                timings[phase] = timings.get(phase, 0.0) + float(sec)
            fingerprints.append(item.get("fingerprint"))
            quality.append(item.get("quality"))
            if item.get("mid_slices") is not None:
                # Kept with a cached (or a worker's) subject: report thumbnails read no file.
                MID_SLICES.restore(record, item.pop("mid_slices"))
            seg_checked = seg_checked and bool(item.get("seg_checked", False))
            try:
                enc = encode_subject(
                    model,
                    item,
                    preprocessing,
                    device,
                    batch_size,
                    feature_set,
                    keep_latents=regional is not None,
                    timings=timings,
                )
            except _CannotEncode as e:
                raise CheckpointError(
                    f"{subject_folder(record)}: model cannot encode these patches ({e})"
                ) from None
            if regional is not None:
                crop_start = np.asarray(item["crop_start"], dtype=np.int64)
                regional.add_subject(
                    enc.positions + crop_start,
                    enc.latents,
                    np.asarray(torch.as_tensor(item["image"]).cpu()),
                    crop_start,
                    tuple(item["ras_shape"]),
                    _ras_affine(item["affine"], crop_start),
                )
            ids.append(record.subject_id)
            paths.append(subject_folder(record))
            n_patches.append(enc.n_patches)
            vectors.append(enc.vector)
            latent_means.append(enc.latent_mean)
            bar.update(1)
            t_wait = time.perf_counter()
    finally:
        bar.close()
        items.close()
    seconds = time.perf_counter() - t0
    timings["total"] = seconds
    log.info(
        "encoded %d subjects of %s in %.1f s (%.2f subjects/s, %d patches)",
        len(ids),
        name,
        seconds,
        len(ids) / max(seconds, 1e-9),
        int(np.sum(n_patches)),
    )
    latent_dim = latent_means[0].shape[0] if latent_means else 0
    return CohortEmbedding(
        name=name,
        subject_ids=ids,
        paths=paths,
        n_patches=np.asarray(n_patches, dtype=np.int64),
        vectors=np.stack(vectors) if vectors else np.zeros((0, latent_dim)),
        latent_means=np.stack(latent_means) if latent_means else np.zeros((0, latent_dim)),
        features=feature_set.name,
        regional=regional.result(latent_dim) if regional is not None else None,
        fingerprints=(
            np.stack(fingerprints)
            if fingerprints and all(f is not None for f in fingerprints)
            else None
        ),
        timings=timings,
        quality=(
            np.stack(quality)
            if s.quality and quality and all(q is not None for q in quality)
            else None
        ),
        seg_checked=seg_checked and bool(ids),
    )
