"""Position-resolved latents for the regional AAD map: per cohort, the mean patch latent in each
cell of a coarse grid of the (RAS, resampled, uncropped) image space, streamed subject by subject
so memory depends on the image size, not the cohort size. Also the cohort's mean FLAIR image, to
draw the map on."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

AFFINE_TOLERANCE = 1e-3
BACKGROUND_CHANNEL = 3
"""FLAIR (canonical channel order t1, t1ce, t2, flair): the map is drawn on the mean FLAIR."""


def add_to_cells(
    sums: dict[tuple, np.ndarray], counts: dict[tuple, int], cells: np.ndarray, values
) -> None:
    """Add each row of ``values`` to the running sum of its grid cell (a row of ``cells``) and
    count it: the per-position accumulation of the regional map and of position-matched
    features."""
    for c, v in zip(map(tuple, np.asarray(cells).tolist()), values, strict=True):
        if c in sums:
            sums[c] += v
            counts[c] += 1
        else:
            sums[c] = v.copy()
            counts[c] = 1


@dataclass
class RegionalLatents:
    """One cohort's latents by grid cell.

    Attributes:
        cell_size: edge of a cell in voxels (the evaluation stride).
        patch_size: edge of the patches.
        cells: ``(M, 3)`` int cell indices; a patch belongs to the cell of its centre.
        sums: ``(M, D)`` float64 sum over subjects of each subject's mean latent in the cell.
        counts: ``(M,)`` number of subjects with a patch in the cell.
        image_sum: ``(X, Y, Z)`` float64 sum of the subjects' preprocessed FLAIR in RAS space.
        n_images: subjects summed in ``image_sum``.
        ras_shape: shape of the RAS resampled volume shared by the cohort's subjects.
        ras_affine: its voxel-to-world matrix.
        same_space: ``False`` when the cohort's subjects do not share one shape and affine
            (then the cells mean nothing and no map is drawn).
    """

    cell_size: int
    patch_size: int
    cells: np.ndarray
    sums: np.ndarray
    counts: np.ndarray
    image_sum: np.ndarray
    n_images: int
    ras_shape: tuple[int, int, int]
    ras_affine: np.ndarray
    same_space: bool

    def means(self) -> dict[tuple[int, int, int], tuple[np.ndarray, int]]:
        """``{cell: (mean latent, subjects)}``."""
        return {
            tuple(int(v) for v in c): (s / n, int(n))
            for c, s, n in zip(self.cells, self.sums, self.counts, strict=True)
        }


class RegionalAccumulator:
    """Builds :class:`RegionalLatents` one subject at a time."""

    def __init__(self, cell_size: int, patch_size: int):
        self.cell_size = int(cell_size)
        self.patch_size = int(patch_size)
        self.sums: dict[tuple[int, int, int], np.ndarray] = {}
        self.counts: dict[tuple[int, int, int], int] = {}
        self.image_sum: np.ndarray | None = None
        self.n_images = 0
        self.ras_shape: tuple[int, int, int] | None = None
        self.ras_affine: np.ndarray | None = None
        self.same_space = True

    def add_subject(
        self,
        positions: np.ndarray,
        latents: np.ndarray,
        image: np.ndarray,
        crop_start: np.ndarray,
        ras_shape: tuple[int, int, int],
        ras_affine: np.ndarray,
    ) -> None:
        """Add one subject.

        Args:
            positions: ``(N, 3)`` patch corners in the RAS volume (``crop_start`` added).
            latents: ``(N, D)`` patch latents.
            image: ``(C, x, y, z)`` preprocessed (cropped, padded) image of the subject.
            crop_start: corner of the crop in the RAS volume.
            ras_shape: shape of the RAS volume before cropping.
            ras_affine: voxel-to-world matrix of the RAS volume.
        """
        ras_shape = tuple(int(s) for s in ras_shape)
        if self.ras_shape is None:
            self.ras_shape, self.ras_affine = ras_shape, np.asarray(ras_affine, dtype=np.float64)
            self.image_sum = np.zeros(ras_shape, dtype=np.float64)
        elif ras_shape != self.ras_shape or not np.allclose(
            ras_affine, self.ras_affine, atol=AFFINE_TOLERANCE
        ):
            self.same_space = False
        if not self.same_space:
            return
        centres = np.asarray(positions, dtype=np.int64) + self.patch_size // 2
        cells = centres // self.cell_size
        uniq, inverse = np.unique(cells, axis=0, return_inverse=True)
        z = np.asarray(latents, dtype=np.float64)
        per_cell = np.zeros((len(uniq), z.shape[1]))
        np.add.at(per_cell, inverse.ravel(), z)
        per_cell /= np.bincount(inverse.ravel(), minlength=len(uniq))[:, None]
        add_to_cells(self.sums, self.counts, uniq, per_cell)
        # Padding may run past the RAS volume; only the overlapping part is added.
        start = np.asarray(crop_start, dtype=np.int64)
        vol = np.asarray(image[BACKGROUND_CHANNEL], dtype=np.float64)
        stop = np.minimum(start + np.array(vol.shape), np.array(ras_shape))
        ext = stop - start
        self.image_sum[start[0] : stop[0], start[1] : stop[1], start[2] : stop[2]] += vol[
            : ext[0], : ext[1], : ext[2]
        ]
        self.n_images += 1

    def result(self, latent_dim: int) -> RegionalLatents:
        keys = sorted(self.sums)
        return RegionalLatents(
            cell_size=self.cell_size,
            patch_size=self.patch_size,
            cells=np.array(keys, dtype=np.int64).reshape(-1, 3),
            sums=np.array([self.sums[k] for k in keys], dtype=np.float64).reshape(-1, latent_dim),
            counts=np.array([self.counts[k] for k in keys], dtype=np.int64),
            image_sum=self.image_sum if self.image_sum is not None else np.zeros((1, 1, 1)),
            n_images=self.n_images,
            ras_shape=self.ras_shape or (1, 1, 1),
            ras_affine=self.ras_affine if self.ras_affine is not None else np.eye(4),
            same_space=self.same_space,
        )


def shared_space_problem(regions: dict[str, RegionalLatents]) -> str | None:
    """``None`` when every cohort lies in one image space, else a sentence saying why not."""
    names = list(regions)
    for name in names:
        if not regions[name].same_space:
            return (
                f"The regional AAD map was skipped: the subjects of cohort {name} do not share one "
                "image shape and affine (the map needs co-registered volumes, e.g. BraTS)."
            )
    ref = regions[names[0]]
    for name in names[1:]:
        r = regions[name]
        if tuple(r.ras_shape) != tuple(ref.ras_shape) or not np.allclose(
            r.ras_affine, ref.ras_affine, atol=AFFINE_TOLERANCE
        ):
            return (
                f"The regional AAD map was skipped: cohorts {names[0]} {tuple(ref.ras_shape)} and "
                f"{name} {tuple(r.ras_shape)} are not in one image space (shape or affine differ)."
            )
    return None


def regional_aad_map(
    a: RegionalLatents, b: RegionalLatents, min_subjects: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """AAD between two cohorts' mean latents in each grid cell, painted into the image space.

    Cells where either cohort has fewer than ``min_subjects`` subjects are NaN.

    Returns:
        ``(aad_map, background)``, both ``(X, Y, Z)`` float32 in the shared RAS space; the
        background is the mean FLAIR of both cohorts.
    """
    shape = tuple(a.ras_shape)
    out = np.full(shape, np.nan, dtype=np.float32)
    ma, mb = a.means(), b.means()
    cs = a.cell_size
    for cell, (mean_a, n_a) in ma.items():
        if cell not in mb or n_a < min_subjects or mb[cell][1] < min_subjects:
            continue
        value = float(np.linalg.norm(mean_a - mb[cell][0]))
        lo = [c * cs for c in cell]
        out[lo[0] : lo[0] + cs, lo[1] : lo[1] + cs, lo[2] : lo[2] + cs] = value
    total = max(1, a.n_images + b.n_images)
    background = ((a.image_sum + b.image_sum) / total).astype(np.float32)
    return out, background
