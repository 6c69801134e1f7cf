"""Stage 4, embedding: feature sets that keep acquisition information (scanner, protocol).

The seed's ``latent`` vector (mean of patch latents) is dominated by anatomy and blind to most
scanner shifts: z-scoring removes global intensity, the bottleneck discards noise and texture.
The feature sets here look at what the encoder computes but the mean latent averages away:

* ``multiscale``: per-stage channel means and standard deviations of the encoder's activation
  maps, pooled over all voxels of all the subject's brain patches (texture, noise, sharpness);
* ``texture``: scale-free roughness (neighbour-difference energy over variance) of the input
  patches and of every encoder stage, which z-scoring and instance normalisation cannot remove;
* ``dispersion``: mean and standard deviation of the subject's patch latents (how much the
  patches differ from each other, which smooth bias fields and contrast changes alter);
* ``position_matched``: for co-registered cohorts, each patch latent is standardised against
  the other subjects' latents at the same grid position before pooling, so anatomy that varies
  with position cancels; the subject vector is the mean and the root-mean-square of its
  standardised latents;
* combinations (``latent+multiscale``, ``latent+multiscale+dispersion``): blocks concatenated,
  each standardised and weighted so every block counts equally whatever its size.

Every standardisation happens in :meth:`FeatureSet.finalize`: with a fixed reference (stored in
the checkpoint, :mod:`aad_med.embedding.standardize`) each subject is mapped on its own, so a
pair's numbers do not depend on the other cohorts of a call; without one it is fitted on all
compared subjects together. Either transform ignores the labels, so permutation p-values stay
exact.

:func:`aad_med.data.intensity.intensity_fingerprint` is not an encoder feature set: it reads the
raw images (stage 1, data) and is reported as its own statistic.

No statistics and no file writing here.

Size: every feature set here is an accumulator plus a finalize step sharing the joint
standardisation, kept together so a new set is read beside the sets it is combined with.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from aad_med.embedding.features import (
    FeatureSet,
    LatentFeatures,
    PatchBatch,
    SubjectAccumulator,
    get_feature_set,
    register_feature_set,
)
from aad_med.embedding.regional import add_to_cells

POSITION_EXTENT = 256
"""Edge (voxels) of the RAS volume the position lattice covers; BraTS volumes are 240x240x155."""

POSITION_MIN_FRACTION = 0.5
"""A grid cell is used when at least this fraction of the compared subjects has a patch there."""


def standardize_jointly(vectors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Z-score every column over all cohorts' subjects together (population standard deviation).

    Columns that are constant over all subjects become 0, so they add nothing to any distance.

    Args:
        vectors: ``{cohort: (n_k, F)}`` raw vectors.

    Returns:
        ``{cohort: (n_k, F)}`` float64, standardised with one mean and scale for all cohorts.
    """
    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in vectors.items()}
    if not arrays:
        return {}
    pooled = np.concatenate([a.reshape(a.shape[0], -1) for a in arrays.values()], axis=0)
    if pooled.shape[0] == 0:
        return arrays
    mean = pooled.mean(axis=0)
    sd = pooled.std(axis=0)
    tol = 1e-12 * (1.0 + np.abs(mean))
    keep = sd > tol
    scale = np.where(keep, sd, 1.0)
    return {k: np.where(keep, (a - mean) / scale, 0.0) for k, a in arrays.items()}


def _usable_reference(feature_set: FeatureSet, reference: Mapping | None) -> Mapping | None:
    """``reference`` (else the set's own) when it covers every block of ``feature_set``."""
    from aad_med.embedding.standardize import missing_blocks, supports_reference

    ref = reference if reference is not None else feature_set.reference
    if ref is None or not supports_reference(feature_set) or missing_blocks(feature_set, ref):
        return None
    return ref


class StandardizedFeatureSet(FeatureSet):
    """A feature set whose columns are standardised: with a fixed reference, subject by subject
    (:func:`aad_med.embedding.standardize.apply_block`); without, z-scored jointly over all
    compared subjects."""

    def finalize(
        self, vectors: Mapping[str, np.ndarray], reference: Mapping | None = None
    ) -> dict[str, np.ndarray]:
        from aad_med.embedding.standardize import apply_block

        ref = _usable_reference(self, reference)
        if ref is None:
            return standardize_jointly(vectors)
        block = ref["blocks"][self.name]
        return {k: apply_block(v, block, self.name) for k, v in vectors.items()}


# --------------------------------------------------------------------------------------------
# multiscale


class MultiscaleAccumulator(SubjectAccumulator):
    """Running per-stage channel sums of activations and squared activations (float64)."""

    def __init__(self):
        self.sums: list[np.ndarray] | None = None
        self.squares: list[np.ndarray] | None = None
        self.counts: list[int] | None = None

    def add(self, batch: PatchBatch) -> None:
        with torch.no_grad():
            stages = batch.stage_features()
        sums, squares, counts = [], [], []
        for h in stages:
            h = h.detach().to(torch.float64).cpu()
            dims = [0] + list(range(2, h.ndim))
            sums.append(h.sum(dim=dims).numpy())
            squares.append((h * h).sum(dim=dims).numpy())
            counts.append(int(h.numel() // h.shape[1]))
        if self.sums is None:
            self.sums, self.squares, self.counts = sums, squares, counts
            return
        for i in range(len(sums)):
            self.sums[i] += sums[i]
            self.squares[i] += squares[i]
            self.counts[i] += counts[i]

    def vector(self) -> np.ndarray:
        if self.sums is None:
            raise ValueError("no patches were added for this subject")
        parts = []
        for s, q, n in zip(self.sums, self.squares, self.counts, strict=True):
            mean = s / n
            var = np.clip(q / n - mean * mean, 0.0, None)
            parts.extend([mean, np.sqrt(var)])
        return np.concatenate(parts)


class MultiscaleFeatures(StandardizedFeatureSet):
    """Per-stage channel means and standard deviations of the encoder's activation maps."""

    name = "multiscale"
    description = (
        "per encoder stage, each channel's mean and standard deviation over all voxels of the "
        "subject's brain patches (sees noise, blur and texture), standardised (fixed reference "
        "scale from the checkpoint when it has one, else over all compared subjects)"
    )

    def accumulator(self) -> SubjectAccumulator:
        return MultiscaleAccumulator()


# --------------------------------------------------------------------------------------------
# texture


class TextureAccumulator(SubjectAccumulator):
    """Per channel of the input patches and of every encoder stage: neighbour-difference energy
    relative to the variance (sums over all voxels of all patches, float64)."""

    def __init__(self):
        self.stats: list[list[np.ndarray]] | None = None  # per map: [sum, sumsq, diff2, n, n_d]

    def add(self, batch: PatchBatch) -> None:
        with torch.no_grad():
            maps = [batch.patches, *batch.stage_features()]
        stats = []
        for h in maps:
            h = h.detach().to(torch.float64).cpu()
            dims = [0] + list(range(2, h.ndim))
            diff2 = sum(
                (torch.diff(h, dim=a) ** 2).sum(dim=dims) / max(1, h.shape[a] - 1) * h.shape[a]
                for a in range(2, h.ndim)
            ) / (h.ndim - 2)
            stats.append(
                [
                    h.sum(dim=dims).numpy(),
                    (h * h).sum(dim=dims).numpy(),
                    diff2.numpy(),
                    np.full(h.shape[1], h.numel() // h.shape[1], dtype=np.float64),
                ]
            )
        if self.stats is None:
            self.stats = stats
            return
        for mine, new in zip(self.stats, stats, strict=True):
            for i in range(4):
                mine[i] = mine[i] + new[i]

    def vector(self) -> np.ndarray:
        if self.stats is None:
            raise ValueError("no patches were added for this subject")
        parts = []
        for s, q, d2, n in self.stats:
            mean = s / n
            var = np.clip(q / n - mean * mean, 0.0, None)
            # Roughness is scale-free, so it survives z-scoring and instance normalisation.
            parts.append(np.where(var > 0, (d2 / n) / np.where(var > 0, var, 1.0), 0.0))
        return np.concatenate(parts)


class TextureFeatures(StandardizedFeatureSet):
    """Roughness (neighbour-difference energy / variance) of the input and every encoder stage."""

    name = "texture"
    description = (
        "per channel of the normalised input patches and of each encoder stage, mean squared "
        "difference between neighbouring voxels divided by the variance (scale-free roughness: "
        "sees noise and blur), standardised (fixed reference scale from the "
        "checkpoint when it has one, else over all compared subjects)"
    )

    def accumulator(self) -> SubjectAccumulator:
        return TextureAccumulator()


# --------------------------------------------------------------------------------------------
# dispersion


class DispersionAccumulator(SubjectAccumulator):
    """Running sums of patch latents and their squares (float64)."""

    def __init__(self):
        self.total: np.ndarray | None = None
        self.squares: np.ndarray | None = None
        self.count = 0

    def add(self, batch: PatchBatch) -> None:
        z = batch.latents.detach().to(torch.float64).cpu().numpy()
        s, q = z.sum(axis=0), (z * z).sum(axis=0)
        if self.total is None:
            self.total, self.squares = s, q
        else:
            self.total, self.squares = self.total + s, self.squares + q
        self.count += z.shape[0]

    def vector(self) -> np.ndarray:
        if self.total is None or self.count == 0:
            raise ValueError("no patches were added for this subject")
        mean = self.total / self.count
        var = np.clip(self.squares / self.count - mean * mean, 0.0, None)
        return np.concatenate([mean, np.sqrt(var)])


class DispersionFeatures(StandardizedFeatureSet):
    """Mean and spread (standard deviation over patches) of the subject's patch latents."""

    name = "dispersion"
    description = (
        "mean and standard deviation over the subject's patches of each latent dimension, "
        "standardised (fixed reference scale from the "
        "checkpoint when it has one, else over all compared subjects)"
    )

    def accumulator(self) -> SubjectAccumulator:
        return DispersionAccumulator()


# --------------------------------------------------------------------------------------------
# position_matched


class PositionAccumulator(SubjectAccumulator):
    """Mean patch latent per cell of a fixed lattice of the RAS volume.

    The lattice's cell edge is the patch edge; a patch belongs to the cell of its centre, so
    subjects of a co-registered cohort share cells even when their brain crops differ.
    """

    def __init__(self, extent: int = POSITION_EXTENT):
        self.extent = int(extent)
        self.sums: dict[tuple[int, int, int], np.ndarray] = {}
        self.counts: dict[tuple[int, int, int], int] = {}
        self.patch_size: int | None = None
        self.latent_dim: int | None = None

    def add(self, batch: PatchBatch) -> None:
        p = int(batch.patches.shape[-1])
        self.patch_size = p
        z = batch.latents.detach().to(torch.float64).cpu().numpy()
        self.latent_dim = z.shape[1]
        cells = (batch.positions.cpu().numpy().astype(np.int64) + p // 2) // p
        n_cells = math.ceil(self.extent / p)
        if cells.size and (cells.min() < 0 or cells.max() >= n_cells):
            raise ValueError(
                f"patch centre outside the {self.extent}-voxel position lattice; positions must "
                "lie in the RAS volume"
            )
        add_to_cells(self.sums, self.counts, cells, z)

    def vector(self) -> np.ndarray:
        """``[cells_per_axis, latent_dim, present (G³), latents (G³·D)]`` (dense lattice)."""
        if not self.sums:
            raise ValueError("no patches were added for this subject")
        g = math.ceil(self.extent / self.patch_size)
        d = int(self.latent_dim)
        present = np.zeros(g**3)
        lat = np.zeros((g**3, d))
        for (i, j, k), s in self.sums.items():
            idx = (i * g + j) * g + k
            present[idx] = 1.0
            lat[idx] = s / self.counts[(i, j, k)]
        return np.concatenate([[float(g), float(d)], present, lat.ravel()])


def _unpack_positions(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(n, 2 + G³ + G³D)`` raw rows -> present ``(n, G³)`` and latents ``(n, G³, D)``."""
    if raw.shape[0] == 0:
        return np.zeros((0, 0)), np.zeros((0, 0, 0))
    g, d = int(raw[0, 0]), int(raw[0, 1])
    if np.any(raw[:, 0] != g) or np.any(raw[:, 1] != d):
        raise ValueError("position_matched vectors of different lattices cannot be compared")
    k = g**3
    present = raw[:, 2 : 2 + k] > 0.5
    lat = raw[:, 2 + k :].reshape(raw.shape[0], k, d)
    return present, lat


class PositionMatchedFeatures(FeatureSet):
    """Latents standardised per grid position over all compared subjects, then pooled.

    For co-registered cohorts (same RAS space): a cell is used when at least
    ``min_fraction`` of the subjects have a patch there; each latent dimension is z-scored over
    those subjects; a subject's vector is the mean and the root-mean-square of its standardised
    cell latents, then z-scored over all subjects.
    """

    name = "position_matched"
    description = (
        "patch latents standardised per grid position over all compared subjects (anatomy that "
        "varies with position cancels), pooled as mean and root-mean-square; for co-registered "
        "cohorts"
    )

    def __init__(self, extent: int = POSITION_EXTENT, min_fraction: float = POSITION_MIN_FRACTION):
        self.extent = int(extent)
        self.min_fraction = float(min_fraction)

    def accumulator(self) -> SubjectAccumulator:
        return PositionAccumulator(self.extent)

    def finalize(
        self, vectors: Mapping[str, np.ndarray], reference: Mapping | None = None
    ) -> dict[str, np.ndarray]:
        # Per-position statistics of the compared subjects: no fixed reference (the reference
        # is ignored; the pipeline records the pooled scale).
        names = list(vectors)
        raws = [np.asarray(vectors[k], dtype=np.float64) for k in names]
        sizes = [r.shape[0] for r in raws]
        present, lat = _unpack_positions(np.concatenate(raws, axis=0))
        n = present.shape[0]
        if n == 0:
            return {k: np.zeros((0, 0)) for k in names}
        m = present.astype(np.float64)
        cnt = m.sum(axis=0)
        used = (cnt >= max(2.0, self.min_fraction * n)).astype(np.float64)
        safe = np.maximum(cnt, 1.0)[:, None]
        mean = (lat * m[:, :, None]).sum(axis=0) / safe
        var = (((lat - mean) ** 2) * m[:, :, None]).sum(axis=0) / safe
        sd = np.sqrt(var)
        ok = sd > 1e-12 * (1.0 + np.abs(mean))
        z = np.where(ok, (lat - mean) / np.where(ok, sd, 1.0), 0.0)
        w = (m * used)[:, :, None]
        n_cells = np.maximum(w.sum(axis=1), 1.0)
        pooled_mean = (z * w).sum(axis=1) / n_cells
        pooled_rms = np.sqrt((z * z * w).sum(axis=1) / n_cells)
        out = np.concatenate([pooled_mean, pooled_rms], axis=1)
        split = np.split(out, np.cumsum(sizes)[:-1])
        return standardize_jointly(dict(zip(names, split, strict=True)))


# --------------------------------------------------------------------------------------------
# combinations


class ConcatAccumulator(SubjectAccumulator):
    """Runs several accumulators on the same batches; the vector starts with the part sizes."""

    def __init__(self, parts: Sequence[SubjectAccumulator]):
        self.parts = list(parts)

    def add(self, batch: PatchBatch) -> None:
        for acc in self.parts:
            acc.add(batch)

    def vector(self) -> np.ndarray:
        vecs = [np.asarray(acc.vector(), dtype=np.float64).ravel() for acc in self.parts]
        return np.concatenate([[float(v.size) for v in vecs], *vecs])


class ConcatFeatureSet(FeatureSet):
    """Several feature sets side by side, each finalised on its own block, blocks weighted equally.

    The raw vector is ``[size_1, ..., size_k, raw_1, ..., raw_k]`` so the blocks can be split
    again after caching. In :meth:`finalize` each block goes through its own feature set's
    ``finalize``; non-standardising parts (``latent``) are z-scored jointly too; every block is
    then divided by the square root of its width so each contributes equally to a distance.
    """

    def __init__(self, parts: Sequence[str | FeatureSet], name: str | None = None):
        self.parts = [get_feature_set(p) for p in parts]
        if not self.parts:
            raise ValueError("a combined feature set needs at least one part")
        self.name = name or "+".join(p.name for p in self.parts)
        self.description = (
            "; ".join(f"{p.name}: {p.description}" for p in self.parts)
            + " (each block standardised, blocks weighted equally)"
        )

    def accumulator(self) -> SubjectAccumulator:
        return ConcatAccumulator([p.accumulator() for p in self.parts])

    def assemble(self, blocks: Mapping[str, np.ndarray]) -> np.ndarray:
        """Raw ``(n, F)`` vectors of this set from the parts' raw ``(n, F_i)`` vectors by name."""
        arrays = [np.asarray(blocks[p.name], dtype=np.float64) for p in self.parts]
        n = arrays[0].shape[0]
        header = np.tile([float(a.shape[1]) for a in arrays], (n, 1))
        return np.concatenate([header, *arrays], axis=1)

    def split(self, raw: np.ndarray) -> list[np.ndarray]:
        """The parts' raw blocks of ``(n, F)`` raw vectors."""
        raw = np.asarray(raw, dtype=np.float64)
        k = len(self.parts)
        if raw.shape[0] == 0:
            return [np.zeros((0, 0)) for _ in self.parts]
        sizes = raw[0, :k].astype(np.int64)
        if np.any(raw[:, :k] != raw[0, :k]) or raw.shape[1] != k + int(sizes.sum()):
            raise ValueError(f"{self.name}: raw vectors of different layouts cannot be compared")
        return np.split(raw[:, k:], np.cumsum(sizes)[:-1], axis=1)

    def finalize(
        self, vectors: Mapping[str, np.ndarray], reference: Mapping | None = None
    ) -> dict[str, np.ndarray]:
        from aad_med.embedding.standardize import apply_block

        ref = _usable_reference(self, reference)
        names = list(vectors)
        blocks = {k: self.split(vectors[k]) for k in names}
        widths = {tuple(b.shape[1] for b in blocks[k]) for k in names if len(vectors[k])}
        if len(widths) > 1:
            raise ValueError(f"{self.name}: raw vectors of different layouts cannot be compared")
        finals: list[dict[str, np.ndarray]] = []
        for i, part in enumerate(self.parts):
            if ref is not None:
                block = ref["blocks"][part.name]
                per = {k: apply_block(blocks[k][i], block, part.name) for k in names}
            else:
                per = part.finalize({k: blocks[k][i] for k in names})
                if not isinstance(part, StandardizedFeatureSet | PositionMatchedFeatures):
                    per = standardize_jointly(per)
            width = max(1, next(iter(per.values())).shape[1])
            finals.append({k: v / math.sqrt(width) for k, v in per.items()})
        return {k: np.concatenate([f[k] for f in finals], axis=1) for k in names}


COMBINATIONS: tuple[tuple[str, ...], ...] = (
    ("latent", "multiscale"),
    ("latent", "multiscale", "dispersion"),
    ("multiscale", "texture"),
    ("latent", "multiscale", "texture"),
    ("latent", "multiscale", "texture", "dispersion"),
)

register_feature_set("multiscale", MultiscaleFeatures)
register_feature_set("dispersion", DispersionFeatures)
register_feature_set("texture", TextureFeatures)
register_feature_set("position_matched", PositionMatchedFeatures)
for _parts in COMBINATIONS:
    register_feature_set("+".join(_parts), lambda parts=_parts: ConcatFeatureSet(parts))

__all__ = [
    "COMBINATIONS",
    "ConcatFeatureSet",
    "DispersionFeatures",
    "LatentFeatures",
    "MultiscaleFeatures",
    "PositionMatchedFeatures",
    "TextureFeatures",
    "standardize_jointly",
]
