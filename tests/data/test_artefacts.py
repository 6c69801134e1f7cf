"""Calibration artefacts: deterministic per seed, identity at severity 0, background kept at 0,
metadata kept, and each artefact's effect grows with severity in the way it should (noise raises
local variance, blur and downsampling lower gradient energy, gamma and scale move percentiles,
the bias field's log has the requested spread)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from scipy import ndimage

from aad_med.data.artefacts import (
    ARTEFACTS,
    DEFAULT_SEVERITIES,
    apply_artefact,
    artefact_seed,
    severity_ladders,
)
from aad_med.data.synthetic import generate_subject, subject_seed
from aad_med.errors import ConfigError

SHAPE = (32, 36, 28)


@pytest.fixture(scope="module")
def subject() -> tuple[MetaTensor, torch.Tensor]:
    v = generate_subject("S0", "reference", subject_seed(0, 0), SHAPE)
    image = np.stack([v[c] for c in ("t1", "t1ce", "t2", "flair")])
    affine = torch.diag(torch.tensor([-1.0, -1.0, 1.0, 1.0], dtype=torch.float64))
    img = MetaTensor(torch.from_numpy(image), affine=affine)
    return img, (img.as_subclass(torch.Tensor) != 0).any(dim=0)


def _plain(x) -> np.ndarray:
    return np.asarray(torch.as_tensor(x).as_subclass(torch.Tensor), dtype=np.float64)


def _interior(mask: torch.Tensor, erode: int = 2) -> np.ndarray:
    return ndimage.binary_erosion(mask.numpy(), iterations=erode)


def _gradient_energy(img: np.ndarray, inside: np.ndarray) -> float:
    total = 0.0
    for c in range(img.shape[0]):
        g = np.gradient(img[c])
        total += float(sum((gi[inside] ** 2).mean() for gi in g))
    return total


def _local_variance(img: np.ndarray, inside: np.ndarray) -> float:
    # Residual after a 3x3x3 mean: high-frequency power, which noise raises.
    out = 0.0
    for c in range(img.shape[0]):
        smooth = ndimage.uniform_filter(img[c], 3)
        out += float(((img[c] - smooth)[inside] ** 2).mean())
    return out


@pytest.mark.parametrize("name", list(ARTEFACTS))
def test_deterministic_identity_at_zero_and_background_zero(subject, name):
    img, mask = subject
    top = DEFAULT_SEVERITIES[name][-1]
    a = apply_artefact(img, name, top, seed=7)
    b = apply_artefact(img, name, top, seed=7)
    assert torch.equal(a.as_subclass(torch.Tensor), b.as_subclass(torch.Tensor))
    assert isinstance(a, MetaTensor) and torch.equal(a.affine, img.affine)
    assert a.dtype == torch.float32 and a.shape == img.shape
    out = _plain(a)
    assert np.all(out[:, ~mask.numpy()] == 0)
    assert np.isfinite(out).all() and (out >= 0).all()
    assert not np.allclose(out, _plain(img))
    # The input is never modified, and severity 0 is an exact copy.
    same = apply_artefact(img, name, 0.0, seed=7)
    assert torch.equal(same.as_subclass(torch.Tensor), img.as_subclass(torch.Tensor))
    assert same.data_ptr() != img.data_ptr()


@pytest.mark.parametrize("name", ["noise", "bias"])
def test_seed_changes_the_random_pattern(subject, name):
    img, _ = subject
    a = _plain(apply_artefact(img, name, DEFAULT_SEVERITIES[name][-1], seed=1))
    b = _plain(apply_artefact(img, name, DEFAULT_SEVERITIES[name][-1], seed=2))
    assert not np.allclose(a, b)


def test_artefact_seed_stable_and_distinct():
    s = artefact_seed(0, "BraTS2021_00001", "noise")
    assert s == artefact_seed(0, "BraTS2021_00001", "noise")
    others = {
        artefact_seed(1, "BraTS2021_00001", "noise"),
        artefact_seed(0, "BraTS2021_00002", "noise"),
        artefact_seed(0, "BraTS2021_00001", "bias"),
    }
    assert s not in others and len(others) == 3


def test_noise_raises_local_variance_with_severity(subject):
    img, mask = subject
    inside = _interior(mask)
    values = [
        _local_variance(_plain(apply_artefact(img, "noise", s, seed=3)), inside)
        for s in (0.0, 0.02, 0.05, 0.1, 0.2)
    ]
    assert all(b > a for a, b in zip(values, values[1:], strict=False)), values
    assert values[-1] > 1.5 * values[0]


@pytest.mark.parametrize(
    ("name", "severities"),
    [("blur", (0.0, 0.5, 1.0, 2.0)), ("downsample", (0.0, 0.5, 1.0, 2.0))],
)
def test_blur_and_downsampling_lower_gradient_energy(subject, name, severities):
    img, mask = subject
    inside = _interior(mask)
    energy = [
        _gradient_energy(_plain(apply_artefact(img, name, s, seed=0)), inside) for s in severities
    ]
    assert all(b < a for a, b in zip(energy, energy[1:], strict=False)), energy


def test_blur_does_not_darken_the_brain_edge(subject):
    img, mask = subject
    out = _plain(apply_artefact(img, "blur", 2.0))
    edge = mask.numpy() & ~_interior(mask, 1)
    # Normalised convolution: edge voxels average brain voxels only, not the zero background
    # (which a plain Gaussian mixes in).
    src = _plain(img)
    naive = np.stack([ndimage.gaussian_filter(src[c], 2.0, mode="constant") for c in range(4)])
    assert out[:, edge].mean() >= 0.8 * src[:, edge].mean()
    assert out[:, edge].mean() > 1.3 * naive[:, edge].mean()


def test_gamma_lowers_normalised_percentiles(subject):
    img, mask = subject
    m = mask.numpy()

    def median_fraction(x):
        x = _plain(x)
        return [float(np.median(x[c][m]) / x[c].max()) for c in range(x.shape[0])]

    med = [median_fraction(apply_artefact(img, "gamma", s)) for s in (0.0, 0.25, 0.5, 1.0)]
    for c in range(4):
        assert all(
            b < a for a, b in zip([r[c] for r in med], [r[c] for r in med[1:]], strict=False)
        )
    # Max and zero are fixed points of the min-max gamma curve.
    out = _plain(apply_artefact(img, "gamma", 1.0))
    assert np.allclose(out.max(axis=(1, 2, 3)), _plain(img).max(axis=(1, 2, 3)), rtol=1e-5)


def test_scale_multiplies_every_percentile(subject):
    img, mask = subject
    m = mask.numpy()
    base = np.percentile(_plain(img)[0][m], [5, 50, 95])
    for s in (0.1, 0.5):
        out = np.percentile(_plain(apply_artefact(img, "scale", s))[0][m], [5, 50, 95])
        assert np.allclose(out, base * (1 + s), rtol=1e-5)


def test_bias_field_log_spread_equals_severity(subject):
    img, mask = subject
    m = mask.numpy()
    src = _plain(img)
    for s in (0.05, 0.2, 0.4):
        out = _plain(apply_artefact(img, "bias", s, seed=5))
        log_field = np.log(out[0][m] / src[0][m])
        assert log_field.std() == pytest.approx(s, rel=1e-3)
        # One smooth field for every channel (the coil), not per-channel noise.
        assert np.allclose(np.log(out[3][m] / src[3][m]), log_field, atol=1e-4)


def test_gibbs_difference_grows_with_alpha(subject):
    img, _ = subject
    src = _plain(img)
    diffs = [
        np.abs(_plain(apply_artefact(img, "gibbs", a)) - src).mean() for a in (0.2, 0.4, 0.6, 0.8)
    ]
    assert all(b > a for a, b in zip(diffs, diffs[1:], strict=False)), diffs


def test_plain_arrays_and_explicit_mask(subject):
    img, mask = subject
    arr = _plain(img).astype(np.float32)
    out = apply_artefact(arr, "noise", 0.1, seed=3, brain=mask[None])
    ref = apply_artefact(img, "noise", 0.1, seed=3)
    assert type(out) is torch.Tensor
    assert torch.allclose(out, ref.as_subclass(torch.Tensor))


@pytest.mark.parametrize(
    ("name", "severity", "match"),
    [
        ("ringing", 0.1, "unknown artefact 'ringing'"),
        ("noise", -0.1, "severity of noise must be a finite number >= 0"),
        ("noise", float("nan"), "finite number"),
        ("gibbs", 1.0, "severity of gibbs must be <= 0.99"),
    ],
)
def test_invalid_artefact_or_severity(subject, name, severity, match):
    with pytest.raises(ConfigError, match=match):
        apply_artefact(subject[0], name, severity)


def test_shape_errors(subject):
    img, mask = subject
    with pytest.raises(ValueError, match=r"\(C, X, Y, Z\)"):
        apply_artefact(img[0], "noise", 0.1)
    with pytest.raises(ValueError, match="does not match"):
        apply_artefact(img, "noise", 0.1, brain=mask[:-1])


def test_severity_ladders():
    ladders = severity_ladders(["noise", "blur"], {"noise": [0.2, 0.05, 0.05]})
    assert ladders == {"noise": [0.0, 0.05, 0.2], "blur": [0.0, *DEFAULT_SEVERITIES["blur"]]}
    assert list(severity_ladders(["blur", "noise"])) == ["blur", "noise"]
    with pytest.raises(ConfigError, match="unknown artefact 'x'"):
        severity_ladders(["x"])
    with pytest.raises(ConfigError, match="severities for unknown artefact"):
        severity_ladders(["noise"], {"nosie": [0.1]})
    with pytest.raises(ConfigError, match="listed twice"):
        severity_ladders(["noise", "noise"])
    with pytest.raises(ConfigError, match="at least one severity above 0"):
        severity_ladders(["noise"], {"noise": [0.0]})
    with pytest.raises(ConfigError, match="artefacts is empty"):
        severity_ladders([])
