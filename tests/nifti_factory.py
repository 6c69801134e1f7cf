"""Tiny NIfTI files and cohorts written into tmp dirs by tests (torchio-style: every test makes
its own data; no downloads). Written with nibabel directly, independent of ``aad_med.data.synthetic``
so that layout tests do not depend on the project's generator."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

TINY_SHAPE = (24, 28, 20)
BRATS2021_SUFFIX = {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair"}
BRATS2023_SUFFIX = {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"}


def brain_like(shape=TINY_SHAPE, seed: int = 0, scale: float = 1.0) -> np.ndarray:
    """An ellipsoid 'brain' with smooth random texture, zero outside."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    r2 = sum(g**2 for g in grids) / 0.8**2
    inside = r2 < 1
    vol = (100 + 20 * grids[0] + 10 * rng.standard_normal(shape)) * scale
    return np.where(inside, vol, 0).astype(np.float32)


def tumour_like(shape=TINY_SHAPE) -> np.ndarray:
    """A small seg with BraTS labels 1, 2, 4 in nested spheres."""
    c = [s // 2 for s in shape]
    idx = np.indices(shape)
    d = np.sqrt(sum((idx[i] - c[i]) ** 2 for i in range(3)))
    seg = np.zeros(shape, np.int16)
    seg[d < 5] = 2
    seg[d < 3] = 4
    seg[d < 1.5] = 1
    return seg


def write_nifti(path: Path, data: np.ndarray, affine=None, dtype=None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.eye(4) if affine is None else affine
    arr = data if dtype is None else data.astype(dtype)
    nib.save(nib.Nifti1Image(arr, affine), str(path))
    return path


def write_brats_subject(
    root: Path,
    subject_id: str,
    layout: str = "brats2021",
    shape=TINY_SHAPE,
    seed: int = 0,
    with_seg: bool = True,
    scale: float = 1.0,
) -> Path:
    """Write one subject folder in a BraTS layout (``brats2021``, ``brats2020``, ``brats2023``)."""
    suffixes = BRATS2023_SUFFIX if layout == "brats2023" else BRATS2021_SUFFIX
    ext = ".nii" if layout == "brats2020" else ".nii.gz"
    sep = "-" if layout == "brats2023" else "_"
    folder = Path(root) / subject_id
    for i, (_, suffix) in enumerate(suffixes.items()):
        write_nifti(folder / f"{subject_id}{sep}{suffix}{ext}", brain_like(shape, seed * 10 + i, scale))
    if with_seg:
        write_nifti(folder / f"{subject_id}{sep}seg{ext}", tumour_like(shape), dtype=np.int16)
    return folder


def brats_id(layout: str, i: int) -> str:
    if layout == "brats2020":
        return f"BraTS20_Training_{i:03d}"
    if layout == "brats2023":
        return f"BraTS-GLI-{i:05d}-000"
    return f"BraTS2021_{i:05d}"


def write_brats_cohort(root: Path, n: int = 3, layout: str = "brats2021", **kw) -> Path:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        write_brats_subject(root, brats_id(layout, i), layout=layout, seed=i, **kw)
    return root
