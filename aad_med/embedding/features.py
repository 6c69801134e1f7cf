"""Feature sets: how a subject's patch batches become the vector the statistics compare.

``latent`` is the seed's definition: the mean of the subject's patch latents, every patch
weighted equally within a subject (subjects are weighted equally in the statistics). The default
of every API and command is :data:`aad_med.DEFAULT_FEATURES` (``multiscale+texture``, from
:mod:`aad_med.embedding.acquisition`). Other feature sets (multi-scale encoder statistics, latent
dispersion, position-matched pooling, ...) plug in with :func:`register_feature_set`: a class whose
instances accumulate one subject streamed in batches, plus an optional standardisation in
:meth:`FeatureSet.finalize`: a fixed per-subject affine map from a stored reference
(:mod:`aad_med.embedding.standardize`), or, without one, a joint standardisation fitted on all
compared subjects. Both leave permutation p-values exact.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from aad_med.errors import ConfigError


@dataclass
class PatchBatch:
    """One batch of a subject's evaluation patches, as a feature set sees it.

    Attributes:
        model: the autoencoder (eval mode).
        patches: ``(B, C, p, p, p)`` on the encoding device.
        latents: ``(B, latent_dim)`` float32 on the CPU (already computed).
        positions: ``(B, 3)`` int64 patch corners in the RAS (uncropped) volume.
    """

    model: torch.nn.Module
    patches: torch.Tensor
    latents: torch.Tensor
    positions: torch.Tensor
    _stage_cache: list[torch.Tensor] | None = field(default=None, repr=False)

    def stage_features(self) -> list[torch.Tensor]:
        """Encoder stage activations of the batch (computed once, on first request)."""
        if self._stage_cache is None:
            self._stage_cache = self.model.encode_features(self.patches)
        return self._stage_cache


class SubjectAccumulator:
    """Streams one subject's batches into its feature vector (subclass per feature set)."""

    def add(self, batch: PatchBatch) -> None:
        raise RuntimeError(f"{type(self).__name__} must implement add()")

    def vector(self) -> np.ndarray:
        raise RuntimeError(f"{type(self).__name__} must implement vector()")


class LatentMeanAccumulator(SubjectAccumulator):
    """Mean of the subject's patch latents, summed in float64."""

    def __init__(self):
        self.total: np.ndarray | None = None
        self.count = 0

    def add(self, batch: PatchBatch) -> None:
        z = batch.latents.detach().to(torch.float64).cpu().numpy()
        s = z.sum(axis=0)
        self.total = s if self.total is None else self.total + s
        self.count += z.shape[0]

    def vector(self) -> np.ndarray:
        if self.total is None or self.count == 0:
            raise ValueError("no patches were added for this subject")
        return self.total / self.count


class FeatureSet:
    """A named way of turning a subject into a vector.

    Subclasses override :meth:`accumulator` and, when features on different scales must be put
    on one footing, :meth:`finalize` (a fixed reference, else fitted on all compared subjects at once).
    """

    name = "base"
    description = ""
    #: Fixed scale (:mod:`aad_med.embedding.standardize`) used by :meth:`finalize` when none is
    #: passed; set on an instance by the command that loaded it from a checkpoint.
    reference: dict | None = None

    def accumulator(self) -> SubjectAccumulator:
        raise RuntimeError(f"{type(self).__name__} must implement accumulator()")

    def finalize(
        self, vectors: Mapping[str, np.ndarray], reference: Mapping | None = None
    ) -> dict[str, np.ndarray]:
        """Transform of all cohorts' raw vectors; identity by default.

        Args:
            vectors: ``{cohort: (n_k, F)}`` raw vectors.
            reference: a fixed scale (``checkpoint["feature_reference"]``); ``None`` uses
                :attr:`reference`, and without either, sets that standardise fit on all
                ``vectors`` together.
        """
        return {k: np.asarray(v, dtype=np.float64) for k, v in vectors.items()}


class RawFeatures(FeatureSet):
    """``inner``'s features with ``finalize`` left to the caller: the raw vectors survive
    :func:`aad_med.embedding.cache.embed_cohorts` (same cache entries: the name is ``inner``'s),
    so a stored reference's raw vectors can join before the standardisation. Module-level, so
    torchrun can send it to the other ranks."""

    def __init__(self, inner: FeatureSet):
        self.inner = inner
        self.name = inner.name
        self.description = inner.description

    def accumulator(self):
        return self.inner.accumulator()

    def finalize(
        self, vectors: Mapping[str, np.ndarray], reference: Mapping | None = None
    ) -> dict[str, np.ndarray]:
        return {k: np.asarray(v, dtype=np.float64) for k, v in vectors.items()}


class LatentFeatures(FeatureSet):
    """The seed's AAD embedding: each subject's vector is the mean of its patch latents."""

    name = "latent"
    description = "mean of the subject's patch latent vectors (the seed's definition of AAD)"

    def accumulator(self) -> SubjectAccumulator:
        return LatentMeanAccumulator()


_REGISTRY: dict[str, Callable[[], FeatureSet]] = {"latent": LatentFeatures}


def register_feature_set(name: str, factory: Callable[[], FeatureSet]) -> None:
    """Make ``embedding.features=name`` available (``factory()`` returns a :class:`FeatureSet`)."""
    _REGISTRY[str(name)] = factory


def available_feature_sets() -> list[str]:
    """Names accepted by :func:`get_feature_set`."""
    return sorted(_REGISTRY)


def get_feature_set(name: str | FeatureSet) -> FeatureSet:
    """The feature set called ``name`` (a :class:`FeatureSet` instance passes through).

    Raises:
        ConfigError: unknown name (the message lists the known ones).
    """
    if isinstance(name, FeatureSet):
        return name
    if name not in _REGISTRY:
        raise ConfigError(
            f"unknown embedding.features {name!r}; choose one of {available_feature_sets()}"
        )
    return _REGISTRY[name]()
