"""Segmentation stage: scoring a segmenter on a cohort — per-subject Dice (HD95 optional) with
sliding-window inference over the whole preprocessed volume, and per-cohort means with bootstrap
intervals.

Dice follows the BraTS convention for empty regions: a subject with no voxel of a region in its
ground truth scores 1 when the prediction has none either, else 0 (MONAI ``compute_dice`` with
``ignore_empty=False``). Scores are computed in the preprocessed space (RAS, resampled to the
segmenter's spacing, cropped to the brain), the space the network sees. HD95 is ``NaN`` when a
region is empty in the truth or the prediction. Subjects without a segmentation are listed as
unscored, never counted as 0.

With ``task_features`` the same inference pass also reads the segmenter's own per-subject
features (:data:`TASK_FEATURES`): per region, its mean confidence around its predicted boundary
(:func:`boundary_confidence`). Distances between cohorts of these vectors are task-aware: they
see what the segmenter sees. (Its pooled bottleneck features, the "task features" of FRD-style
distances, were measured too and predicted the Dice drop worse: BENCHMARKS.md.)

Reads images only through the data stage; writes nothing.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from aad_med.data.datasets import build_eval_dataset
from aad_med.data.preprocessing import PreprocessingConfig
from aad_med.data.records import SubjectRecord
from aad_med.errors import ConfigError
from aad_med.segmentation.network import Segmenter
from aad_med.segmentation.regions import region_masks

log = logging.getLogger("aad_med.segmentation")

TASK_FEATURES: tuple[str, ...] = ("confidence",)
"""Per-subject task feature blocks of :func:`evaluate_cohort` (``task_features=True``)."""


@dataclass
class CohortScores:
    """Per-subject scores of one cohort.

    Attributes:
        regions: the region names (columns of ``dice`` and ``hd95``).
        subject_ids: scored subjects, in cohort order.
        dice: ``(n, R)`` Dice per subject and region.
        hd95: ``(n, R)`` HD95 in mm of the preprocessed grid, or ``None`` when not computed.
        unscored: subjects left out because they have no segmentation.
        features: ``{block: (n, F)}`` task features (:data:`TASK_FEATURES`), or ``None`` when
            not asked for.
    """

    regions: tuple[str, ...]
    subject_ids: list[str]
    dice: np.ndarray
    hd95: np.ndarray | None = None
    unscored: list[str] = field(default_factory=list)
    features: dict[str, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.subject_ids)

    def score(self, region: str = "WT") -> np.ndarray:
        """The Dice of every subject for one region."""
        return self.dice[:, self.regions.index(region)]


@torch.no_grad()
def predict_logits(
    model: Segmenter,
    image: torch.Tensor,
    patch_size: int,
    device: torch.device,
    sw_batch_size: int = 4,
    overlap: float = 0.25,
) -> torch.Tensor:
    """Region logits ``(R, X, Y, Z)`` (CPU, float32) of one preprocessed ``(4, X, Y, Z)`` image by
    Gaussian-weighted sliding-window inference (bf16 autocast on CUDA); a voxel is in a region
    where its logit is > 0."""
    from monai.inferers import sliding_window_inference

    x = image[None].to(device, torch.float32)
    ctx = (
        torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else torch.autocast(device_type="cpu", enabled=False)
    )
    with ctx:
        logits = sliding_window_inference(
            x, (patch_size,) * 3, sw_batch_size, model, overlap=overlap, mode="gaussian"
        )
    return logits.float()[0].cpu()


def boundary_confidence(logits: torch.Tensor) -> np.ndarray:
    """Per region, the model's mean confidence ``|2p - 1|`` over the voxels it gives any tumour
    probability (``p > 0.1``): the band around its predicted boundary, where a shift it cannot
    handle shows first (a difference of confidences predicts accuracy loss: Guillory et al.
    2021). A region with no such voxel is confidently absent: 1.

    Args:
        logits: ``(R, X, Y, Z)`` region logits of one subject.

    Returns:
        ``(R,)`` float64 in [0, 1].
    """
    prob = torch.sigmoid(logits.double()).flatten(1)
    near = prob > 0.1
    confidence = torch.where(
        near.any(dim=1),
        ((2 * prob - 1).abs() * near).sum(dim=1) / near.sum(dim=1).clamp(min=1),
        torch.ones(prob.shape[0], dtype=torch.float64),
    )
    return confidence.numpy()


def evaluate_cohort(
    model: Segmenter,
    records: Sequence[SubjectRecord],
    preprocessing: PreprocessingConfig,
    device: str | torch.device = "cpu",
    convention: str = "brats",
    sw_batch_size: int = 4,
    overlap: float = 0.25,
    hd95: bool = False,
    progress: bool = False,
    task_features: bool = False,
) -> CohortScores:
    """Dice (and optionally HD95) of every subject with a segmentation.

    Args:
        model: the trained segmenter (its ``regions`` are scored).
        records: the subjects.
        preprocessing: the segmenter's preprocessing (its patch size is the window).
        device: where inference runs.
        convention: label convention of the cohort's segmentations.
        sw_batch_size, overlap: sliding-window settings.
        hd95: also compute the 95th percentile Hausdorff distance.
        progress: a tqdm bar over subjects.
        task_features: also read the segmenter's own features per subject
            (:data:`TASK_FEATURES`).

    Raises:
        ConfigError: no subject of ``records`` has a segmentation.
        InputError: a file of a subject cannot be read (named).
    """
    device = torch.device(device)
    model = model.to(device).eval()
    regions = tuple(model.regions)
    labelled = [r for r in records if r.seg is not None]
    unscored = [r.subject_id for r in records if r.seg is None]
    if not labelled:
        raise ConfigError("no subject has a segmentation (seg) file, so none can be scored")
    dataset = build_eval_dataset(labelled, preprocessing, cache="none")
    ids, dice_rows, hd_rows = [], [], []
    feature_rows: dict[str, list[np.ndarray]] = {k: [] for k in TASK_FEATURES}
    items = range(len(dataset))
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, desc="segmenting", unit="subject", leave=False)
    for i in items:
        item = dataset[i]
        ids.append(str(item["subject_id"]))
        logits = predict_logits(
            model, item["image"], preprocessing.patch_size, device, sw_batch_size, overlap
        )
        if task_features:
            feature_rows["confidence"].append(boundary_confidence(logits))
        _score_subject(logits, item["seg"], regions, convention, hd95, dice_rows, hd_rows)
    if unscored:
        log.info("%d subject(s) without a segmentation were not scored", len(unscored))
    return CohortScores(
        regions=regions,
        subject_ids=ids,
        dice=np.asarray(dice_rows, dtype=np.float64).reshape(len(ids), len(regions)),
        hd95=np.asarray(hd_rows, dtype=np.float64) if hd95 else None,
        unscored=unscored,
        features={k: np.stack(v) for k, v in feature_rows.items()} if task_features else None,
    )


def _score_subject(
    logits: torch.Tensor,
    seg,
    regions: Sequence[str],
    convention: str,
    hd95: bool,
    dice_rows: list,
    hd_rows: list,
) -> None:
    """Append one subject's Dice row (and HD95 row) for the thresholded ``logits``."""
    from monai.metrics import compute_dice, compute_hausdorff_distance

    pred = (logits > 0).float()[None]
    truth = region_masks(torch.as_tensor(seg)[None], regions, convention)
    dice_rows.append(
        compute_dice(pred, truth, include_background=True, ignore_empty=False)[0].numpy()
    )
    if hd95:
        empty = (pred.sum(dim=(2, 3, 4)) == 0) | (truth.sum(dim=(2, 3, 4)) == 0)
        hd = torch.full((len(regions),), math.nan)
        if not bool(empty.all()):
            hd = compute_hausdorff_distance(pred, truth, include_background=True, percentile=95)[
                0
            ].float()
            hd[empty[0]] = math.nan
        hd_rows.append(hd.numpy())


def summarize_scores(
    scores: Sequence[float] | np.ndarray, n_bootstrap: int = 1000, seed: int = 0
) -> dict:
    """Mean of per-subject scores with a 95% percentile bootstrap interval over subjects.

    Returns:
        ``{"n", "mean", "ci95": [lo, hi], "sd"}``; with one subject the interval is
        ``[mean, mean]`` (nothing to resample).

    Raises:
        ConfigError: no scores, non-finite scores, or ``n_bootstrap < 1``.
    """
    from aad_med.distances.bootstrap import bootstrap_means, percentile_interval

    x = np.asarray(scores, dtype=np.float64).reshape(-1)
    if x.size == 0:
        raise ConfigError("no scores to summarise")
    if not np.all(np.isfinite(x)):
        raise ConfigError("scores must be finite numbers")
    if int(n_bootstrap) < 1:
        raise ConfigError(f"n_bootstrap must be >= 1, got {n_bootstrap}")
    mean = float(x.mean())
    if x.size == 1:
        lo = hi = mean
    else:
        boots = bootstrap_means(x[:, None], int(n_bootstrap), np.random.default_rng([seed, 16]))
        lo, hi = (float(v[0]) for v in percentile_interval(boots))
    sd = float(x.std(ddof=1)) if x.size > 1 else 0.0
    return {"n": int(x.size), "mean": mean, "ci95": [lo, hi], "sd": sd}
