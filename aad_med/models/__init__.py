"""Stage 2, models: the 3D convolutional autoencoder with a vector latent
(``encode(x) -> z``, ``decode(z) -> x_hat``, ``forward(x) -> x_hat``). No data loading here."""
