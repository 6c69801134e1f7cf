"""Segmentation stage: a MONAI segmentation network trained on one cohort and scored on others,
so the distances of :mod:`aad_med.distances` can be related to what a real model loses.

``network`` builds the segmenter (MONAI ``UNet`` or ``SegResNet``) from a
:class:`SegmenterConfig`; ``regions`` turns BraTS/Decathlon labels into the whole tumour (WT),
tumour core (TC) and enhancing tumour (ET) masks; ``training`` trains it with the project's loop
(:class:`aad_med.training.loop.Trainer`: atomic checkpoints, resume, bf16 on CUDA, tqdm and
TensorBoard); ``evaluation`` scores subjects with sliding-window inference and MONAI's Dice (HD95
optional) and summarises cohorts with bootstrap intervals.

This stage reads images only through :mod:`aad_med.data`; it writes only checkpoints (and
TensorBoard events) into the run folder it is given. It computes no dataset distances.
"""

from aad_med.segmentation.evaluation import CohortScores, evaluate_cohort, summarize_scores
from aad_med.segmentation.network import Segmenter, SegmenterConfig, build_segmenter, load_segmenter
from aad_med.segmentation.regions import REGIONS, region_masks, resolve_regions
from aad_med.segmentation.training import SegmentationTrainer, train_segmenter

__all__ = [
    "REGIONS",
    "CohortScores",
    "SegmentationTrainer",
    "Segmenter",
    "SegmenterConfig",
    "build_segmenter",
    "evaluate_cohort",
    "load_segmenter",
    "region_masks",
    "resolve_regions",
    "summarize_scores",
    "train_segmenter",
]
