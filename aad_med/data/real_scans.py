"""Data stage: small BraTS-2021-layout cohorts built from REAL brain scans that ship inside
installed packages, for validating AAD on real anatomy without downloading anything.

Sources (:func:`available_real_sources`, located through the installed packages, never fetched):

- ``mni152``: nilearn's bundled MNI152 2009c T1 template (1 mm, brain-extracted) with its grey
  and white matter probability maps.
- ``nibabel_anatomical``: nibabel's test scan ``anatomical.nii`` (a 2 mm T1 field of view inside
  the brain of one real subject).
- ``itk_head_mr``: a 3-D head MR volume of Debian's ``insighttoolkit5-examples`` package, when it
  is installed (MetaImage ``.mha``/``.mhd`` or NIfTI).

Each source becomes a template: cropped to its brain, resampled so its longest edge is ``size``
voxels, with T1 (the real scan), T1ce (T1 with slightly brighter grey matter), and T2- and
FLAIR-like channels mixed from tissue maps (the source's own GM/WM maps for ``mni152``; soft
T1-intensity classes otherwise) and modulated by the real T1's fine texture. Each subject is the
template under a random smooth deformation, a random smooth bias field and Rician noise, seeded
by ``(seed, subject index)``, so cohorts are reproducible and subjects differ.

Voxels are written with a nominal 1 mm spacing (the BraTS convention, so the default
preprocessing does not resample the small volumes); the physical spacing of the resampled
template is recorded in ``real_scans.json`` next to the subjects. No seg files are written (the
scans have no tumours).

Size: just over ~450 lines; locating the packaged scans, turning each into a template and drawing
subjects from it share the template cache, so they stay in one module.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from aad_med import CHANNELS
from aad_med.data.synthetic import brats_affine
from aad_med.errors import ConfigError, InputError
from aad_med.io_utils import write_bytes_atomic, write_nifti_atomic

_MNI_T1 = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
_MNI_GM = "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz"
_MNI_WM = "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"
_ITK_ROOTS = (
    "/usr/share/doc/insighttoolkit5-examples",
    "/usr/share/insighttoolkit5-examples",
    "/usr/share/insighttoolkit5",
    "/usr/share/ITK-5.3",
    "/usr/share/ITK-5.2",
)
# Debian 12 ships the Kmeans test T1 (128x128x62, 2x2x3 mm, with skull); later releases may add
# the head MR volume.
_ITK_NAMES = (
    "KmeansTest_T1UCharRaw.nii.gz",
    "HeadMRVolume.mha",
    "HeadMRVolume.mhd",
    "BrainT1.nii.gz",
    "BrainT1.mha",
)

#: Tissue signal of the mixed channels (relative to the brain's median T1): CSF is bright in T2
#: and dark in FLAIR, grey matter brighter than white matter in both.
_MIX = {
    "t2": {"wm": 0.45, "gm": 0.7, "csf": 1.4},
    "flair": {"wm": 0.6, "gm": 0.9, "csf": 0.15},
}


def _package_dir(package: str) -> Path | None:
    """The folder of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _itk_candidate() -> Path | None:
    for root in _ITK_ROOTS:
        base = Path(root)
        if not base.is_dir():
            continue
        for name in _ITK_NAMES:
            hits = sorted(base.rglob(name))
            if hits:
                return hits[0]
    return None


def available_real_sources() -> dict[str, Path]:
    """Real scans found in the installed packages: ``{source name: main file}``.

    Only sources whose files all exist are listed (``mni152`` needs its GM and WM maps too).
    """
    out: dict[str, Path] = {}
    nilearn = _package_dir("nilearn")
    if nilearn is not None:
        data = nilearn / "datasets" / "data"
        if all((data / f).is_file() for f in (_MNI_T1, _MNI_GM, _MNI_WM)):
            out["mni152"] = data / _MNI_T1
    nibabel_dir = _package_dir("nibabel")
    if nibabel_dir is not None:
        anat = nibabel_dir / "tests" / "data" / "anatomical.nii"
        if anat.is_file():
            out["nibabel_anatomical"] = anat
    itk = _itk_candidate()
    if itk is not None:
        out["itk_head_mr"] = itk
    return out


# --------------------------------------------------------------------------------------------
# Reading


_MET_TYPES = {
    "MET_UCHAR": np.uint8,
    "MET_CHAR": np.int8,
    "MET_USHORT": np.uint16,
    "MET_SHORT": np.int16,
    "MET_UINT": np.uint32,
    "MET_INT": np.int32,
    "MET_FLOAT": np.float32,
    "MET_DOUBLE": np.float64,
}


def read_metaimage(path: str | Path) -> tuple[np.ndarray, tuple[float, ...]]:
    """Read a 3-D scalar MetaImage (``.mha`` with inline data or ``.mhd`` + raw file).

    Returns:
        ``(volume (X, Y, Z), spacing)``.

    Raises:
        InputError: not a readable 3-D scalar MetaImage (named).
    """
    path = Path(path)
    try:
        blob = path.read_bytes()
    except OSError as e:
        raise InputError(path, f"cannot read ({e.strerror or e})") from None
    header: dict[str, str] = {}
    pos = 0
    while pos < len(blob):
        end = blob.find(b"\n", pos)
        end = len(blob) if end < 0 else end
        line = blob[pos:end].decode("latin-1").strip()
        pos = end + 1
        if "=" in line:
            key, value = (s.strip() for s in line.split("=", 1))
            header[key] = value
            if key == "ElementDataFile":
                break
    try:
        dims = [int(v) for v in header["DimSize"].split()]
        dtype = np.dtype(_MET_TYPES[header["ElementType"]])
    except (KeyError, ValueError):
        raise InputError(path, "not a MetaImage (no DimSize/ElementType header)") from None
    if len(dims) != 3 or int(header.get("ElementNumberOfChannels", "1")) != 1:
        raise InputError(path, f"expected a 3-D scalar MetaImage, got DimSize {dims}")
    spacing = tuple(
        float(v) for v in header.get("ElementSpacing", header.get("ElementSize", "1 1 1")).split()
    )
    data_file = header.get("ElementDataFile", "LOCAL")
    if data_file == "LOCAL":
        raw = blob[pos:]
    else:
        try:
            raw = (path.parent / data_file).read_bytes()
        except OSError as e:
            raise InputError(path.parent / data_file, f"cannot read ({e.strerror or e})") from None
    if header.get("CompressedData", "False").lower() == "true":
        try:
            raw = zlib.decompress(raw)
        except zlib.error:
            raise InputError(path, "compressed MetaImage data cannot be decompressed") from None
    if (
        header.get("BinaryDataByteOrderMSB", header.get("ElementByteOrderMSB", "False")).lower()
        == "true"
    ):
        dtype = dtype.newbyteorder(">")
    n = int(np.prod(dims))
    if len(raw) < n * dtype.itemsize:
        raise InputError(
            path, f"truncated MetaImage data ({len(raw)} of {n * dtype.itemsize} bytes)"
        )
    # MetaImage stores x fastest.
    vol = np.frombuffer(raw[: n * dtype.itemsize], dtype=dtype).reshape(dims[::-1]).transpose()
    return vol.astype(np.float32), spacing


def _read_volume(path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    if path.suffix.lower() in (".mha", ".mhd"):
        return read_metaimage(path)
    try:
        img = nib.load(str(path))
        vol = np.asarray(img.dataobj, dtype=np.float32)
    except (OSError, ValueError, nib.filebasedimages.ImageFileError) as e:
        raise InputError(path, f"cannot read the scan ({e})") from None
    while vol.ndim > 3 and vol.shape[-1] == 1:
        vol = vol[..., 0]
    if vol.ndim != 3:
        raise InputError(path, f"expected a 3-D scan, got shape {vol.shape}")
    return vol, tuple(float(z) for z in img.header.get_zooms()[:3])


# --------------------------------------------------------------------------------------------
# Templates


@dataclass(frozen=True)
class RealTemplate:
    """A real scan prepared for cohort generation (all arrays ``(X, Y, Z)`` float32).

    Attributes:
        name: source name.
        path: the scan file.
        channels: ``{t1, t1ce, t2, flair}`` clean template channels, 0 outside the brain.
        brain: boolean brain mask.
        spacing: physical voxel size in mm of the resampled template.
    """

    name: str
    path: Path
    channels: Mapping[str, np.ndarray]
    brain: np.ndarray
    spacing: tuple[float, float, float]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.brain.shape)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = ndimage.sum(mask, labels, range(1, n + 1))
    return labels == (int(np.argmax(sizes)) + 1)


def _brain_and_tissues(name: str, path: Path, t1: np.ndarray) -> tuple[np.ndarray, dict]:
    if name == "mni152":
        data = path.parent
        gm = _read_volume(data / _MNI_GM)[0] / 255.0
        wm = _read_volume(data / _MNI_WM)[0] / 255.0
        brain = t1 > 0
    else:
        lo, hi = np.percentile(t1, [0.5, 99.5])
        dark = t1 < lo + 0.1 * (hi - lo)
        if dark.mean() > 0.15:
            # A head with background around it: the largest bright component, holes filled.
            brain = ndimage.binary_opening(~dark)
            brain = ndimage.binary_fill_holes(_largest_component(brain))
        else:
            # A field of view inside the brain (nibabel's scan): every voxel but the extremes.
            brain = t1 > lo
        t = np.clip((t1 - lo) / max(hi - lo, 1e-6), 0, 1.2)
        inside = t[brain]
        w_thr, c_thr = np.percentile(inside, 70), np.percentile(inside, 12)
        wm = _sigmoid((t - w_thr) / 0.04)
        csf = _sigmoid((c_thr - t) / 0.04)
        gm = np.clip(1 - wm - csf, 0, 1)
    gm = np.where(brain, gm, 0)
    wm = np.where(brain, wm, 0)
    csf = np.where(brain, np.clip(1.0 - gm - wm, 0, 1), 0)
    return brain, {"gm": gm, "wm": wm, "csf": csf}


@functools.lru_cache(maxsize=8)
def _template_cached(name: str, path: str, size: int) -> RealTemplate:
    path_ = Path(path)
    t1, spacing = _read_volume(path_)
    brain, tissues = _brain_and_tissues(name, path_, t1)
    if not brain.any():
        raise InputError(path_, "no brain voxels found in the scan")
    idx = np.argwhere(brain)
    lo = np.maximum(idx.min(axis=0) - 1, 0)
    hi = np.minimum(idx.max(axis=0) + 2, brain.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    extent = np.array([(b - a) * s for a, b, s in zip(lo, hi, spacing, strict=True)])
    voxel = float(extent.max() / size)
    zoom = [s / voxel for s in spacing]
    crop_t1 = np.where(brain, t1, 0)[box]
    small_brain = ndimage.zoom(brain[box].astype(np.float32), zoom, order=1) > 0.5
    t1_s = ndimage.zoom(crop_t1, zoom, order=1)
    tis = {k: ndimage.zoom(v[box].astype(np.float32), zoom, order=1) for k, v in tissues.items()}
    t1_s = np.clip(t1_s - min(0.0, float(t1_s[small_brain].min())), 0, None)
    med = float(np.median(t1_s[small_brain])) or 1.0
    t1n = t1_s / med
    # The real scan's fine texture (ratio to its smooth version) carries into the mixed channels.
    texture = np.clip(t1n / np.maximum(ndimage.gaussian_filter(t1n, 1.5), 1e-3), 0.7, 1.3)
    channels = {"t1": t1n, "t1ce": t1n * (1.0 + 0.2 * tis["gm"])}
    for ch, w in _MIX.items():
        channels[ch] = sum(w[k] * tis[k] for k in ("wm", "gm", "csf")) * texture
    channels = {
        ch: np.where(small_brain, np.maximum(v, 1e-3), 0).astype(np.float32)
        for ch, v in channels.items()
    }
    return RealTemplate(
        name=name,
        path=path_,
        channels={ch: channels[ch] for ch in CHANNELS},
        brain=small_brain,
        spacing=(voxel, voxel, voxel),
    )


def real_template(source: str | Path, size: int = 48) -> RealTemplate:
    """The prepared template of a source name (see :func:`available_real_sources`) or scan file.

    Raises:
        ConfigError: unknown source name or ``size`` below 16.
        InputError: the scan cannot be read or has no brain.
    """
    if int(size) < 16:
        raise ConfigError(f"size must be >= 16 voxels, got {size}")
    sources = available_real_sources()
    if isinstance(source, str) and source in sources:
        name, path = source, sources[source]
    elif Path(source).is_file():
        path = Path(source)
        name = "mni152" if path.name == _MNI_T1 else path.name.split(".")[0]
    else:
        raise ConfigError(
            f"unknown real scan source {str(source)!r}; available here: "
            f"{', '.join(sources) or 'none (install nilearn or nibabel)'}"
        )
    return _template_cached(name, str(path), int(size))


# --------------------------------------------------------------------------------------------
# Subjects and cohorts


def _smooth_noise(rng: np.random.Generator, shape, sigma: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="reflect")
    sd = field.std()
    return field / sd if sd > 0 else field


def make_real_subject(
    template: RealTemplate,
    seed: int | np.random.SeedSequence,
    deformation: float = 1.5,
    bias: float = 0.1,
    noise: float = 0.02,
) -> dict[str, np.ndarray]:
    """One subject from a template: smooth random deformation, bias field and Rician noise.

    Args:
        template: from :func:`real_template`.
        seed: the subject's seed.
        deformation: standard deviation of the displacement in voxels.
        bias: standard deviation of the log bias field (one field for all channels).
        noise: Rician sigma as a fraction of the channel's median brain intensity.

    Returns:
        ``{t1, t1ce, t2, flair}`` float32 volumes of the template's shape, exactly 0 outside
        the deformed brain and > 0 inside it.
    """
    rng = np.random.default_rng(seed)
    shape = template.shape
    smooth = max(2.0, min(shape) / 6)
    grid = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    coords = [g + deformation * _smooth_noise(rng, shape, smooth) for g in grid]
    brain = ndimage.map_coordinates(template.brain.astype(np.float32), coords, order=1) > 0.5
    log_bias = bias * _smooth_noise(rng, shape, 2 * smooth)
    out = {}
    for ch in CHANNELS:
        img = ndimage.map_coordinates(template.channels[ch], coords, order=1, mode="constant")
        img = img * np.exp(log_bias)
        inside = img[brain]
        sigma = noise * float(np.median(inside)) if inside.size else 0.0
        if sigma > 0:
            img = np.sqrt(
                (img + sigma * rng.standard_normal(shape)) ** 2
                + (sigma * rng.standard_normal(shape)) ** 2
            )
        img = np.where(brain, np.maximum(img, 1e-3), 0.0)
        out[ch] = img.astype(np.float32)
    return out


def write_real_cohort(
    out_dir: str | Path,
    source: str | Path,
    n_subjects: int = 8,
    seed: int = 0,
    size: int = 48,
    id_prefix: str | None = None,
    start_index: int = 0,
    deformation: float = 1.5,
    bias: float = 0.1,
    noise: float = 0.02,
) -> Path:
    """Write a BraTS 2021 layout cohort (``{id}/{id}_{t1,t1ce,t2,flair}.nii.gz``) built from a
    real scan.

    Args:
        out_dir: cohort folder (created; existing subjects of other indices are kept).
        source: a name of :func:`available_real_sources` or a scan file.
        n_subjects: subjects to write.
        seed: cohort seed; subject ``i`` uses ``SeedSequence([seed, i])``.
        size: longest edge of the volumes in voxels.
        id_prefix: subject ID prefix (default ``"Real_<source>_s<seed>_"``).
        start_index: index of the first subject (to extend a cohort).
        deformation, bias, noise: per-subject variability (see :func:`make_real_subject`).

    Returns:
        The cohort folder.

    Raises:
        ConfigError: unknown source or invalid arguments. InputError: unreadable scan or
            unwritable folder.
    """
    if int(n_subjects) < 1 or int(start_index) < 0 or int(seed) < 0:
        raise ConfigError(
            f"n_subjects must be >= 1 and seed, start_index >= 0; got {n_subjects}, {seed}, "
            f"{start_index}"
        )
    template = real_template(source, size)
    root = Path(out_dir)
    # The seed is part of the default ID: cohorts drawn with other seeds hold other subjects, and
    # train/test overlap checks compare IDs.
    prefix = f"Real_{template.name}_s{int(seed)}_" if id_prefix is None else id_prefix
    affine = brats_affine(template.shape)
    ids = []
    for i in range(int(start_index), int(start_index) + int(n_subjects)):
        sid = f"{prefix}{i:05d}"
        vols = make_real_subject(
            template, np.random.SeedSequence([int(seed), i]), deformation, bias, noise
        )
        for ch in CHANNELS:
            write_nifti_atomic(root / sid / f"{sid}_{ch}.nii.gz", vols[ch], affine)
        ids.append(sid)
    info_path = root / "real_scans.json"
    batches = []
    if info_path.is_file():
        try:
            batches = json.loads(info_path.read_text()).get("batches", [])
        except (ValueError, AttributeError):
            batches = []
    batches.append(
        {
            "source": template.name,
            "scan": str(template.path),
            "physical_spacing_mm": list(template.spacing),
            "written_spacing_mm": [1.0, 1.0, 1.0],
            "shape": list(template.shape),
            "seed": int(seed),
            "start_index": int(start_index),
            "subject_ids": ids,
            "deformation": float(deformation),
            "bias": float(bias),
            "noise": float(noise),
        }
    )
    text = json.dumps({"generator": "aad_med.data.real_scans", "batches": batches}, indent=2)
    write_bytes_atomic(info_path, (text + "\n").encode())
    return root
