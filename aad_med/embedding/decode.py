"""Showing a latent difference in image space: decode the two cohorts' mean latent vectors and
subtract, so a user sees what the distance looks like as a (patch-sized) image."""

from __future__ import annotations

import numpy as np
import torch

from aad_med.device import resolve_device


def decode_mean_difference(
    model: torch.nn.Module,
    mean_a: np.ndarray,
    mean_b: np.ndarray,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """``decode(mean_b) - decode(mean_a)`` as a ``(C, p, p, p)`` float32 array.

    Args:
        model: the autoencoder (``decode(z) -> (B, C, p, p, p)``).
        mean_a: ``(latent_dim,)`` mean latent of cohort A.
        mean_b: ``(latent_dim,)`` mean latent of cohort B.
        device: where to decode.
    """
    device = resolve_device(device)
    model = model.to(device).eval()
    z = torch.as_tensor(np.stack([mean_a, mean_b]), dtype=torch.float32, device=device)
    with torch.inference_mode():
        x = model.decode(z).float().cpu().numpy()
    return (x[1] - x[0]).astype(np.float32)
