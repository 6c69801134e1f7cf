"""Shape cases, the ValueError cases and the rebuild contract of the autoencoder."""

from __future__ import annotations

import pytest
import torch

from aad_med.models import ConvAutoencoder, build_model

SHAPE_CASES = [
    # kwargs, batch
    ({"channels": (4, 8), "strides": (2, 2), "patch_size": 8, "latent_dim": 4}, 2),
    ({"channels": (4, 8), "strides": (2, 2), "patch_size": 16, "latent_dim": 6}, 1),
    ({"channels": (4, 8, 8), "strides": (2, 2, 1), "patch_size": 16, "latent_dim": 3}, 2),
    ({"channels": (4, 8), "strides": (2, 2), "patch_size": 8, "num_res_units": 0}, 2),
    ({"channels": (4, 8), "strides": (2, 2), "patch_size": 8, "num_res_units": 2}, 2),
    ({"channels": (4, 8), "strides": (2, 2), "patch_size": 8, "out_channels": 1}, 2),
    ({"channels": (4, 8), "strides": (2, 2), "patch_size": 8, "norm": "BATCH", "act": "RELU"}, 3),
    ({"channels": (4, 8), "strides": (2, 2), "patch_size": 8, "variational": True}, 2),
    ({"channels": (4, 8), "strides": (2, 2), "patch_size": 8, "dropout": 0.2}, 2),
    ({"channels": (4, 8), "strides": (2, 2), "patch_size": 8, "kernel_size": 5}, 2),
    ({"spatial_dims": 2, "channels": (4, 8), "strides": (2, 2), "patch_size": 8}, 2),
]


@pytest.mark.parametrize("kwargs,batch", SHAPE_CASES)
def test_shapes(kwargs, batch):
    torch.manual_seed(0)
    m = ConvAutoencoder(**kwargs)
    dims = kwargs.get("spatial_dims", 3)
    p = kwargs["patch_size"]
    x = torch.randn(batch, 4, *([p] * dims))
    out_c = kwargs.get("out_channels") or 4
    assert m(x).shape == (batch, out_c, *([p] * dims))
    z = m.encode(x)
    assert z.shape == (batch, m.latent_dim)
    assert m.decode(z).shape == (batch, out_c, *([p] * dims))
    feats = m.encode_features(x)
    assert len(feats) == len(kwargs["channels"])
    size = p
    for f, c, s in zip(feats, kwargs["channels"], kwargs["strides"], strict=True):
        size //= s
        assert f.shape == (batch, c, *([size] * dims))
    x_hat, kl = m(x, return_kl=True)
    assert x_hat.shape == (batch, out_c, *([p] * dims))
    assert kl.shape == ()
    if not m.variational:
        assert kl.item() == 0.0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"patch_size": 12, "strides": (2, 2, 2)}, "multiple of 8"),
        ({"patch_size": 30, "strides": (2, 2, 2)}, "cannot be reduced"),
        ({"patch_size": 8, "strides": (2, 2, 2)}, "instance norm"),
        ({"channels": (4, 8), "strides": (2, 2, 2)}, "equal length"),
        ({"kernel_size": 4}, "odd"),
        ({"latent_dim": 0}, "latent_dim"),
    ],
)
def test_invalid_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ConvAutoencoder(**kwargs)


def test_wrong_input_shape_is_a_value_error():
    m = ConvAutoencoder(channels=(4, 8), strides=(2, 2), patch_size=8)
    with pytest.raises(ValueError, match="expected input of shape"):
        m(torch.randn(1, 4, 16, 16, 16))


def test_variational_encode_is_the_mean_and_eval_is_deterministic():
    torch.manual_seed(0)
    m = ConvAutoencoder(
        channels=(4, 8), strides=(2, 2), patch_size=8, latent_dim=5, variational=True
    )
    x = torch.randn(2, 4, 8, 8, 8)
    mu, logvar = m.encode_dist(x)
    assert mu.shape == logvar.shape == (2, 5)
    assert torch.equal(m.encode(x), mu)
    m.train()
    a, kl = m.forward_with_kl(x)
    b = m(x)
    assert not torch.equal(a, b), "training mode samples the latent"
    assert kl.item() > 0
    m.eval()
    assert torch.equal(m(x), m(x))
    assert torch.allclose(m(x), m.decode(mu))


def test_encode_dist_needs_variational():
    m = ConvAutoencoder(channels=(4, 8), strides=(2, 2), patch_size=8)
    with pytest.raises(ValueError, match="variational"):
        m.encode_dist(torch.randn(1, 4, 8, 8, 8))


def test_model_config_rebuilds_identical_model():
    torch.manual_seed(0)
    m = ConvAutoencoder(
        channels=(4, 8), strides=(2, 2), patch_size=8, latent_dim=3, act=("prelu", {"init": 0.1})
    )
    cfg = m.model_config()
    allowed = (int, float, str, bool, list, dict, type(None))

    def check(v):
        assert isinstance(v, allowed), v
        if isinstance(v, list):
            [check(i) for i in v]
        if isinstance(v, dict):
            [check(i) for i in v.values()]

    check(cfg)
    m2 = build_model(cfg)
    m2.load_state_dict(m.state_dict())
    x = torch.randn(2, 4, 8, 8, 8)
    m.eval()
    m2.eval()
    assert torch.equal(m(x), m2(x))
    assert m2.model_config() == cfg


def test_build_model_rejects_unknown_name_and_arguments():
    with pytest.raises(ValueError, match="unknown model"):
        build_model({"name": "UNet"})
    with pytest.raises(ValueError, match="invalid model config"):
        build_model({"bogus": 1})


def test_gradients_reach_every_parameter():
    m = ConvAutoencoder(channels=(4, 8), strides=(2, 2), patch_size=8, variational=True)
    x = torch.randn(2, 4, 8, 8, 8)
    x_hat, kl = m(x, return_kl=True)
    ((x_hat - x) ** 2).mean().add(kl).backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None]
    assert not missing
