"""Tiny NIfTI files and cohorts written into tmp dirs by tests (torchio-style: every test makes
its own data; no downloads). Written with nibabel directly, independent of ``aad_med.data.synthetic``
so that layout tests do not depend on the project's generator."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from aad_med import CHANNELS
from aad_med.data.records import ImageSource, SubjectRecord

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
        write_nifti(
            folder / f"{subject_id}{sep}{suffix}{ext}", brain_like(shape, seed * 10 + i, scale)
        )
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


MSD_ORDER = ("flair", "t1", "t1ce", "t2")
"""Channel order of Decathlon Task01_BrainTumour 4D images (FLAIR, T1w, T1gd, T2w)."""


def write_msd_cohort(
    root: Path,
    n: int = 3,
    shape=TINY_SHAPE,
    with_labels: bool = True,
    dataset_json: bool = True,
    order: tuple[str, ...] = MSD_ORDER,
    split_channels: bool = False,
) -> Path:
    """Write a Decathlon Task01 folder: ``imagesTr/BRATS_XXX.nii.gz`` 4D ``(X, Y, Z, 4)`` with
    volumes in ``order``, ``labelsTr/BRATS_XXX.nii.gz`` (MSD labels 0-3) and ``dataset.json``.

    With ``split_channels`` the nnU-Net v2 variant is written instead: one 3D file per channel,
    ``imagesTr/BRATS_XXX_000C.nii.gz``, and ``channel_names`` in ``dataset.json``.
    Channel ``c`` of subject ``i`` is ``brain_like(seed=i*10+c, scale=1+c)`` so tests can tell
    the channels apart by their mean (t1 < t1ce < t2 < flair in canonical order).
    """
    import json

    root = Path(root)
    canonical = ("t1", "t1ce", "t2", "flair")
    names = {"flair": "FLAIR", "t1": "T1w", "t1ce": "t1gd", "t2": "T2w"}
    for i in range(1, n + 1):
        sid = f"BRATS_{i:03d}"
        vols = {
            ch: brain_like(shape, i * 10 + canonical.index(ch), 1 + canonical.index(ch))
            for ch in canonical
        }
        if split_channels:
            for c, ch in enumerate(order):
                write_nifti(root / "imagesTr" / f"{sid}_{c:04d}.nii.gz", vols[ch])
        else:
            write_nifti(
                root / "imagesTr" / f"{sid}.nii.gz", np.stack([vols[ch] for ch in order], -1)
            )
        if with_labels:
            seg = tumour_like(shape)
            seg[seg == 4] = 3  # Decathlon labels: 1 oedema, 2 non-enhancing, 3 enhancing
            write_nifti(root / "labelsTr" / f"{sid}.nii.gz", seg, dtype=np.uint8)
    if dataset_json:
        key = "channel_names" if split_channels else "modality"
        meta = {
            "name": "BrainTumour",
            key: {str(c): names[ch] for c, ch in enumerate(order)},
            "labels": {
                "0": "background",
                "1": "edema",
                "2": "non-enhancing tumor",
                "3": "enhancing tumour",
            },
        }
        (root / "dataset.json").write_text(json.dumps(meta, indent=2))
    return root


def write_csv_manifest(
    csv_path: Path,
    rows: list[dict[str, str]],
    columns: tuple[str, ...] = ("subject_id", "t1", "t1ce", "t2", "flair", "seg"),
) -> Path:
    """Write a CSV manifest with the given ``columns`` (missing keys become empty cells)."""
    import csv

    csv_path = Path(csv_path)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with csv_path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(columns)
        for row in rows:
            w.writerow([row.get(c, "") for c in columns])
    return csv_path


def write_csv_cohort(root: Path, n: int = 3, shape=TINY_SHAPE, with_seg: bool = True) -> Path:
    """Write ``n`` subjects as loose files under ``root/images/`` plus ``root/manifest.csv``
    listing them with paths relative to the CSV. Returns the CSV path."""
    root = Path(root)
    rows = []
    for i in range(n):
        sid = f"case{i:02d}"
        row = {"subject_id": sid}
        for c, ch in enumerate(("t1", "t1ce", "t2", "flair")):
            write_nifti(root / "images" / f"{sid}_{ch}_scan.nii.gz", brain_like(shape, i * 10 + c))
            row[ch] = f"images/{sid}_{ch}_scan.nii.gz"
        if with_seg:
            write_nifti(root / "images" / f"{sid}_label.nii.gz", tumour_like(shape), dtype=np.int16)
            row["seg"] = f"images/{sid}_label.nii.gz"
        rows.append(row)
    return write_csv_manifest(root / "manifest.csv", rows)


def truncate_file(path: Path, keep_fraction: float = 0.5) -> Path:
    """Cut a file to a fraction of its bytes (a truncated download)."""
    path = Path(path)
    data = path.read_bytes()
    path.write_bytes(data[: max(1, int(len(data) * keep_fraction))])
    return path


def write_absurd_header(path: Path, dims=(32767, 32767, 32767), nifti2: bool = False) -> Path:
    """Write a valid NIfTI header claiming ``dims`` voxels followed by a few bytes of data:
    loading it naively would try to allocate terabytes. NIfTI-1 dimensions are int16 (at most
    32767); use ``nifti2=True`` for larger ones."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    hdr = (nib.Nifti2Header if nifti2 else nib.Nifti1Header)()
    hdr.set_data_shape(dims)
    hdr.set_data_dtype(np.float32)
    hdr.set_qform(np.eye(4), code=1)
    hdr.set_sform(np.eye(4), code=1)
    hdr["vox_offset"] = 544 if nifti2 else 352  # header + the 4-byte extension flag
    with path.open("wb") as fh:
        hdr.write_to(fh)
        fh.write(b"\0" * (int(hdr["vox_offset"]) - fh.tell()))
        fh.write(np.ones(16, np.float32).tobytes())
    return path


def write_subject(
    root: Path,
    sid: str,
    affine=None,
    with_seg: bool = True,
    seed: int = 0,
    shape=TINY_SHAPE,
    flip_axes: tuple[int, ...] = (),
) -> SubjectRecord:
    """Write one subject in the BraTS 2021 layout; ``flip_axes`` flips the stored voxel order."""
    folder = Path(root) / sid
    images = {}
    for i, ch in enumerate(CHANNELS):
        data = brain_like(shape, seed * 10 + i, scale=1 + i)
        if flip_axes:
            data = np.flip(data, flip_axes).copy()
        images[ch] = ImageSource(write_nifti(folder / f"{sid}_{ch}.nii.gz", data, affine))
    seg = None
    if with_seg:
        s = tumour_like(shape)
        if flip_axes:
            s = np.flip(s, flip_axes).copy()
        seg = ImageSource(write_nifti(folder / f"{sid}_seg.nii.gz", s, affine, dtype=np.int16))
    return SubjectRecord(sid, images, seg)
