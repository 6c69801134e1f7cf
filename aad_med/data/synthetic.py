"""Synthetic BraTS-style cohorts: the data stage's stand-in for BraTS, which cannot be downloaded
on our machines. It feeds the demo, the tests, the notebooks and the sensitivity benchmark.

Each subject is a skull-stripped brain phantom with grey matter, white matter, deep grey nuclei,
ventricles and sulcal CSF of plausible T1 / T1ce / T2 / FLAIR contrast, smooth random anatomy,
and (with a site-controlled prevalence) a glioma made of a necrotic core (seg label 1), an
enhancing rim (label 4) and oedema (label 2) whose appearance differs by modality as in real
gliomas. A :class:`SiteParams` describes one "site" (scanner, protocol and population) and gives
controlled, documented shifts between cohorts.

Reproducibility contract:

* Anatomy of subject ``i`` depends only on ``(seed, i)`` (through :class:`numpy.random.SeedSequence`),
  never on the site: two cohorts written with the same seed by different sites share anatomy and
  differ only by the site's shift. Population parameters (``brain_size``, ``tumour_size``,
  ``tumour_prevalence``) rescale or switch the same random draws instead of drawing new ones.
* The acquisition noise and bias field of subject ``i`` come from a second stream of ``(seed, i)``;
  their *amplitude* is the site's, their random pattern is shared.
* Files are byte-reproducible: gzip is written with ``mtime=0`` and no file name, and each file
  is written atomically (:func:`aad_med.io_utils.atomic_path`).

Its acquisition model (bias field as a log-range of smooth cosines, Rician noise relative to the
white-matter signal) is its own, not :mod:`aad_med.data.artefacts`: the site presets, the
benchmark figures and the tests are calibrated against these units, and re-expressing them would
change every synthetic cohort.

This module only generates and writes; it never reads cohorts (discovery does that). It is longer
than ~450 lines because the site parameters, the phantom anatomy and the acquisition model are
read together (each site's shift is documented against the code that applies it).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from aad_med import CHANNELS
from aad_med.errors import ConfigError, InputError
from aad_med.io_utils import write_bytes_atomic, write_nifti_atomic

DEFAULT_SHAPE: tuple[int, int, int] = (64, 72, 60)
"""Small default volume (about 0.1 s per subject): tests, demo and notebooks."""

BRATS_SHAPE: tuple[int, int, int] = (240, 240, 155)
"""The size of real BraTS volumes (1 mm isotropic)."""

MIN_SIDE = 16
"""Smallest accepted side length: below it the anatomy is not resolved at all."""

LAYOUTS: tuple[str, ...] = ("brats2021", "brats2020", "brats2023", "msd", "csv")
"""Folder layouts :func:`generate_cohort` can write (the same ones discovery reads)."""

# Clean tissue signal per modality, relative to a modality's white matter in T1/T1ce and to its
# brightest tissue otherwise. Orders follow clinical appearance: T1 WM > GM > CSF; T2 CSF > GM >
# WM; FLAIR suppresses CSF and shows oedema bright; the enhancing rim lights up only after
# contrast (T1ce), the necrotic core is dark on T1/T1ce and bright on T2.
_TISSUES: tuple[str, ...] = (
    "gm",
    "wm",
    "deep_gm",
    "csf",
    "oedema",
    "enhancing",
    "necrosis",
    "scalp",
)
_CONTRAST: dict[str, dict[str, float]] = {
    "t1": {"gm": 0.62, "wm": 1.00, "deep_gm": 0.74, "csf": 0.22, "oedema": 0.52,
           "enhancing": 0.62, "necrosis": 0.30, "scalp": 1.25},
    "t1ce": {"gm": 0.64, "wm": 1.00, "deep_gm": 0.76, "csf": 0.22, "oedema": 0.55,
             "enhancing": 1.70, "necrosis": 0.32, "scalp": 1.25},
    "t2": {"gm": 0.68, "wm": 0.45, "deep_gm": 0.58, "csf": 1.50, "oedema": 1.15,
           "enhancing": 0.85, "necrosis": 1.30, "scalp": 0.90},
    "flair": {"gm": 0.72, "wm": 0.55, "deep_gm": 0.66, "csf": 0.15, "oedema": 1.30,
              "enhancing": 0.95, "necrosis": 0.55, "scalp": 0.95},
}  # fmt: skip
# Scanner-like units (arbitrary, in the range real BraTS files have).
_BASE_INTENSITY: dict[str, float] = {"t1": 700.0, "t1ce": 900.0, "t2": 1400.0, "flair": 800.0}

# Brain semi-axes as fractions of the half field of view (x: left-right, y: anterior-posterior,
# z: inferior-superior), matching how a brain fills a 240x240x155 BraTS volume.
_BRAIN_SEMI_AXES = np.array([0.64, 0.77, 0.80])


def _channel_tuple(value, name: str, default: float) -> tuple[float, float, float, float]:
    """A per-modality value as a 4-tuple in :data:`aad_med.CHANNELS` order."""
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(CHANNELS))
        if unknown:
            raise ConfigError(
                f"{name}: unknown channel(s) {unknown}; channels are {list(CHANNELS)}"
            )
        return tuple(float(value.get(ch, default)) for ch in CHANNELS)
    if isinstance(value, int | float):
        return (float(value),) * 4
    values = tuple(float(v) for v in value)
    if len(values) != len(CHANNELS):
        raise ConfigError(
            f"{name}: expected {len(CHANNELS)} values ({', '.join(CHANNELS)}), got {len(values)}"
        )
    return values


@dataclass(frozen=True)
class SiteParams:
    """One acquisition site: scanner, protocol and population, as controlled shifts.

    Effects are applied in acquisition order: tissue contrast -> ``gamma`` -> ``bias_field`` ->
    ``blur_sigma`` / ``downsample`` (point-spread function) -> Rician ``noise`` -> ``scale`` and
    ``offset`` (receiver gain) -> background set to exactly 0 (skull-stripped, as BraTS).

    Args:
        name: label recorded in the cohort's ``synthetic.json``.
        scale: per-modality intensity gain, a 4-tuple in ``t1, t1ce, t2, flair`` order, a dict
            keyed by channel (missing channels 1) or one number for all. Noise scales with it.
        offset: per-modality additive intensity offset (same forms; missing channels 0), applied
            inside the brain only so the background stays 0.
        bias_field: strength ``s`` of a smooth multiplicative low-order field ``exp(s * f(x))``
            with ``f`` of zero mean and ``max |f| = 1`` over the field of view; 0 = none.
            ``0.05`` (reference) is mild (+-5 %), ``0.35`` is 7x stronger (x0.70 to x1.42).
        noise: Rician noise standard deviation as a fraction of white-matter intensity (per
            modality, before ``scale``); 0 = noiseless.
        blur_sigma: Gaussian point-spread function in voxels; 0 = none.
        downsample: acquisition resolution as a factor of the 1 mm grid (one number, or one per
            axis, e.g. ``(1, 1, 3)`` for 3 mm slices): the image is low-pass filtered, reduced
            and interpolated back; 1 = full resolution.
        gamma: contrast change ``I -> ref * (I / ref) ** gamma`` on intensities normalised by the
            modality's brightest tissue; 1 = none, > 1 darkens mid-tones.
        tumour_prevalence: fraction of subjects with a tumour (BraTS: 1). Whether subject ``i``
            has one is a fixed draw compared with this value, so raising it only adds tumours.
        tumour_size: tumour radius relative to the population default (1); the oedema scales
            with it.
        brain_size: brain (and head) size relative to the default (1, fills a BraTS field of
            view like a real brain); at most 1.3 so the head fits.
        skull_stripped: ``False`` adds a skull-and-scalp rim around the brain (as before skull
            stripping); BraTS releases are skull-stripped.
    """

    name: str = "custom"
    scale: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    offset: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    bias_field: float = 0.05
    noise: float = 0.03
    blur_sigma: float = 0.0
    downsample: float | tuple[float, float, float] = 1.0
    gamma: float = 1.0
    tumour_prevalence: float = 1.0
    tumour_size: float = 1.0
    brain_size: float = 1.0
    skull_stripped: bool = True

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise the accepted forms once, here
        set_(self, "scale", _channel_tuple(self.scale, "scale", 1.0))
        set_(self, "offset", _channel_tuple(self.offset, "offset", 0.0))
        ds = self.downsample
        if isinstance(ds, int | float):
            set_(self, "downsample", float(ds))
        else:
            ds = tuple(float(v) for v in ds)
            if len(ds) != 3:
                raise ConfigError(
                    f"downsample: expected one factor or 3 (one per axis), got {len(ds)}"
                )
            set_(self, "downsample", ds)
        for key in ("bias_field", "noise", "blur_sigma", "gamma", "tumour_prevalence",
                    "tumour_size", "brain_size"):  # fmt: skip
            set_(self, key, float(getattr(self, key)))
        set_(self, "skull_stripped", bool(self.skull_stripped))
        self._check()

    def _check(self) -> None:
        problems = []
        if any(not np.isfinite(s) or s <= 0 for s in self.scale):
            problems.append(f"scale must be > 0 for every channel, got {self.scale}")
        if any(not np.isfinite(o) for o in self.offset):
            problems.append(f"offset must be finite, got {self.offset}")
        checks = [
            ("bias_field", 0.0 <= self.bias_field <= 2.0, "between 0 and 2"),
            ("noise", 0.0 <= self.noise <= 2.0, "between 0 and 2"),
            ("blur_sigma", 0.0 <= self.blur_sigma <= 10.0, "between 0 and 10 voxels"),
            ("gamma", 0.1 <= self.gamma <= 10.0, "between 0.1 and 10"),
            ("tumour_prevalence", 0.0 <= self.tumour_prevalence <= 1.0, "between 0 and 1"),
            ("tumour_size", 0.1 <= self.tumour_size <= 2.5, "between 0.1 and 2.5"),
            ("brain_size", 0.5 <= self.brain_size <= 1.3, "between 0.5 and 1.3"),
        ]
        for key, ok, rule in checks:
            if not ok:
                problems.append(f"{key} must be {rule}, got {getattr(self, key)!r}")
        factors = self.downsample_factors
        if any(not 1.0 <= f <= 8.0 for f in factors):
            problems.append(f"downsample factors must be between 1 and 8, got {self.downsample}")
        if problems:
            raise ConfigError(f"site {self.name!r}: " + "; ".join(problems))

    @property
    def downsample_factors(self) -> tuple[float, float, float]:
        """``downsample`` as one factor per axis."""
        ds = self.downsample
        return (ds, ds, ds) if isinstance(ds, float) else tuple(ds)

    def with_updates(self, **changes) -> SiteParams:
        """A copy with some fields changed (validated), e.g. ``site.with_updates(noise=0.12)``.

        Raises:
            ConfigError: an unknown field or an invalid value.
        """
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ConfigError(f"unknown site parameter(s) {unknown}; known: {sorted(names)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Primitive form (JSON-ready), inverse of ``SiteParams(**d)``."""
        d = dataclasses.asdict(self)
        d["scale"], d["offset"] = list(self.scale), list(self.offset)
        if isinstance(self.downsample, tuple):
            d["downsample"] = list(self.downsample)
        return d


_REFERENCE = SiteParams(name="reference")
SITES: dict[str, SiteParams] = {
    # The baseline scanner and population (BraTS-like: every subject has a tumour).
    "reference": _REFERENCE,
    # Single acquisition shifts, each alone, at the severities of the sensitivity targets.
    "noise": _REFERENCE.with_updates(name="noise", noise=0.12),
    "blur": _REFERENCE.with_updates(name="blur", blur_sigma=1.2),
    "gamma": _REFERENCE.with_updates(name="gamma", gamma=1.5),
    "bias": _REFERENCE.with_updates(name="bias", bias_field=0.35),
    "intensity": _REFERENCE.with_updates(name="intensity", scale=(1.5, 1.5, 1.5, 1.5)),
    "resolution": _REFERENCE.with_updates(name="resolution", downsample=(1.0, 1.0, 3.0)),
    # Another scanner: several milder acquisition shifts together.
    "scanner_b": _REFERENCE.with_updates(
        name="scanner_b", noise=0.10, blur_sigma=0.8, gamma=1.35, bias_field=0.20
    ),
    # Another population on the reference scanner: smaller brains, larger tumours.
    "population_b": _REFERENCE.with_updates(name="population_b", brain_size=0.88, tumour_size=1.5),
    # Both at once (the demo's shifted cohort).
    "site_b": _REFERENCE.with_updates(
        name="site_b",
        noise=0.10,
        blur_sigma=0.8,
        gamma=1.35,
        bias_field=0.20,
        brain_size=0.88,
        tumour_size=1.5,
    ),  # fmt: skip
    # No tumours (a healthy-control cohort), and a cohort that was not skull-stripped.
    "healthy": _REFERENCE.with_updates(name="healthy", tumour_prevalence=0.0),
    "skull": _REFERENCE.with_updates(name="skull", skull_stripped=False),
}
"""Named sites. Single-shift presets differ from ``reference`` in one field only."""


def get_site(site: SiteParams | str) -> SiteParams:
    """A site by name (see :data:`SITES`) or the given :class:`SiteParams` unchanged.

    Raises:
        ConfigError: an unknown name.
    """
    if isinstance(site, SiteParams):
        return site
    if site not in SITES:
        raise ConfigError(f"unknown site {site!r}; known sites: {', '.join(SITES)}")
    return SITES[site]


def subject_seed(seed: int, index: int) -> np.random.SeedSequence:
    """The seed of subject ``index`` of a cohort generated with ``seed``."""
    if seed < 0 or index < 0:
        raise ConfigError(f"seed and subject index must be >= 0, got seed={seed}, index={index}")
    return np.random.SeedSequence(int(seed), spawn_key=(int(index),))


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    try:
        out = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise ConfigError(f"shape must be three integers, got {shape!r}") from None
    if len(out) != 3 or any(s < MIN_SIDE for s in out):
        raise ConfigError(f"shape must be three integers >= {MIN_SIDE}, got {tuple(shape)}")
    if int(np.prod(out)) > 64 * 1024 * 1024:
        raise ConfigError(f"shape {out} is too large (more than 64M voxels)")
    return out


# --------------------------------------------------------------------------------------------
# Anatomy


@dataclass
class _Draws:
    """Every random number of one subject's anatomy, drawn in a fixed order and count so that
    site parameters never shift the stream."""

    values: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def draw(cls, rng: np.random.Generator) -> _Draws:
        v: dict[str, np.ndarray] = {}
        v["axes"] = 1.0 + 0.04 * rng.standard_normal(3)
        v["global"] = 1.0 + 0.04 * rng.standard_normal(1)
        v["centre"] = 0.02 * rng.standard_normal(3)
        v["angles"] = np.deg2rad(4.0) * rng.standard_normal(3)
        # Large-scale deformation: 3 components x 2 separable cosine terms.
        v["def_amp"] = 0.035 * rng.standard_normal((3, 2))
        v["def_freq"] = rng.uniform(0.4, 1.4, (3, 2, 3))
        v["def_phase"] = rng.uniform(0, 2 * np.pi, (3, 2, 3))
        # Gyral folding pattern (a few separable oriented waves).
        v["gyri_freq"] = rng.uniform(6.0, 11.0, (6, 3))
        v["gyri_phase"] = rng.uniform(0, 2 * np.pi, (6, 3))
        v["gyri_amp"] = rng.uniform(0.5, 1.0, 6)
        v["wm_radius"] = 0.76 + 0.02 * rng.standard_normal(1)
        v["ventricles"] = np.exp(0.2 * rng.standard_normal(3))  # size, left/right asymmetry
        v["texture_freq"] = rng.uniform(6.0, 14.0, (3, 3))
        v["texture_phase"] = rng.uniform(0, 2 * np.pi, (3, 3))
        # Tumour (drawn even when the subject ends up without one).
        v["tumour_u"] = rng.uniform(0, 1, 1)
        v["tumour_dir"] = rng.standard_normal(3)
        v["tumour_depth"] = rng.uniform(0.15, 0.5, 1)
        v["tumour_radius"] = np.exp(0.2 * rng.standard_normal(1))
        v["tumour_necrosis"] = rng.uniform(0.45, 0.7, 1)  # core radius / tumour radius
        v["tumour_oedema"] = rng.uniform(1.4, 1.9, 1)  # oedema radius / tumour radius
        v["tumour_lobes_freq"] = rng.uniform(5.0, 10.0, (2, 3))
        v["tumour_lobes_phase"] = rng.uniform(0, 2 * np.pi, (2, 3))
        v["oedema_freq"] = rng.uniform(3.0, 7.0, (2, 3))
        v["oedema_phase"] = rng.uniform(0, 2 * np.pi, (2, 3))
        return cls(v)

    def __getitem__(self, key: str) -> np.ndarray:
        return self.values[key]


def _grid(shape: tuple[int, int, int]) -> list[np.ndarray]:
    """Per-axis coordinates in [-1, 1] (half field of view units), float32, 1D."""
    return [((np.arange(n, dtype=np.float32) - (n - 1) / 2) / (n / 2)) for n in shape]


def _separable_waves(axes1d, freqs, phases, amps) -> np.ndarray:
    """Sum of products of 1D cosines: a smooth random 3D field for the price of one product per
    term (the 3D arrays are only formed by broadcasting)."""
    out = None
    for f, p, a in zip(freqs, phases, amps, strict=True):
        cx, cy, cz = (np.cos(np.pi * f[k] * axes1d[k] + p[k]).astype(np.float32) for k in range(3))
        term = (np.float32(a) * cx)[:, None, None] * cy[None, :, None] * cz[None, None, :]
        out = term if out is None else out + term
    return out


def _ramp(x: np.ndarray, width: float) -> np.ndarray:
    """Soft step 0 -> 1 over ``width`` around 0: partial-volume fractions at tissue edges."""
    return np.clip(0.5 + x / np.float32(width), 0.0, 1.0, dtype=np.float32)


def _rotation(angles: np.ndarray) -> np.ndarray:
    a, b, c = angles
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _anatomy(draws: _Draws, site: SiteParams, shape, has_tumour: bool):
    """Tissue fractions (partition of unity inside the head), head mask and seg."""
    axes1d = _grid(shape)
    # Large-scale deformation in field-of-view coordinates, then the brain frame.
    disp = [
        _separable_waves(axes1d, draws["def_freq"][k], draws["def_phase"][k], draws["def_amp"][k])
        for k in range(3)
    ]
    semi = _BRAIN_SEMI_AXES * draws["axes"] * draws["global"][0] * site.brain_size
    rot = _rotation(draws["angles"]).astype(np.float32)
    centre = draws["centre"]
    w = [
        (axes1d[k].reshape([-1 if i == k else 1 for i in range(3)]) - np.float32(centre[k]))
        + disp[k]
        for k in range(3)
    ]
    q = [
        (rot[k, 0] * w[0] + rot[k, 1] * w[1] + rot[k, 2] * w[2]) / np.float32(semi[k])
        for k in range(3)
    ]
    del w, disp
    # The base of the brain is flatter than its top.
    qz_shape = np.where(q[2] < 0, q[2] * np.float32(1.12), q[2])
    r = np.sqrt(q[0] ** 2 + q[1] ** 2 + qz_shape**2)
    del qz_shape
    # One voxel in brain-frame units, for partial-volume edges.
    vox = float(np.mean([2.0 / n / s for n, s in zip(shape, semi, strict=True)]))

    brain = _ramp(1.0 - r, vox)
    if site.skull_stripped:
        head, scalp = brain, None
        mask = brain > 0
    else:
        head = _ramp(1.14 - r, vox)
        # Skull (dark on every sequence) between brain and scalp; scalp (fat) outside it.
        scalp = _ramp(r - 1.07, vox) * head
        mask = head > 0

    gyri = _separable_waves(axes1d, draws["gyri_freq"], draws["gyri_phase"], draws["gyri_amp"])
    gyri /= np.float32(np.sqrt((draws["gyri_amp"] ** 2).sum() / 8))  # about unit std

    # Tumour geometry (also used for mass effect on the deep structures).
    tumour_radius = 0.27 * site.tumour_size * float(draws["tumour_radius"][0])
    tdir = draws["tumour_dir"] / (np.linalg.norm(draws["tumour_dir"]) + 1e-9)
    depth = min(float(draws["tumour_depth"][0]) + 0.3, max(0.0, 0.85 - tumour_radius))
    tc = tdir * depth
    if has_tumour:
        dq = [q[k] - np.float32(tc[k]) for k in range(3)]
        d2 = dq[0] ** 2 + dq[1] ** 2 + dq[2] ** 2
        # Mass effect: deep structures are sampled closer to the tumour centre, so they appear
        # pushed away from it.
        push = np.float32(0.45) * np.exp(-d2 / np.float32((1.6 * tumour_radius) ** 2))
        qd = [q[k] - push * dq[k] for k in range(3)]
        rd = np.sqrt(qd[0] ** 2 + qd[1] ** 2 + qd[2] ** 2)
    else:
        qd, rd = q, r

    wm = _ramp(float(draws["wm_radius"][0]) - rd - 0.07 * gyri, vox)
    # Sulcal CSF where the folding pattern peaks near the surface, plus a thin outer rim and
    # the interhemispheric fissure above the corpus callosum.
    sulci = _ramp(gyri - 1.1, 0.3) * _ramp(r - 0.84, 0.08)
    rim = _ramp(r - 0.97, vox)
    fissure = _ramp(0.02 - np.abs(q[0]), vox) * _ramp(qd[2] - 0.25, 0.1)
    vs = draws["ventricles"]
    vent = None
    for side, size in ((-1, vs[0] * vs[1]), (1, vs[0] / vs[1])):
        # Lateral ventricles: curved ellipsoids either side of the midline.
        cz = qd[2] - np.float32(0.18) + np.float32(0.35) * qd[1] ** 2
        rv = np.sqrt(
            ((qd[0] - np.float32(side * 0.13)) / np.float32(0.09 * size)) ** 2
            + (qd[1] / np.float32(0.38 * size)) ** 2
            + (cz / np.float32(0.11 * size)) ** 2
        )
        v = _ramp(1.0 - rv, 3 * vox)
        vent = v if vent is None else np.maximum(vent, v)
    csf = np.maximum(np.maximum(sulci, rim), np.maximum(fissure, vent))
    deep = None
    for side in (-1, 1):
        rdg = np.sqrt(
            ((qd[0] - np.float32(side * 0.24)) / np.float32(0.11)) ** 2
            + ((qd[1] + np.float32(0.05)) / np.float32(0.2)) ** 2
            + ((qd[2] + np.float32(0.02)) / np.float32(0.13)) ** 2
        )
        dg = _ramp(1.0 - rdg, 3 * vox)
        deep = dg if deep is None else np.maximum(deep, dg)

    zeros = np.zeros(shape, np.float32)
    nec, core, oed = zeros, zeros, zeros
    if has_tumour:
        lobes = _separable_waves(
            axes1d, draws["tumour_lobes_freq"], draws["tumour_lobes_phase"], np.ones(2)
        )
        rt = np.sqrt(d2) / np.float32(tumour_radius) + np.float32(0.12) * lobes
        tvox = vox / tumour_radius
        core = _ramp(1.0 - rt, tvox)
        nec = _ramp(float(draws["tumour_necrosis"][0]) - rt, tvox)
        # Oedema: irregular, and it spreads along white matter more than into the cortex.
        irregular = _separable_waves(
            axes1d, draws["oedema_freq"], draws["oedema_phase"], np.ones(2)
        )
        oed = _ramp(float(draws["tumour_oedema"][0]) - rt - 0.25 * irregular, tvox)
        oed *= 0.35 + 0.65 * wm
        oed *= brain
        core *= brain
        nec *= brain

    # Partition of unity: each tissue takes what higher-priority tissues left.
    fractions: dict[str, np.ndarray] = {}
    rest = head.copy()
    for name, f in (
        ("scalp", scalp),
        ("necrosis", nec),
        ("enhancing", core),
        ("csf", csf),
        ("oedema", oed),
        ("deep_gm", deep),
        ("wm", wm),
    ):
        if f is None:
            continue
        wgt = f * rest
        fractions[name] = wgt
        rest = rest - wgt
    if scalp is not None:
        # Skull between brain and scalp: signal-free bone, kept inside the head mask.
        skull = _ramp(r - 1.0, vox) * rest
        rest = rest - skull
    fractions["gm"] = rest

    seg = np.zeros(shape, np.int16)
    if has_tumour:
        seg[fractions["oedema"] >= 0.5] = 2
        seg[fractions["enhancing"] >= 0.5] = 4
        seg[fractions["necrosis"] >= 0.5] = 1
        # Tumour intensities are heterogeneous (patchy enhancement, mixed necrosis).
    texture = _separable_waves(axes1d, draws["texture_freq"], draws["texture_phase"], np.ones(3))
    texture /= np.float32(3.0)
    return fractions, mask, seg, texture, axes1d


# --------------------------------------------------------------------------------------------
# Acquisition


def _bias(rng: np.random.Generator, axes1d, strength: float) -> np.ndarray | float:
    """Smooth multiplicative field ``exp(strength * f)``: ``f`` is a low-order random field
    (separable cosines of wavelength longer than the field of view) rescaled to zero mean and
    ``max |f| = 1``, so ``strength`` is the log-range of the field, e.g. 0.35 -> x0.70 to x1.42.
    A new random pattern per modality, as each sequence has its own."""
    freqs = rng.uniform(0.2, 0.6, (3, 3))
    phases = rng.uniform(0, 2 * np.pi, (3, 3))
    amps = rng.standard_normal(3)
    if strength == 0:
        return 1.0
    f = _separable_waves(axes1d, freqs, phases, amps)
    f -= np.float32(f.mean())
    f /= np.float32(max(float(np.abs(f).max()), 1e-6))
    return np.exp(np.float32(strength) * f)


def _resample_psf(img: np.ndarray, factors: tuple[float, float, float]) -> np.ndarray:
    """Acquire at a coarser resolution and interpolate back to the 1 mm grid."""
    shape = img.shape
    sigma = [0.0 if f <= 1 else 0.42 * f for f in factors]  # FWHM ~ one coarse voxel
    low = ndimage.gaussian_filter(img, sigma, mode="constant")
    small = [max(2, round(n / f)) for n, f in zip(shape, factors, strict=True)]
    low = ndimage.zoom(low, [s / n for s, n in zip(small, shape, strict=True)], order=1,
                       mode="nearest", grid_mode=True)  # fmt: skip
    return ndimage.zoom(low, [n / s for n, s in zip(shape, low.shape, strict=True)], order=1,
                        mode="nearest", grid_mode=True).astype(np.float32)  # fmt: skip


def generate_subject(
    subject_id: str,
    site: SiteParams | str = "reference",
    seed: int | np.random.SeedSequence = 0,
    shape: Sequence[int] = DEFAULT_SHAPE,
) -> dict[str, np.ndarray]:
    """One synthetic subject in memory.

    Args:
        subject_id: the subject's name (used in error messages only: anatomy depends on the seed).
        site: a :class:`SiteParams` or the name of one in :data:`SITES`.
        seed: the subject's seed: an int, or the :class:`numpy.random.SeedSequence` of
            :func:`subject_seed` (what :func:`generate_cohort` passes).
        shape: volume size in voxels (1 mm isotropic).

    Returns:
        ``{"t1", "t1ce", "t2", "flair"}`` as float32 ``(X, Y, Z)`` arrays, zero outside the
        brain (head, when not skull-stripped) and non-zero inside, and ``"seg"`` as int16 with
        labels ``{0, 1, 2, 4}`` (all zero for a subject without a tumour).

    Raises:
        ConfigError: unknown site, invalid shape or seed.
    """
    site = get_site(site)
    shape = _check_shape(shape)
    if isinstance(seed, np.random.SeedSequence):
        ss = seed
    else:
        if int(seed) < 0:
            raise ConfigError(f"{subject_id}: seed must be >= 0, got {seed}")
        ss = np.random.SeedSequence(int(seed))
    anat_seq, acq_seq = ss.spawn(2)
    draws = _Draws.draw(np.random.default_rng(anat_seq))
    acq = np.random.default_rng(acq_seq)
    has_tumour = float(draws["tumour_u"][0]) < site.tumour_prevalence

    fractions, mask, seg, texture, axes1d = _anatomy(draws, site, shape, has_tumour)
    tumour_w = None
    if has_tumour:
        tumour_w = fractions["necrosis"] + fractions["enhancing"] + 0.5 * fractions["oedema"]
    # Tissue micro-texture: a few percent, stronger inside the tumour (patchy enhancement).
    tex_amp = (
        np.float32(0.04) if tumour_w is None else np.float32(0.04) + np.float32(0.25) * tumour_w
    )
    modulation = 1.0 + tex_amp * texture

    out: dict[str, np.ndarray] = {}
    factors = site.downsample_factors
    for c, ch in enumerate(CHANNELS):
        contrast = _CONTRAST[ch]
        base = _BASE_INTENSITY[ch]
        img = np.zeros(shape, np.float32)
        for tissue, frac in fractions.items():
            img += np.float32(contrast[tissue]) * frac
        img *= modulation
        ref = max(contrast.values())
        if site.gamma != 1.0:
            img = np.float32(ref) * (np.maximum(img, 0) / np.float32(ref)) ** np.float32(site.gamma)
        img *= np.float32(base)
        img *= _bias(acq, axes1d, site.bias_field)
        if any(f > 1 for f in factors):
            img = _resample_psf(img, factors)
        if site.blur_sigma > 0:
            img = ndimage.gaussian_filter(img, site.blur_sigma, mode="constant")
        # Rician noise: magnitude of a complex signal with Gaussian noise on both parts; sigma is
        # a fraction of this modality's white-matter signal (after gamma, before gain).
        wm_signal = base * ref * (contrast["wm"] / ref) ** site.gamma
        sigma = np.float32(site.noise * wm_signal)
        n_re = acq.standard_normal(shape, dtype=np.float32)
        n_im = acq.standard_normal(shape, dtype=np.float32)
        if sigma > 0:
            img = np.sqrt((img + sigma * n_re) ** 2 + (sigma * n_im) ** 2)
        img = img * np.float32(site.scale[c]) + np.float32(site.offset[c])
        img = np.where(mask, img, np.float32(0))
        # Keep every brain voxel non-zero: "foreground = non-zero" is how BraTS tools find it.
        img[mask & (img == 0)] = np.float32(1e-3)
        out[ch] = img.astype(np.float32, copy=False)
    out["seg"] = seg
    return out


# --------------------------------------------------------------------------------------------
# Writing cohorts


def brats_affine(shape: Sequence[int]) -> np.ndarray:
    """The 1 mm voxel-to-world matrix of BraTS releases (x and y flipped, origin at a corner)."""
    aff = np.diag([-1.0, -1.0, 1.0, 1.0])
    aff[1, 3] = float(shape[1] - 1)
    return aff


_ID_FORMATS: dict[str, tuple[str, str, int]] = {
    # layout: (default prefix, number format and suffix, first number)
    "brats2021": ("BraTS2021_", "{:05d}", 0),
    "brats2020": ("BraTS20_Training_", "{:03d}", 1),
    "brats2023": ("BraTS-GLI-", "{:05d}-000", 0),
    "msd": ("BRATS_", "{:03d}", 1),
    "csv": ("subject_", "{:05d}", 0),
}
_BRATS2023_SUFFIX = {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"}
_MSD_ORDER = ("flair", "t1", "t1ce", "t2")
_MSD_LABELS = {1: 2, 2: 1, 4: 3}  # BraTS necrosis/oedema/enhancing -> Decathlon labels


def subject_id_for(layout: str, index: int, id_prefix: str | None = None) -> str:
    """The subject ID :func:`generate_cohort` gives subject ``index`` in ``layout``."""
    prefix, fmt, first = _ID_FORMATS[layout]
    return (prefix if id_prefix is None else id_prefix) + fmt.format(index + first)


def _subject_files(layout: str, sid: str, with_seg: bool) -> dict[str, str]:
    """``{channel or "seg" or "image": path relative to the cohort root}`` of one subject."""
    if layout == "msd":
        out = {"image": f"imagesTr/{sid}.nii.gz"}
        if with_seg:
            out["seg"] = f"labelsTr/{sid}.nii.gz"
        return out
    if layout == "csv":
        # Flat files next to the manifest: a sub-folder would look like a BraTS subject folder.
        rel = {ch: f"{sid}_{ch}.nii.gz" for ch in (*CHANNELS, "seg")}
    else:
        ext = ".nii" if layout == "brats2020" else ".nii.gz"
        sep = "-" if layout == "brats2023" else "_"
        names = _BRATS2023_SUFFIX if layout == "brats2023" else {ch: ch for ch in CHANNELS}
        names = {**names, "seg": "seg"}
        rel = {ch: f"{sid}/{sid}{sep}{names[ch]}{ext}" for ch in (*CHANNELS, "seg")}
    if not with_seg:
        rel.pop("seg")
    return rel


def _write_subject(root: Path, layout: str, sid: str, vols: dict, affine, with_seg: bool) -> list:
    """Write one subject's files; returns the manifest row (paths relative to ``root``)."""
    rel = _subject_files(layout, sid, with_seg)
    if layout == "msd":
        stack = np.stack([vols[ch] for ch in _MSD_ORDER], axis=-1)
        write_nifti_atomic(root / rel["image"], stack, affine)
        if with_seg:
            seg = np.zeros_like(vols["seg"])
            for src, dst in _MSD_LABELS.items():
                seg[vols["seg"] == src] = dst
            write_nifti_atomic(root / rel["seg"], seg, affine)
        return []
    for ch in CHANNELS:
        write_nifti_atomic(root / rel[ch], vols[ch], affine)
    if with_seg:
        write_nifti_atomic(root / rel["seg"], vols["seg"], affine)
    return [sid, *(rel[ch] for ch in CHANNELS), rel.get("seg", "")]


PROVENANCE_FILE = "synthetic.json"
GENERATOR = "aad_med.data.synthetic"


def synthetic_batches(root: str | Path) -> list[dict] | None:
    """The batches recorded in ``root/synthetic.json`` when this generator wrote the folder,
    else ``None`` (no such file, or not ours)."""
    path = Path(root) / PROVENANCE_FILE
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("generator") != GENERATOR:
        return None
    return [b for b in doc.get("batches", []) if isinstance(b, dict)]


def check_output_folder(
    out_dir: str | Path,
    site: SiteParams,
    layout: str,
    indices: Sequence[int],
    id_prefix: str | None = None,
    with_seg: bool = True,
) -> None:
    """Refuse to write a cohort where it would clobber or mix: a folder holding files this
    generator did not write (real scans, another tool's output), a folder holding another
    site's or layout's synthetic cohort, or files of the same names already there.

    ``aad-synth`` calls this unless ``--force``; :func:`generate_cohort` itself stays a plain
    writer (the demo's ``train/`` mixes sites on purpose).

    Raises:
        InputError: names the folder (or the first existing file) and says to pass ``--force``.
    """
    root = Path(out_dir)
    if not root.is_dir() or not any(root.iterdir()):
        return
    force = "choose another folder, or pass --force to write there anyway"
    batches = synthetic_batches(root)
    if batches is None:
        shown = ", ".join(sorted(p.name for p in root.iterdir())[:3])
        raise InputError(root, f"holds files aad-synth did not write ({shown}, ...); {force}")
    others = [b for b in batches if b.get("site") != site.to_dict() or b.get("layout") != layout]
    if others:
        theirs = others[0].get("site", {}).get("name", "?")
        raise InputError(
            root,
            f"holds a synthetic cohort of another site or layout ({theirs}, "
            f"{others[0].get('layout')}); writing site {site.name} ({layout}) there would mix "
            "them in one cohort; " + force,
        )
    for i in indices:
        sid = subject_id_for(layout, int(i), id_prefix)
        for rel in _subject_files(layout, sid, with_seg).values():
            if os.path.lexists(root / rel):
                raise InputError(
                    root / rel,
                    f"already exists (subject {sid}); use --start-index to add other subjects, "
                    + force,
                )


def _write_msd_dataset_json(root: Path) -> None:
    images = sorted(p.name for p in (root / "imagesTr").glob("*.nii.gz"))
    labels = (
        {p.name for p in (root / "labelsTr").glob("*.nii.gz")}
        if (root / "labelsTr").is_dir()
        else set()
    )
    meta = {
        "name": "BRATS",
        "description": "Synthetic gliomas (aad_med.data.synthetic), Decathlon Task01 layout",
        "tensorImageSize": "4D",
        "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
        "labels": {
            "0": "background",
            "1": "edema",
            "2": "non-enhancing tumor",
            "3": "enhancing tumour",
        },
        "numTraining": len(images),
        "numTest": 0,
        "training": [
            {"image": f"./imagesTr/{n}", **({"label": f"./labelsTr/{n}"} if n in labels else {})}
            for n in images
        ],
        "test": [],
    }
    write_bytes_atomic(root / "dataset.json", (json.dumps(meta, indent=4) + "\n").encode())


def _merge_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    """Write ``rows`` into ``path`` keeping rows of other subjects already there (so cohorts can
    be written in several calls), sorted by subject ID."""
    merged: dict[str, list[str]] = {}
    if path.is_file():
        with path.open(newline="") as fh:
            for row in csv.reader(fh):
                if row and row != header:
                    merged[row[0]] = row
    for row in rows:
        merged[row[0]] = row
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(merged[k] for k in sorted(merged))
    write_bytes_atomic(path, buf.getvalue().encode())


def _merge_provenance(path: Path, entry: dict) -> None:
    batches: list = []
    if path.is_file():
        try:
            batches = list(json.loads(path.read_text()).get("batches", []))
        except (ValueError, AttributeError):
            batches = []
    if entry not in batches:
        batches.append(entry)
    text = json.dumps({"generator": GENERATOR, "batches": batches}, indent=2)
    write_bytes_atomic(path, (text + "\n").encode())


def generate_cohort(
    out_dir: str | Path,
    n_subjects: int = 8,
    site: SiteParams | str = "reference",
    seed: int = 0,
    shape: Sequence[int] = DEFAULT_SHAPE,
    layout: str = "brats2021",
    id_prefix: str | None = None,
    with_seg: bool = True,
    start_index: int = 0,
) -> Path:
    """Write a synthetic cohort as real NIfTI files in a BraTS-style layout.

    Subject ``start_index + i`` gets the seed :func:`subject_seed` ``(seed, start_index + i)``,
    so cohorts of different sites with the same ``seed`` share anatomy, and ``start_index``
    gives other subjects of the same population. Calling again with another ``start_index``
    adds subjects to the same folder (the manifest or ``dataset.json`` is updated).

    Layouts (subject ``k``):

    * ``brats2021``: ``BraTS2021_0000k/BraTS2021_0000k_{t1,t1ce,t2,flair,seg}.nii.gz``
    * ``brats2020``: ``BraTS20_Training_00(k+1)/…_{t1,t1ce,t2,flair,seg}.nii`` (uncompressed)
    * ``brats2023``: ``BraTS-GLI-0000k-000/BraTS-GLI-0000k-000-{t1n,t1c,t2w,t2f,seg}.nii.gz``
    * ``msd``: ``imagesTr/BRATS_00(k+1).nii.gz`` 4D in FLAIR, T1w, T1gd, T2w order,
      ``labelsTr/`` with Decathlon labels (1 oedema, 2 non-enhancing/necrotic, 3 enhancing),
      ``dataset.json``
    * ``csv``: ``subject_0000k_{t1,t1ce,t2,flair,seg}.nii.gz`` and ``manifest.csv``
      (``subject_id,t1,t1ce,t2,flair,seg``, paths relative to the CSV)

    Every layout also gets ``synthetic.json`` (site parameters, seed, shape) at its root.

    Args:
        out_dir: the cohort folder (created).
        n_subjects: number of subjects to write.
        site: a :class:`SiteParams` or a name in :data:`SITES`.
        seed: cohort seed; changes the anatomy of every subject.
        shape: volume size (1 mm isotropic voxels); :data:`BRATS_SHAPE` for real BraTS size.
        layout: one of :data:`LAYOUTS`.
        id_prefix: replaces the layout's ID prefix (e.g. ``"BraTS2021_"``).
        with_seg: write segmentations (all-zero for subjects without a tumour).
        start_index: index of the first subject.

    Returns:
        The cohort folder.

    Raises:
        ConfigError: invalid arguments. InputError: the folder cannot be written.
    """
    site = get_site(site)
    shape = _check_shape(shape)
    if layout not in LAYOUTS:
        raise ConfigError(f"unknown layout {layout!r}; known layouts: {', '.join(LAYOUTS)}")
    if int(n_subjects) < 1:
        raise ConfigError(f"n_subjects must be >= 1, got {n_subjects}")
    if int(start_index) < 0 or int(seed) < 0:
        raise ConfigError(f"seed and start_index must be >= 0, got {seed} and {start_index}")
    root = Path(out_dir)
    if root.exists() and not root.is_dir():
        raise InputError(root, "exists and is not a folder")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(root, f"cannot create folder ({e.strerror or e})") from None

    affine = brats_affine(shape)
    rows = []
    for i in range(int(start_index), int(start_index) + int(n_subjects)):
        sid = subject_id_for(layout, i, id_prefix)
        vols = generate_subject(sid, site, subject_seed(seed, i), shape)
        rows.append(_write_subject(root, layout, sid, vols, affine, with_seg))

    if layout == "msd":
        _write_msd_dataset_json(root)
    elif layout == "csv":
        _merge_csv(root / "manifest.csv", ["subject_id", *CHANNELS, "seg"], rows)
    _merge_provenance(
        root / PROVENANCE_FILE,
        {
            "site": site.to_dict(),
            "seed": int(seed),
            "start_index": int(start_index),
            "n_subjects": int(n_subjects),
            "shape": list(shape),
            "layout": layout,
            "with_seg": bool(with_seg),
        },
    )
    return root
