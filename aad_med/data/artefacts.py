"""Stage 1, data: MRI artefacts at graded severities, applied to a subject's RAW volume
(before reorientation, resampling, cropping and z-scoring), as a scanner or reconstruction would.

Every artefact is deterministic given ``(severity, seed)``, severity ``0`` is the identity, and the
random pattern of a subject (noise realisation, bias-field shape) depends only on the seed, so a
higher severity scales the same pattern: curves over severity are smooth and monotone by
construction rather than by luck of the draw.

The cohorts are skull-stripped (BraTS): the brain mask is taken from the clean volume and the
result is re-masked, so the background stays exactly 0 and the brain crop does not change.
Spatial filters (blur, downsampling) use normalised convolution inside the mask, so the edge of the
brain is not darkened by mixing with the zero background (a real scanner blurs into skull and CSF,
not into zeros).

Severity units (:data:`ARTEFACTS` holds the same text):

- ``bias``: standard deviation (inside the brain) of the log of a smooth multiplicative field, a
  random degree-3 Legendre polynomial like MONAI's ``RandBiasField`` but normalised so the
  severity is the field's strength (0.1 = about 10 % intensity variation).
- ``noise``: Rician noise (MONAI ``RandRicianNoise``) with sigma = severity x the channel's median
  brain intensity.
- ``gibbs``: MONAI ``GibbsNoise`` alpha (fraction of k-space truncated), magnitude image.
- ``blur``: Gaussian sigma in voxels (MONAI ``GaussianSmooth``).
- ``downsample``: resolution loss; the volume is averaged down by ``1 + severity`` along each axis
  and interpolated back (severity 1 = half resolution).
- ``scale``: global intensity gain ``1 + severity`` (per-subject z-scoring removes it entirely:
  its curve is the null, a check of the pipeline's invariance).
- ``gamma``: MONAI ``AdjustContrast`` with gamma ``1 + severity`` per channel.

Shift calibration (:mod:`aad_med.calibration`) applies these artefacts to reference subjects.
The subject generators keep their own acquisition models, on purpose: the real-scan cohorts
(:mod:`aad_med.data.real_scans`, a smoothed-noise bias field and Rician noise in these units)
and the synthetic sites (:mod:`aad_med.data.synthetic`). Drawing real-scan subjects with the
Legendre bias field here was tried and made the two real sources indistinguishable to a small
encoder (latent AAD permutation p 0.001 -> 0.43 in ``tests/data/test_real_scan_cohorts.py``).

Pure tensor code; never touches files.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import AdjustContrast, GaussianSmooth, GibbsNoise, RandRicianNoise

from aad_med.errors import ConfigError


@dataclass(frozen=True)
class ArtefactInfo:
    """What one artefact is and what its severity means."""

    name: str
    description: str
    severity_unit: str
    max_severity: float | None = None


ARTEFACTS: dict[str, ArtefactInfo] = {
    a.name: a
    for a in (
        ArtefactInfo(
            "bias",
            "smooth multiplicative bias field (random degree-3 polynomial of the log field)",
            "std of the log bias field inside the brain",
        ),
        ArtefactInfo(
            "noise",
            "Rician noise (MONAI RandRicianNoise)",
            "noise sigma / median brain intensity of the channel",
        ),
        ArtefactInfo(
            "gibbs",
            "Gibbs ringing from k-space truncation (MONAI GibbsNoise)",
            "GibbsNoise alpha (fraction of k-space removed)",
            max_severity=0.99,
        ),
        ArtefactInfo(
            "blur",
            "Gaussian blur (MONAI GaussianSmooth)",
            "Gaussian sigma in voxels",
        ),
        ArtefactInfo(
            "downsample",
            "resolution loss: area-averaged down by 1+severity, trilinear back up",
            "downsampling factor - 1",
        ),
        ArtefactInfo(
            "scale",
            "global intensity gain (removed by per-subject z-scoring: expect the null)",
            "gain - 1",
        ),
        ArtefactInfo(
            "gamma",
            "contrast change, per-channel gamma (MONAI AdjustContrast)",
            "gamma - 1",
        ),
    )
}
"""Known artefacts, in the order they are run and plotted."""

DEFAULT_SEVERITIES: dict[str, tuple[float, ...]] = {
    "bias": (0.05, 0.1, 0.2, 0.4),
    "noise": (0.02, 0.05, 0.1, 0.2),
    "gibbs": (0.2, 0.4, 0.6, 0.8),
    "blur": (0.5, 1.0, 1.5, 2.0),
    "downsample": (0.25, 0.5, 1.0, 2.0),
    "scale": (0.1, 0.25, 0.5),
    "gamma": (0.1, 0.25, 0.5, 1.0),
}
"""A graded ladder per artefact (severity 0, the reference itself, is always added)."""

_BIAS_DEGREE = 3


def check_artefact(name: str, severity: float) -> tuple[str, float]:
    """Validate an (artefact, severity) pair.

    Raises:
        ConfigError: unknown artefact, negative or non-finite severity, or one out of range.
    """
    if name not in ARTEFACTS:
        raise ConfigError(f"unknown artefact {name!r}; choose from {', '.join(ARTEFACTS)}")
    s = float(severity)
    if not np.isfinite(s) or s < 0:
        raise ConfigError(f"severity of {name} must be a finite number >= 0, got {severity!r}")
    top = ARTEFACTS[name].max_severity
    if top is not None and s > top:
        raise ConfigError(f"severity of {name} must be <= {top}, got {s}")
    return name, s


def artefact_seed(seed: int, subject_id: str, artefact: str) -> int:
    """The random seed of one subject's artefact pattern: stable across runs, cohort order and
    severities (so severities scale the same pattern), different between subjects and
    artefacts."""
    ss = np.random.SeedSequence(
        [int(seed), zlib.crc32(str(subject_id).encode()), zlib.crc32(artefact.encode())]
    )
    return int(ss.generate_state(1, dtype=np.uint32)[0])


def _legendre_field(shape: tuple[int, int, int], rng: np.random.Generator) -> torch.Tensor:
    """Random polynomial of total degree <= 3 in Legendre polynomials over ``[-1, 1]^3``."""
    axes = [np.linspace(-1.0, 1.0, n) for n in shape]
    legendre = [
        [np.polynomial.legendre.Legendre.basis(d)(x) for d in range(_BIAS_DEGREE + 1)] for x in axes
    ]
    field = np.zeros(shape, dtype=np.float64)
    for i in range(_BIAS_DEGREE + 1):
        for j in range(_BIAS_DEGREE + 1 - i):
            for k in range(_BIAS_DEGREE + 1 - i - j):
                if i + j + k == 0:
                    continue
                c = rng.standard_normal()
                field += c * np.einsum("i,j,k->ijk", legendre[0][i], legendre[1][j], legendre[2][k])
    return torch.from_numpy(field)


def _masked_filter(img: torch.Tensor, mask: torch.Tensor, fn) -> torch.Tensor:
    """``fn(img * mask) / fn(mask)`` inside the mask: a spatial filter that ignores the
    background instead of averaging zeros into the brain edge."""
    m = mask.to(img.dtype)[None]
    num = fn(img * m)
    den = fn(m)
    return torch.where(den > 1e-6, num / den.clamp_min(1e-6), img)


def _downsample_up(x: torch.Tensor, factor: float) -> torch.Tensor:
    shape = x.shape[1:]
    small = [max(1, int(round(n / factor))) for n in shape]
    down = F.interpolate(x[None], size=small, mode="area")
    return F.interpolate(down, size=list(shape), mode="trilinear", align_corners=False)[0]


def _brain_median(img: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-channel median intensity inside the mask (1 where a channel is empty)."""
    out = []
    for c in range(img.shape[0]):
        v = img[c][mask]
        out.append(v.median() if v.numel() else torch.tensor(1.0, dtype=img.dtype))
    med = torch.stack(out).to(img.dtype)
    return torch.where(med.abs() > 0, med.abs(), torch.ones_like(med))


def apply_artefact(
    image: torch.Tensor | np.ndarray,
    artefact: str,
    severity: float,
    seed: int = 0,
    brain: torch.Tensor | np.ndarray | None = None,
) -> torch.Tensor:
    """Apply one artefact to a raw multi-channel volume.

    Args:
        image: ``(C, X, Y, Z)`` raw intensities (not modified; a MONAI ``MetaTensor`` keeps its
            metadata).
        artefact: a name in :data:`ARTEFACTS`.
        severity: ``>= 0``; ``0`` returns an unchanged copy. Units: see the module docstring.
        seed: the subject's pattern seed (see :func:`artefact_seed`).
        brain: ``(X, Y, Z)`` or ``(1, X, Y, Z)`` mask; default: voxels non-zero in any channel.
            The output is 0 outside it.

    Returns:
        A new ``(C, X, Y, Z)`` float32 tensor (same type as ``image`` when it is a tensor).

    Raises:
        ConfigError: unknown artefact or invalid severity.
        ValueError: ``image`` is not 4-D or the mask does not match it.
    """
    artefact, s = check_artefact(artefact, severity)
    src = torch.as_tensor(image)
    if src.ndim != 4:
        raise ValueError(f"image must be (C, X, Y, Z), got shape {tuple(src.shape)}")
    x = src.detach().clone().to(torch.float32)
    plain = x.as_subclass(torch.Tensor)
    if brain is None:
        mask = (plain != 0).any(dim=0)
    else:
        mask = torch.as_tensor(brain).as_subclass(torch.Tensor).bool()
        mask = mask[0] if mask.ndim == 4 else mask
    if tuple(mask.shape) != tuple(plain.shape[1:]):
        raise ValueError(
            f"brain mask {tuple(mask.shape)} does not match image {tuple(plain.shape)}"
        )
    if s == 0:
        return x
    out = _apply(plain, mask, artefact, s, int(seed))
    out = torch.where(mask[None], out, torch.zeros((), dtype=out.dtype)).to(torch.float32)
    plain.copy_(out)
    return x


def _apply(x: torch.Tensor, mask: torch.Tensor, artefact: str, s: float, seed: int) -> torch.Tensor:
    if artefact == "bias":
        g = _legendre_field(tuple(x.shape[1:]), np.random.default_rng(seed))
        inside = g[mask]
        if inside.numel() > 1 and float(inside.std()) > 0:
            g = (g - inside.mean()) / inside.std()
        return x * torch.exp(s * g).to(x.dtype)[None]
    if artefact == "noise":
        sigma = (s * _brain_median(x, mask)).tolist()
        noise = RandRicianNoise(prob=1.0, std=sigma, channel_wise=True, sample_std=False)
        noise.set_random_state(seed=seed)
        return torch.as_tensor(noise(x.clone())).as_subclass(torch.Tensor)
    if artefact == "gibbs":
        ringing = torch.as_tensor(GibbsNoise(alpha=s)(x.clone())).as_subclass(torch.Tensor)
        return ringing.abs()
    if artefact == "blur":
        smooth = GaussianSmooth(sigma=s)
        return _masked_filter(
            x, mask, lambda v: torch.as_tensor(smooth(v)).as_subclass(torch.Tensor)
        )
    if artefact == "downsample":
        return _masked_filter(x, mask, lambda v: _downsample_up(v, 1.0 + s))
    if artefact == "scale":
        return x * (1.0 + s)
    if artefact == "gamma":
        contrast = AdjustContrast(gamma=1.0 + s)
        return torch.stack(
            [
                torch.as_tensor(contrast(x[c : c + 1])).as_subclass(torch.Tensor)[0]
                for c in range(x.shape[0])
            ]
        )
    raise ConfigError(f"unknown artefact {artefact!r}")


def severity_ladders(
    artefacts: list[str] | tuple[str, ...],
    severities: Mapping[str, list[float] | tuple[float, ...]] | None = None,
) -> dict[str, list[float]]:
    """Each chosen artefact's sorted severities, always starting with 0.

    Args:
        artefacts: names in :data:`ARTEFACTS`, in the order to run them.
        severities: per-artefact ladders; missing ones use :data:`DEFAULT_SEVERITIES`.

    Raises:
        ConfigError: unknown artefact, bad severity, duplicate artefact or an empty choice.
    """
    if not artefacts:
        raise ConfigError("artefacts is empty; choose some of " + ", ".join(ARTEFACTS))
    severities = dict(severities or {})
    unknown = [k for k in severities if k not in ARTEFACTS]
    if unknown:
        raise ConfigError(
            f"severities for unknown artefact(s) {', '.join(map(repr, unknown))}; "
            f"choose from {', '.join(ARTEFACTS)}"
        )
    out: dict[str, list[float]] = {}
    for name in artefacts:
        name = str(name)
        if name in out:
            raise ConfigError(f"artefact {name!r} is listed twice")
        ladder = severities.get(name, DEFAULT_SEVERITIES.get(name))
        if ladder is None:
            check_artefact(name, 0.0)
        if isinstance(ladder, int | float):
            ladder = [ladder]
        values = sorted({check_artefact(name, v)[1] for v in ladder} | {0.0})
        if len(values) < 2:
            raise ConfigError(f"artefact {name!r} needs at least one severity above 0")
        out[name] = values
    return out
