"""Stage 2, models: the 3D convolutional autoencoder with a vector latent
(``encode(x) -> z``, ``decode(z) -> x_hat``, ``forward(x) -> x_hat``). No data loading here."""

from aad_med.models.autoencoder import ConvAutoencoder, build_model

__all__ = ["ConvAutoencoder", "build_model"]
