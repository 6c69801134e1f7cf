"""Stage 2, models: the 3D convolutional autoencoder with a vector latent.

Built from MONAI blocks (``Convolution``, ``ResidualUnit``) with MONAI's argument names. One API
everywhere: ``encode(x) -> z`` of shape ``(batch, latent_dim)``, ``decode(z) -> x_hat``,
``forward(x) -> x_hat``; the variational variant adds ``encode_dist(x) -> (mu, logvar)`` and
``forward(x, return_kl=True) -> (x_hat, kl)``. ``encode_features(x)`` exposes every encoder
stage's activation maps for multi-scale embeddings. No data loading or file access here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from monai.networks.blocks import Convolution, ResidualUnit
from torch import nn

MODEL_NAME = "ConvAutoencoder"


def _primitive(value: Any) -> Any:
    """Tuples -> lists (recursively) so the config survives ``torch.load(weights_only=True)``
    and OmegaConf alike."""
    if isinstance(value, tuple | list):
        return [_primitive(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _primitive(v) for k, v in value.items()}
    return value


def _layer_name(layer: Any) -> str:
    """``"INSTANCE"`` or ``("instance", {...})`` -> ``"instance"``."""
    if layer is None:
        return ""
    if isinstance(layer, tuple | list):
        layer = layer[0] if layer else ""
    return str(layer).lower()


def _as_layer_arg(layer: Any) -> Any:
    """MONAI expects ``(name, kwargs)`` tuples; configs and checkpoints store lists."""
    if isinstance(layer, list):
        return tuple(layer)
    return layer


class ConvAutoencoder(nn.Module):
    """3D conv autoencoder mapping a ``(B, C, p, p, p)`` patch to a ``(B, latent_dim)`` vector.

    Encoder: one MONAI ``ResidualUnit`` (or ``Convolution`` when ``num_res_units == 0``) per
    entry of ``channels``/``strides``; flatten; linear to the latent. Decoder mirrors it with
    transposed convolutions, as ``monai.networks.nets.AutoEncoder`` does, ending in a plain
    convolution so the output is unbounded (inputs are z-scored).

    Args:
        spatial_dims: 3 for volumes (2 works for slices).
        in_channels: input channels (4: t1, t1ce, t2, flair).
        out_channels: output channels; ``None`` means ``in_channels``.
        channels: feature channels of each encoder stage.
        strides: downsampling stride of each encoder stage (same length as ``channels``).
        latent_dim: size of the latent vector.
        patch_size: edge of the cubic input patch; must be divisible by ``prod(strides)``.
        kernel_size: odd convolution kernel size.
        num_res_units: sub-units per residual unit; 0 uses plain convolutions.
        act: MONAI activation name or ``(name, kwargs)``.
        norm: MONAI normalisation name or ``(name, kwargs)``.
        dropout: dropout probability inside the blocks.
        variational: predict ``(mu, logvar)`` and sample the latent during training.

    Raises:
        ValueError: inconsistent ``channels``/``strides``, an even kernel, or a patch size the
            strides cannot reduce to a whole number of voxels (at least 2 with instance norm).
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 4,
        out_channels: int | None = None,
        channels: Sequence[int] = (16, 32, 64),
        strides: Sequence[int] = (2, 2, 2),
        latent_dim: int = 32,
        patch_size: int = 32,
        kernel_size: int = 3,
        num_res_units: int = 1,
        act: str | Sequence | None = "PRELU",
        norm: str | Sequence | None = "INSTANCE",
        dropout: float = 0.0,
        variational: bool = False,
    ):
        super().__init__()
        channels = [int(c) for c in channels]
        strides = [int(s) for s in strides]
        out_channels = in_channels if out_channels is None else int(out_channels)
        if not channels or len(channels) != len(strides):
            raise ValueError(
                f"channels and strides must be non-empty and of equal length, got {channels} and {strides}"
            )
        if any(c < 1 for c in channels) or any(s < 1 for s in strides):
            raise ValueError(f"channels and strides must be positive, got {channels} and {strides}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
        if latent_dim < 1:
            raise ValueError(f"latent_dim must be positive, got {latent_dim}")
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        reduction = math.prod(strides)
        if patch_size < 1 or patch_size % reduction != 0:
            raise ValueError(
                f"patch_size {patch_size} cannot be reduced by strides {strides}: it must be a "
                f"multiple of {reduction}"
            )
        bottleneck = patch_size // reduction
        if bottleneck < 2 and _layer_name(norm).startswith("instance"):
            raise ValueError(
                f"patch_size {patch_size} with strides {strides} leaves 1 voxel at the bottleneck, "
                f"where instance norm is undefined: use a patch of at least {2 * reduction}"
            )

        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.channels = channels
        self.strides = strides
        self.latent_dim = latent_dim
        self.patch_size = patch_size
        self.kernel_size = kernel_size
        self.num_res_units = num_res_units
        self.act = _primitive(act)
        self.norm = _primitive(norm)
        self.dropout = float(dropout)
        self.variational = bool(variational)
        self.bottleneck_shape = (channels[-1],) + (bottleneck,) * spatial_dims

        act_arg, norm_arg = _as_layer_arg(self.act), _as_layer_arg(self.norm)
        drop_arg = self.dropout if self.dropout > 0 else None
        block = {
            "spatial_dims": spatial_dims,
            "kernel_size": kernel_size,
            "act": act_arg,
            "norm": norm_arg,
            "dropout": drop_arg,
        }

        self.encoder = nn.ModuleList()
        c_in = in_channels
        for c, s in zip(channels, strides, strict=True):
            if num_res_units > 0:
                stage = ResidualUnit(
                    in_channels=c_in, out_channels=c, strides=s, subunits=num_res_units, **block
                )
            else:
                stage = Convolution(in_channels=c_in, out_channels=c, strides=s, **block)
            self.encoder.append(stage)
            c_in = c

        flat = math.prod(self.bottleneck_shape)
        self.to_latent = nn.Linear(flat, latent_dim * (2 if self.variational else 1))
        self.from_latent = nn.Linear(latent_dim, flat)

        self.decoder = nn.Sequential()
        dec_channels = list(reversed(channels[:-1])) + [out_channels]
        c_in = channels[-1]
        for i, (c, s) in enumerate(zip(dec_channels, reversed(strides), strict=True)):
            is_last = i == len(dec_channels) - 1
            layer = nn.Sequential()
            layer.add_module(
                "conv",
                Convolution(
                    in_channels=c_in,
                    out_channels=c,
                    strides=s,
                    is_transposed=True,
                    conv_only=is_last and num_res_units == 0,
                    **block,
                ),
            )
            if num_res_units > 0:
                layer.add_module(
                    "resunit",
                    ResidualUnit(
                        in_channels=c,
                        out_channels=c,
                        strides=1,
                        subunits=1,
                        last_conv_only=is_last,
                        **block,
                    ),
                )
            self.decoder.add_module(f"up{i}", layer)
            c_in = c

    def model_config(self) -> dict:
        """Primitive-only constructor arguments: ``build_model(m.model_config())`` rebuilds it."""
        return {
            "name": MODEL_NAME,
            "spatial_dims": self.spatial_dims,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "channels": list(self.channels),
            "strides": list(self.strides),
            "latent_dim": self.latent_dim,
            "patch_size": self.patch_size,
            "kernel_size": self.kernel_size,
            "num_res_units": self.num_res_units,
            "act": self.act,
            "norm": self.norm,
            "dropout": self.dropout,
            "variational": self.variational,
        }

    def _check_input(self, x: torch.Tensor) -> None:
        expected = (self.in_channels,) + (self.patch_size,) * self.spatial_dims
        if tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"expected input of shape (batch, {', '.join(map(str, expected))}), got {tuple(x.shape)}"
            )

    def encode_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Activation maps of every encoder stage, ``(B, channels[i], ...)`` each, finest first."""
        self._check_input(x)
        feats = []
        h = x
        for stage in self.encoder:
            h = stage(h)
            feats.append(h)
        return feats

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encode_features(x)[-1]
        return self.to_latent(torch.flatten(h, 1))

    def encode_dist(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of the latent, each ``(B, latent_dim)``.

        Raises:
            ValueError: the model is not variational.
        """
        if not self.variational:
            raise ValueError("encode_dist needs a variational model (variational=True)")
        mu, logvar = self._head(x).chunk(2, dim=1)
        return mu, logvar

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The latent vector ``(B, latent_dim)``; the posterior mean for the variational model."""
        if self.variational:
            return self.encode_dist(x)[0]
        return self._head(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Reconstruct ``(B, out_channels, p, p, p)`` patches from ``(B, latent_dim)`` latents."""
        h = self.from_latent(z).view(z.shape[0], *self.bottleneck_shape)
        return self.decoder(h)

    def forward(
        self, x: torch.Tensor, return_kl: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Reconstruct ``x``.

        The variational model samples the latent in training mode (reparameterisation, drawing
        from torch's global RNG so seeded runs repeat) and uses the mean in eval mode.

        Args:
            x: ``(B, in_channels, p, p, p)`` patches.
            return_kl: also return the KL divergence to N(0, I), summed over latent dimensions
                and averaged over the batch (a zero scalar for the plain autoencoder). Passing it
                through ``forward`` keeps it working under ``DistributedDataParallel``.

        Returns:
            ``x_hat``, or ``(x_hat, kl)`` when ``return_kl``.
        """
        if self.variational:
            mu, logvar = self.encode_dist(x)
            z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
            x_hat = self.decode(z)
            if not return_kl:
                return x_hat
            kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1).mean()
            return x_hat, kl
        x_hat = self.decode(self._head(x))
        if not return_kl:
            return x_hat
        return x_hat, x_hat.new_zeros(())

    def forward_with_kl(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward(x, return_kl=True)``: reconstruction and KL term."""
        return self.forward(x, return_kl=True)


def build_model(config: dict) -> ConvAutoencoder:
    """Rebuild a model from :meth:`ConvAutoencoder.model_config` (or a Hydra ``model`` node).

    Keys ``name`` and ``_target_`` are accepted and ignored beyond a name check.

    Raises:
        ValueError: an unknown model name or invalid arguments.
    """
    config = dict(config)
    name = config.pop("name", MODEL_NAME)
    config.pop("_target_", None)
    if name != MODEL_NAME:
        raise ValueError(f"unknown model {name!r}; this version builds {MODEL_NAME!r}")
    try:
        return ConvAutoencoder(**config)
    except TypeError as e:
        raise ValueError(f"invalid model config: {e}") from None
