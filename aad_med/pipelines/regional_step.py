"""A step of ``aad-compare``: the regional AAD map, the AAD position by position on the patch
grid (:func:`aad_med.embedding.regional.regional_aad_map`), drawn and written as NIfTI when all
cohorts share one image space. The caller orders the steps (:mod:`aad_med.pipelines.compare`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from aad_med.report.serialize import write_nifti

if TYPE_CHECKING:
    from aad_med.embedding.encode import CohortEmbedding

log = logging.getLogger("aad_med.compare")


def pair_tag(a: str, b: str) -> str:
    """The ``A_vs_B`` part of a pair's file names."""
    return f"{a}_vs_{b}"


def regional_map(
    tmp: Path, embs: Mapping[str, CohortEmbedding], result: Mapping, regional: bool = True
) -> dict:
    """The regional AAD map of every pair (``regional_aad*.png`` and ``regional_aad.nii.gz`` into
    ``tmp``) when every cohort kept its patch positions in one shared image space; otherwise
    ``{"available": False, "note": why}``."""
    from aad_med.embedding.regional import regional_aad_map, shared_space_problem
    from aad_med.plots.images import plot_regional_aad

    if not regional:
        return {
            "available": False,
            "note": "The regional AAD map was not requested (regional=false).",
        }
    regions = {n: e.regional for n, e in embs.items() if e.regional is not None}
    if len(regions) != len(embs):
        return {
            "available": False,
            "note": "The regional AAD map was skipped: positions were not kept for every cohort.",
        }
    problem = shared_space_problem(regions)
    if problem:
        log.info(problem)
        return {"available": False, "note": problem}
    maps, images, pair_names = [], [], []
    background = None
    for k, pair in enumerate(result["pairs"]):
        a, b = pair["a"], pair["b"]
        m, bg = regional_aad_map(regions[a], regions[b])
        background = bg if background is None else background
        maps.append(m)
        pair_names.append([a, b])
        png = "regional_aad.png" if k == 0 else f"regional_aad_{pair_tag(a, b)}.png"
        plot_regional_aad(m, bg, tmp / png, title=f"Regional AAD, {a} vs {b}")
        images.append(
            {
                "png": png,
                "caption": f"AAD between the mean patch latents of {a} and "
                f"{b} at each position of the patch grid, over the cohorts' mean FLAIR.",
            }
        )
    affine = regions[result["pairs"][0]["a"]].ras_affine
    data = maps[0] if len(maps) == 1 else np.stack(maps)
    write_nifti(tmp / "regional_aad.nii.gz", data, affine)
    note = (
        "All cohorts share one image space, so the AAD was also computed position by "
        "position on the evaluation grid (cells of "
        f"{regions[result['pairs'][0]['a']].cell_size} voxels; cells with fewer than 2 "
        "subjects per cohort are empty). regional_aad.nii.gz holds "
        + ("the map." if len(maps) == 1 else "one volume per pair, in the order of 'pairs'.")
    )
    return {"available": True, "note": note, "pairs": pair_names, "images": images}
