"""A reference cohort fitted once (``aad-reference fit``) and read back by ``aad-compare
reference=REF``: the body of ``aad-reference fit``, the reference file's reader and its checks.

The file is a pair: ``REF.json`` (format, format version, aad-med version, checkpoint SHA-256,
preprocessing, feature-set name and block widths, subject IDs, cohort information, IQM column
names, atypicality settings, and the SHA-256 of ``REF.npz`` and of each array in it) and
``REF.npz`` (no object arrays, read with ``allow_pickle=False``): the raw (unstandardised)
float64 feature vectors, mean patch latents, patch counts, raw intensity fingerprint and IQMs.

Raw vectors, not standardised ones, are stored because every standardisation of aad-compare is
fitted jointly on all compared subjects: a later comparison re-standardises the stored vectors
together with each new cohort's, which gives the same numbers as encoding both cohorts (the
encoding of one subject does not depend on the others).

This module writes only the reference file pair; it computes no statistic.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from aad_med import DEFAULT_FEATURES
from aad_med.errors import CheckpointError, ConfigError, InputError

log = logging.getLogger("aad_med.reference")

REFERENCE_FORMAT = "aad-med-reference"
REFERENCE_FORMAT_VERSION = 1
ARRAYS = ("vectors", "latent_means", "n_patches", "fingerprint", "quality")
"""Arrays of ``REF.npz``, one row per reference subject."""


def reference_paths(ref: str | Path) -> tuple[Path, Path]:
    """``(REF.json, REF.npz)`` of a reference given as ``REF``, ``REF.json`` or ``REF.npz``."""
    p = Path(ref)
    base = p.with_suffix("") if p.suffix.lower() in (".json", ".npz") else p
    return base.with_name(base.name + ".json"), base.with_name(base.name + ".npz")


def _sha(a: np.ndarray) -> str:
    a = np.ascontiguousarray(a)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
    return h.hexdigest()


def raw_feature_set(inner):
    """A feature set that encodes like ``inner`` but leaves ``finalize`` to the caller
    (:class:`aad_med.embedding.features.RawFeatures`)."""
    from aad_med.embedding.features import RawFeatures

    return RawFeatures(inner)


def embed_raw(model, cohorts, preprocessing, embed):
    """:func:`~aad_med.embedding.cache.embed_cohorts` without the final standardisation:
    ``{name: CohortEmbedding}`` whose ``vectors`` are raw (same cache entries)."""
    import dataclasses

    from aad_med.embedding.cache import embed_cohorts
    from aad_med.embedding.features import get_feature_set

    fs = get_feature_set(embed.features)
    return embed_cohorts(
        model, cohorts, preprocessing, dataclasses.replace(embed, features=raw_feature_set(fs))
    )


@dataclass
class Reference:
    """A loaded, verified reference file pair."""

    path: Path
    name: str
    meta: dict
    arrays: dict[str, np.ndarray] = field(repr=False)

    @property
    def subject_ids(self) -> list[str]:
        return list(self.meta["subject_ids"])

    def embedding(self):
        """The reference as a :class:`~aad_med.embedding.encode.CohortEmbedding` with raw
        vectors (no positions: no regional map against a stored reference)."""
        from aad_med.embedding.encode import CohortEmbedding

        return CohortEmbedding(
            name=self.name,
            subject_ids=self.subject_ids,
            paths=list(self.meta.get("subject_paths", [""] * len(self.subject_ids))),
            n_patches=self.arrays["n_patches"].astype(np.int64),
            vectors=self.arrays["vectors"].copy(),
            latent_means=self.arrays["latent_means"].copy(),
            features=self.meta["features"],
        )

    def cohort_info(self) -> dict:
        """The ``distances.json`` cohort entry fields known from the fit."""
        c = self.meta["cohort"]
        return {
            "path": c["path"],
            "layout": c["layout"],
            "train_overlap": int(c.get("train_overlap", 0)),
            "skipped": list(c.get("skipped", [])),
            "reference_file": str(self.path),
        }

    def check_checkpoint(self, checkpoint_sha256: str, checkpoint: Path) -> None:
        """Raise :class:`CheckpointError` naming the reference file when fitted with another
        checkpoint."""
        if self.meta["checkpoint_sha256"] != checkpoint_sha256:
            raise CheckpointError(
                f"{self.path}: reference fitted with another checkpoint (SHA-256 "
                f"{self.meta['checkpoint_sha256'][:12]}…, {checkpoint} is "
                f"{checkpoint_sha256[:12]}…); fit it again with aad-reference fit"
            )

    def check_preprocessing(self, preprocessing: Mapping) -> None:
        """Raise :class:`InputError` when the checkpoint's preprocessing differs from the fit's."""
        stored = json.loads(json.dumps(self.meta["preprocessing"]))
        given = json.loads(json.dumps(dict(preprocessing)))
        if stored != given:
            diff = sorted(k for k in set(stored) | set(given) if stored.get(k) != given.get(k))
            raise InputError(
                self.path,
                f"reference fitted with other preprocessing ({', '.join(diff)} differ from the "
                "checkpoint's); fit it again with aad-reference fit",
            )

    def check_features(self, features: str) -> None:
        if self.meta["features"] != str(features):
            raise ConfigError(
                f"{self.path}: reference fitted with features {self.meta['features']!r}, "
                f"the comparison uses {features!r}; set embedding.features="
                f"{self.meta['features']}"
            )


def meta_sha256(meta: Mapping) -> str:
    """SHA-256 of the JSON content (sorted keys, without ``meta_sha256`` itself): an edited
    ``REF.json`` (another checkpoint hash, preprocessing, subject list) is detected."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _major(version: str) -> str:
    return str(version).split(".")[0]


def load_reference(ref: str | Path) -> Reference:
    """Read and verify a reference file pair.

    Raises:
        InputError: one line naming the file: missing, truncated or not JSON, not a reference,
            another format version or aad-med major version, an ``.npz`` whose SHA-256 (or an
            array's) differs from the one recorded (modified or truncated), or arrays of the
            wrong shape.
    """
    from aad_med import __version__

    json_path, npz_path = reference_paths(ref)
    if not json_path.is_file():
        raise InputError(
            json_path, "reference file does not exist (write it with aad-reference fit)"
        )
    try:
        meta = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(
            json_path, f"not a readable reference file (truncated or not JSON: {e})"
        ) from None
    if not isinstance(meta, dict) or meta.get("format") != REFERENCE_FORMAT:
        raise InputError(
            json_path, f"not an aad-med reference file (format is not {REFERENCE_FORMAT!r})"
        )
    if meta.get("format_version") != REFERENCE_FORMAT_VERSION:
        raise InputError(
            json_path,
            f"reference format version {meta.get('format_version')!r}; this aad-med "
            f"{__version__} reads version {REFERENCE_FORMAT_VERSION} (fit it again)",
        )
    if _major(meta.get("aad_med_version", "")) != _major(__version__):
        raise InputError(
            json_path,
            f"reference written by aad-med {meta.get('aad_med_version')!r}, another major "
            f"version than this {__version__} (fit it again)",
        )
    needed = ("checkpoint_sha256", "preprocessing", "features", "subject_ids", "npz_sha256")
    missing = [k for k in (*needed, "arrays_sha256", "cohort", "name") if k not in meta]
    if missing:
        raise InputError(json_path, f"reference file lacks {', '.join(missing)}")
    if meta.get("meta_sha256") != meta_sha256(meta):
        raise InputError(
            json_path,
            "content differs from its recorded SHA-256 (edited after aad-reference fit); fit "
            "the reference again",
        )
    if not npz_path.is_file():
        raise InputError(npz_path, f"reference arrays missing (written next to {json_path.name})")
    payload = npz_path.read_bytes()
    if hashlib.sha256(payload).hexdigest() != meta["npz_sha256"]:
        raise InputError(
            npz_path,
            f"SHA-256 differs from the one in {json_path.name} (modified or truncated); fit the "
            "reference again",
        )
    try:
        with np.load(io.BytesIO(payload), allow_pickle=False) as npz:
            arrays = {k: np.asarray(npz[k]) for k in ARRAYS}
    except (OSError, ValueError, KeyError, EOFError) as e:
        raise InputError(npz_path, f"not readable reference arrays ({e})") from None
    n = len(meta["subject_ids"])
    for k, a in arrays.items():
        if _sha(a) != meta["arrays_sha256"].get(k):
            raise InputError(npz_path, f"array {k!r} differs from the SHA-256 in {json_path.name}")
        if a.shape[0] != n:
            raise InputError(npz_path, f"array {k!r} has {a.shape[0]} rows for {n} subjects")
    return Reference(json_path, str(meta["name"]), meta, arrays)


@dataclass
class ReferenceSettings:
    """Options of ``aad-reference fit`` (embedding options as ``aad-compare``'s)."""

    name: str = "reference"
    features: str = DEFAULT_FEATURES
    device: str = "auto"
    batch_size: int = 32
    num_workers: int = 0
    cache: bool = True
    cache_dir: str | Path | None = None
    skip_invalid: bool = False
    progress: bool = True
    method: str = "knn"
    k: int = 5
    tail: str | None = "lognormal"
    overwrite: bool = False


def fit_reference(
    checkpoint: str | Path,
    cohort_path: str | Path,
    out: str | Path,
    settings: ReferenceSettings | None = None,
) -> Reference:
    """Encode a reference cohort once and write ``REF.json`` + ``REF.npz``.

    Raises:
        ConfigError: ``out`` exists (without ``overwrite``) or the name is not a cohort name.
        CohortError, CheckpointError, InputError: one line per problem; nothing is written.
    """
    from aad_med import __version__
    from aad_med.io_utils import file_digest, to_jsonable, write_bytes_atomic, write_json_atomic
    from aad_med.pipelines.compare import (
        CompareSettings,
        check_cohort_names,
        load_cohorts,
        train_overlap,
    )

    s = settings or ReferenceSettings()
    json_path, npz_path = reference_paths(out)
    if not s.overwrite:
        for p in (json_path, npz_path):
            if p.exists():
                raise ConfigError(f"{p}: already exists; choose another out= or set overwrite=true")
    check_cohort_names([s.name, "new"])
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise CheckpointError(f"{checkpoint}: checkpoint does not exist")
    cohort = load_cohorts({s.name: cohort_path}, s.skip_invalid)[s.name]

    from aad_med.data.intensity import cached_fingerprint
    from aad_med.device import resolve_device
    from aad_med.embedding.encode import EmbedSettings
    from aad_med.embedding.features import get_feature_set
    from aad_med.pipelines.subjects import final_blocks, subject_quality_table
    from aad_med.training.checkpoint import load_model_from_checkpoint

    device = resolve_device(s.device)
    model, preprocessing, ckpt = load_model_from_checkpoint(checkpoint, device)
    cs = CompareSettings(cache=s.cache, cache_dir=s.cache_dir)
    cache_dir = cs.resolved_cache_dir()
    sha = file_digest(checkpoint)
    fs = get_feature_set(s.features)
    embed = EmbedSettings(
        device=device,
        batch_size=s.batch_size,
        features=fs,
        keep_positions=False,
        num_workers=s.num_workers,
        progress=s.progress,
        checkpoint_hash=sha if cache_dir else None,
        cache_dir=cache_dir,
    )
    emb = embed_raw(model, {s.name: cohort}, preprocessing, embed)[s.name]
    q_columns, quality = subject_quality_table(cohort.subjects)
    arrays = {
        "vectors": np.asarray(emb.vectors, dtype=np.float64),
        "latent_means": np.asarray(emb.latent_means, dtype=np.float64),
        "n_patches": np.asarray(emb.n_patches, dtype=np.int64),
        "fingerprint": np.asarray(cached_fingerprint(cohort, cache_dir), dtype=np.float64),
        "quality": np.asarray(quality, dtype=np.float64),
    }
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    payload = buf.getvalue()
    from aad_med.data.intensity import fingerprint_columns

    meta = {
        "format": REFERENCE_FORMAT,
        "format_version": REFERENCE_FORMAT_VERSION,
        "aad_med_version": __version__,
        "name": s.name,
        "checkpoint": str(checkpoint.resolve()),
        "checkpoint_sha256": sha,
        "preprocessing": preprocessing.to_dict(),
        "features": fs.name,
        "feature_blocks": final_blocks(fs, {s.name: arrays["vectors"]}),
        "subject_ids": list(emb.subject_ids),
        "subject_paths": list(emb.paths),
        "cohort": {
            "path": str(Path(cohort_path).resolve()),
            "layout": cohort.layout,
            "n_subjects": len(cohort.subjects),
            "train_overlap": train_overlap(cohort, ckpt),
            "skipped": list(cohort.skipped),
        },
        "fingerprint_columns": fingerprint_columns(),
        "quality_columns": q_columns,
        "atypicality": {"method": s.method, "k": s.k, "tail": s.tail},
        "npz_sha256": hashlib.sha256(payload).hexdigest(),
        "arrays_sha256": {k: _sha(a) for k, a in arrays.items()},
    }
    meta = json.loads(json.dumps(to_jsonable(meta), allow_nan=False))
    meta["meta_sha256"] = meta_sha256(meta)
    write_bytes_atomic(npz_path, payload)
    try:
        write_json_atomic(json_path, meta)
    except BaseException:
        npz_path.unlink(missing_ok=True)
        raise
    return Reference(json_path, s.name, meta, arrays)
