"""Segmentation stage: BraTS tumour regions from label maps.

The BraTS challenge scores three nested regions rather than the raw labels: the whole tumour
(WT, every tumour label), the tumour core (TC, the tumour without oedema) and the enhancing
tumour (ET). Which labels make up each region depends on the label convention of the release:
BraTS 2012-2021 use 1 necrosis, 2 oedema, 4 enhancing (BraTS 2023 uses 3 for enhancing); the
Medical Segmentation Decathlon uses 1 oedema, 2 non-enhancing core, 3 enhancing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from aad_med.errors import ConfigError

REGIONS: tuple[str, ...] = ("WT", "TC", "ET")
"""The BraTS evaluation regions, in the order of the segmenter's output channels."""

CONVENTIONS: dict[str, dict[str, tuple[int, ...]]] = {
    "brats": {"WT": (1, 2, 3, 4), "TC": (1, 3, 4), "ET": (3, 4)},
    "msd": {"WT": (1, 2, 3), "TC": (2, 3), "ET": (3,)},
}
"""Labels of each region per label convention (``brats``: BraTS 2012-2023; ``msd``: Decathlon)."""


def convention_for_layout(layout: str) -> str:
    """The label convention of a cohort layout (``msd`` for the Decathlon, else ``brats``)."""
    return "msd" if str(layout) == "msd" else "brats"


def resolve_regions(regions: Sequence[str] | str) -> tuple[str, ...]:
    """Check a region list (``"all"`` means WT, TC, ET; ``"WT"`` alone is fine).

    Raises:
        ConfigError: an unknown or repeated region, or an empty list.
    """
    if isinstance(regions, str):
        regions = REGIONS if regions.lower() == "all" else [regions]
    out = tuple(str(r).upper() for r in regions)
    unknown = [r for r in out if r not in REGIONS]
    if not out or unknown or len(set(out)) != len(out):
        raise ConfigError(
            f"segmenter.regions must be distinct names from {list(REGIONS)} (or 'all'), "
            f"got {list(regions)}"
        )
    return out


def region_masks(
    seg: torch.Tensor, regions: Sequence[str] = REGIONS, convention: str = "brats"
) -> torch.Tensor:
    """Binary masks of ``regions``, one channel each.

    Args:
        seg: label map ``(B, 1, X, Y, Z)`` or ``(1, X, Y, Z)`` (integer labels).
        regions: region names from :data:`REGIONS`.
        convention: ``"brats"`` or ``"msd"`` (see :data:`CONVENTIONS`).

    Returns:
        float32 masks with the channel axis replaced by ``len(regions)`` channels.

    Raises:
        ConfigError: unknown convention or region.
    """
    if convention not in CONVENTIONS:
        raise ConfigError(
            f"unknown label convention {convention!r}; use one of {list(CONVENTIONS)}"
        )
    table = CONVENTIONS[convention]
    labels = seg.long()
    masks = []
    for r in resolve_regions(list(regions)):
        m = torch.zeros_like(labels, dtype=torch.bool)
        for value in table[r]:
            m |= labels == value
        masks.append(m)
    return torch.cat(masks, dim=-4).to(torch.float32)
