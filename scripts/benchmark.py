#!/usr/bin/env python
"""Benchmarks of aad-med: each figure is a ratio against a baseline measured in the same run.

B1 data pipeline: naive MONAI ``Dataset`` (decode and preprocess every file every epoch) vs the
   project's default (memory cache), first epoch and steady state separately; plus the default
   with 2 loader workers and the disk cache.
B2 training step: fp32 eager (and, on CUDA only, bf16 autocast + ``cudnn.benchmark``,
   + ``channels_last_3d``, + ``torch.compile``), patches/s, FLOPs per step from
   ``torch.utils.flop_counter.FlopCounterMode``, MFU against a matmul rate measured here, loss
   agreement between the variants.
B3 loader efficiency: training steps/s fed by the default loader / steps/s on in-memory random
   tensors of the same shape.
B4 encoding: subjects/s embedding a cohort from ``.nii.gz``, the share of wall time spent
   decoding and preprocessing, per preprocessing step, and with 2 background workers.
B5 statistics: the vectorised AAD permutation test vs ``scipy.stats.permutation_test`` with the
   same statistic (time ratio, both p-values), 10,000 permutations at 2 x 1,000 x 256 (all
   threads and one thread), and ``compare_embeddings`` with every test at that size.
B6 memory: peak RSS of a fresh process embedding N vs 10 N tiny subjects (with the per-subject
image-quality rows, as aad-compare embeds).

Model, patch size, batch sizes, cache mode and worker counts are read from ``configs/`` so the
"default" rows measure what users get. Writes ``OUT/benchmark.json`` and ``OUT/benchmark.md``
and prints the table::

    python scripts/benchmark.py --out outputs/benchmark           # full (make bench)
    python scripts/benchmark.py --quick --out /tmp/bench          # about a minute on 2 cores
    python scripts/benchmark.py --only B5,B6 --out /tmp/bench     # some sections

CPU times on a shared machine are noisy: read the ratios, measured side by side, not the
absolute times.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

NOT_ON_CPU = "not measured (no GPU in this task)"
SECTIONS = ("B1", "B2", "B3", "B4", "B5", "B6")


@dataclass(frozen=True)
class Sizes:
    """Problem sizes of one benchmark mode."""

    b1_shape: tuple[int, int, int]
    b1_subjects: int
    b1_epochs: int
    patch_size: int | None  # None: data.patch_size from configs/ (model and preprocessing)
    b2_batch: int | None  # None: trainer.batch_size from configs/
    b2_steps: int
    b3_steps: int
    # On CUDA a step takes milliseconds: B2 and B3 time this many steps there instead, so that
    # launch jitter and clock ramp-up average out (4 steps of 6 ms measured noise on an H200).
    cuda_steps: int
    b4_subjects: int
    b5_small: tuple[int, int, int]  # subjects per cohort, dimensions, permutations
    b5_large: tuple[int, int, int]
    b5_compare: tuple[int, int]  # permutations, bootstrap resamples
    b6_sizes: tuple[int, int]
    b6_shape: tuple[int, int, int]


QUICK = Sizes(
    b1_shape=(64, 72, 60),
    b1_subjects=3,
    b1_epochs=3,
    patch_size=16,
    b2_batch=4,
    b2_steps=2,
    b3_steps=3,
    cuda_steps=10,
    b4_subjects=3,
    b5_small=(300, 64, 2000),
    b5_large=(1000, 256, 10_000),
    b5_compare=(1000, 200),
    b6_sizes=(20, 100),
    b6_shape=(24, 28, 20),
)
FULL = Sizes(
    b1_shape=(240, 240, 155),
    b1_subjects=3,
    b1_epochs=3,
    patch_size=None,
    b2_batch=None,
    b2_steps=4,
    b3_steps=6,
    cuda_steps=100,
    b4_subjects=3,
    b5_small=(300, 64, 10_000),
    b5_large=(1000, 256, 10_000),
    b5_compare=(10_000, 2000),
    b6_sizes=(100, 1000),
    b6_shape=(24, 28, 20),
)


# -- helpers ----------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den <= 0:
        return None
    return float(num) / float(den)


def _log(msg: str) -> None:
    print(f"[benchmark] {msg}", file=sys.stderr, flush=True)


def project_defaults() -> dict:
    """The defaults users get, read from ``configs/`` (model, data, trainer, embedding)."""
    load = lambda name: OmegaConf.to_container(  # noqa: E731
        OmegaConf.load(REPO / "configs" / name), resolve=False
    )
    data, trainer = load("data/default.yaml"), load("trainer/default.yaml")
    model, emb = load("model/conv_ae.yaml"), load("embedding/default.yaml")
    model.pop("_target_", None)
    model["patch_size"] = int(data["patch_size"])
    return {"data": data, "trainer": trainer, "model": model, "embedding": emb}


def preprocessing_from(data: dict):
    from aad_med.data.preprocessing import PreprocessingConfig

    return PreprocessingConfig(
        spacing=tuple(data["spacing"]),
        patch_size=int(data["patch_size"]),
        crop_foreground=bool(data["crop_foreground"]),
        min_brain_fraction=float(data["min_brain_fraction"]),
    )


def build_model(model_cfg: dict, seed: int = 0) -> torch.nn.Module:
    from aad_med.models import ConvAutoencoder

    torch.manual_seed(seed)
    return ConvAutoencoder(**model_cfg)


def make_cohort(root: Path, n: int, shape, distinct: int = 1) -> Path:
    """A BraTS 2021-layout synthetic cohort of ``n`` subjects: ``distinct`` generated ones, the
    rest hard links (copies where links fail) of them under new IDs, so large cohorts cost
    little to write."""
    from aad_med.data.synthetic import generate_cohort, subject_id_for

    distinct = max(1, min(distinct, n))
    generate_cohort(root, n_subjects=distinct, shape=shape, layout="brats2021", seed=0)
    for i in range(distinct, n):
        src_id = subject_id_for("brats2021", i % distinct)
        dst_id = subject_id_for("brats2021", i)
        dst = root / dst_id
        dst.mkdir(parents=True, exist_ok=True)
        for f in (root / src_id).iterdir():
            target = dst / f.name.replace(src_id, dst_id)
            try:
                os.link(f, target)
            except OSError:
                shutil.copy2(f, target)
    return root


def matmul_rate(device: torch.device, dtype: torch.dtype, size: int, seconds: float = 1.0) -> float:
    """Sustained FLOP/s of square matrix products measured here (the MFU denominator)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    reps, t0 = 0, time.perf_counter()
    while True:
        a @ b
        reps += 1
        if reps % 2 == 0:
            _sync(device)
            elapsed = time.perf_counter() - t0
            if elapsed >= seconds:
                return 2.0 * size**3 * reps / elapsed


def _epoch_times(
    ds, epochs: int, fetch: int, workers: int, first_extra: float = 0.0, persistent: bool = False
):
    from torch.utils.data import DataLoader

    from aad_med.data.datasets import train_collate

    loader = DataLoader(
        ds,
        batch_size=fetch,
        shuffle=False,
        collate_fn=train_collate,
        num_workers=workers,
        persistent_workers=persistent and workers > 0,
    )
    times, patches = [], 0
    for e in range(epochs):
        ds.set_epoch(e)
        t0 = time.perf_counter()
        n = 0
        for batch in loader:
            n += int(batch["image"].shape[0])
        times.append(time.perf_counter() - t0)
        patches = n
    times[0] += first_extra
    steady = float(np.median(times[1:])) if len(times) > 1 else times[0]
    return {
        "first_epoch_s": times[0],
        "steady_epoch_s": steady,
        "epoch_s": times,
        "patches_per_epoch": patches,
        "steady_patches_per_s": patches / steady if steady > 0 else None,
    }


# -- B1 data pipeline -------------------------------------------------------------------------


def bench_data(ctx: dict) -> dict:
    from aad_med.data.datasets import build_train_dataset
    from aad_med.data.validation import load_cohort

    sz: Sizes = ctx["sizes"]
    d = ctx["defaults"]["data"]
    prep = ctx["prep"]
    samples = int(d["samples_per_subject"])
    fetch = max(1, ctx["batch"] // samples)
    cohort = load_cohort(ctx["cohort_dir"])
    recs = cohort.subjects
    default_workers = int(d["num_workers"])
    rows = {}

    def train_ds(cache: str, cache_dir=None, workers: int = 0):
        return build_train_dataset(
            recs,
            prep,
            samples_per_subject=samples,
            cache=cache,
            cache_dir=cache_dir,
            tumour_ratio=float(d["tumour_ratio"]),
            num_workers=workers,
            seed=0,
        )

    _log("B1 naive MONAI Dataset (decode every epoch)")
    rows["naive_dataset"] = _epoch_times(train_ds("none"), sz.b1_epochs, fetch, 0)

    _log(f"B1 project default (cache={d['cache']}, num_workers={default_workers})")
    t0 = time.perf_counter()
    ds = train_ds(str(d["cache"]), ctx["tmp"] / "b1_disk_default", default_workers)
    build = time.perf_counter() - t0
    rows["default"] = _epoch_times(ds, sz.b1_epochs, fetch, default_workers, first_extra=build)
    rows["default"]["build_s"] = build
    if str(d["cache"]) == "memory":
        # Same filled cache, 2 loader processes: does a worker default pay off?
        _log("B1 memory cache + 2 loader workers")
        rows["memory_cache_2_workers"] = _epoch_times(ds, max(2, sz.b1_epochs - 1), fetch, 2)
        rows["memory_cache_2_workers"]["first_epoch_s"] = None
        # The training loop re-creates its workers every epoch (persistent_workers=False).
        _log("B1 memory cache + 2 persistent loader workers")
        rows["memory_cache_2_persistent_workers"] = _epoch_times(
            ds, max(2, sz.b1_epochs), fetch, 2, persistent=True
        )
    del ds
    _log("B1 disk cache (PersistentDataset)")
    t0 = time.perf_counter()
    disk = train_ds("disk", ctx["tmp"] / "b1_disk_cache", 0)
    rows["disk_cache"] = _epoch_times(
        disk, sz.b1_epochs, fetch, 0, first_extra=time.perf_counter() - t0
    )
    naive, default = rows["naive_dataset"], rows["default"]
    return {
        "config": {
            "subjects": len(recs),
            "shape": list(sz.b1_shape),
            "epochs": sz.b1_epochs,
            "samples_per_subject": samples,
            "subjects_per_batch": fetch,
            "patch_size": prep.patch_size,
            "default_cache": d["cache"],
            "default_num_workers": default_workers,
            "device_resident_cache": "not measured (needs CUDA)"
            if ctx["device"].type != "cuda"
            else "not measured by this script (trainer.cache_on_device)",
        },
        "rows": rows,
        "ratio_first_epoch": _ratio(naive["first_epoch_s"], default["first_epoch_s"]),
        "ratio_steady": _ratio(naive["steady_epoch_s"], default["steady_epoch_s"]),
        "ratio_2_workers_vs_default_steady": _ratio(
            default["steady_epoch_s"],
            rows.get("memory_cache_2_workers", {}).get("steady_epoch_s"),
        ),
        "ratio_2_persistent_workers_vs_default_steady": _ratio(
            default["steady_epoch_s"],
            rows.get("memory_cache_2_persistent_workers", {}).get("steady_epoch_s"),
        ),
        "ratio_disk_vs_naive_steady": _ratio(
            naive["steady_epoch_s"], rows["disk_cache"]["steady_epoch_s"]
        ),
    }


# -- B2 training step -------------------------------------------------------------------------


class _Step:
    """One optimizer step of the training loop (forward, masked-free MSE, backward, clip, AdamW)."""

    def __init__(self, model, device, bf16=False, channels_last=False, compile_model=False):
        self.device = device
        self.bf16 = bf16
        self.channels_last = channels_last
        self.model = model.to(device)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last_3d)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3, weight_decay=1e-4)
        self.net = torch.compile(self.model) if compile_model else self.model

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        return x

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from aad_med.training.loop import reconstruction_loss

        if self.bf16:
            with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16):
                x_hat = self.net(x)
        else:
            x_hat = self.net(x)
        loss = reconstruction_loss(x_hat, x, "mse")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        return loss.detach()


def _time_steps(step: _Step, x: torch.Tensor, n: int, warmup: int) -> tuple[float, float]:
    """``(steps/s, first loss)`` over ``n`` timed steps after ``warmup`` untimed ones."""
    first = float(step(x))
    for _ in range(max(0, warmup - 1)):
        step(x)
    _sync(step.device)
    t0 = time.perf_counter()
    for _ in range(n):
        step(x)
    _sync(step.device)
    return n / (time.perf_counter() - t0), first


def flops_per_step(model_cfg: dict, x: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    step = _Step(build_model(model_cfg), torch.device("cpu"))
    counter = FlopCounterMode(display=False)
    with counter:
        step(x.cpu())
    return int(counter.get_total_flops())


def bench_train_step(ctx: dict) -> dict:
    sz: Sizes = ctx["sizes"]
    dev: torch.device = ctx["device"]
    cfg = ctx["defaults"]["model"]
    p, batch = int(cfg["patch_size"]), ctx["batch"]
    gen = torch.Generator().manual_seed(0)
    x_cpu = torch.randn(batch, int(cfg["in_channels"]), p, p, p, generator=gen)
    flops = flops_per_step(cfg, x_cpu)
    cuda = dev.type == "cuda"
    if cuda:
        rate_dtype, rate = "bf16", matmul_rate(dev, torch.bfloat16, 8192)
        cudnn = torch.backends.cudnn.version()
    else:
        rate_dtype, rate = "fp32", matmul_rate(dev, torch.float32, 1024)
        cudnn = None
    steps = sz.cuda_steps if cuda else sz.b2_steps
    variants = {
        "fp32_eager": dict(bf16=False, channels_last=False, compile_model=False, bench=False),
        "bf16_cudnn_benchmark": dict(bf16=True, channels_last=False, compile_model=False),
        "bf16_channels_last_3d": dict(bf16=True, channels_last=True, compile_model=False),
        "bf16_channels_last_3d_compile": dict(bf16=True, channels_last=True, compile_model=True),
        "bf16_compile": dict(bf16=True, channels_last=False, compile_model=True),
    }
    out: dict[str, dict] = {}
    for name, v in variants.items():
        if name != "fp32_eager" and not cuda:
            out[name] = {"status": NOT_ON_CPU}
            continue
        _log(f"B2 {name}")
        v = dict(v)
        if cuda:
            torch.backends.cudnn.benchmark = bool(v.pop("bench", True))
        else:
            v.pop("bench", None)
        try:
            step = _Step(build_model(cfg), dev, **v)
            x = step.prepare(x_cpu)
            warm = 3 if not v["compile_model"] else 5
            sps, loss0 = _time_steps(step, x, steps, warm)
            out[name] = {
                "status": "measured",
                "steps_per_s": sps,
                "patches_per_s": sps * batch,
                "mfu": flops * sps / rate,
                "first_loss": loss0,
            }
        except Exception as e:  # a variant that fails on this stack is reported, not fatal
            out[name] = {"status": f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    base = out["fp32_eager"]
    for row in out.values():
        if row.get("status") == "measured":
            row["speedup_vs_fp32_eager"] = _ratio(row["steps_per_s"], base["steps_per_s"])
            row["loss_rel_diff_vs_fp32"] = abs(row["first_loss"] - base["first_loss"]) / max(
                abs(base["first_loss"]), 1e-12
            )
    return {
        "config": {
            "model": cfg,
            "batch": batch,
            "patch_size": p,
            "timed_steps": steps,
            "cudnn_version": cudnn,
        },
        "flops_per_step": flops,
        "matmul_rate_dtype": rate_dtype,
        "matmul_flops_per_s": rate,
        "variants": out,
    }


# -- B3 loader efficiency ---------------------------------------------------------------------


def bench_loader(ctx: dict) -> dict:
    from torch.utils.data import DataLoader

    from aad_med.data.datasets import build_train_dataset, train_collate
    from aad_med.data.validation import load_cohort

    sz: Sizes = ctx["sizes"]
    dev: torch.device = ctx["device"]
    d, cfg = ctx["defaults"]["data"], ctx["defaults"]["model"]
    samples = int(d["samples_per_subject"])
    batch = ctx["batch"]
    fetch = max(1, batch // samples)
    cuda = dev.type == "cuda"
    ds = build_train_dataset(
        load_cohort(ctx["cohort_dir"]).subjects,
        ctx["prep"],
        samples_per_subject=samples,
        cache="memory",
        num_workers=int(d["num_workers"]),
        seed=0,
    )
    loader = DataLoader(
        ds,
        batch_size=fetch,
        shuffle=True,
        collate_fn=train_collate,
        num_workers=int(d["num_workers"]),
        pin_memory=cuda,
        generator=torch.Generator().manual_seed(0),
    )
    variant = dict(bf16=cuda, channels_last=False, compile_model=False)

    def batches():
        epoch = 0
        while True:
            ds.set_epoch(epoch)
            for b in loader:
                yield b["image"]
            epoch += 1

    # Steps alternate between the two feeds so both see the same machine load.
    _log("B3 steps on the default loader, alternating with steps on random tensors")
    real_step = _Step(build_model(cfg), dev, **variant)
    ideal_step = _Step(build_model(cfg), dev, **variant)
    it = batches()
    first = next(it)
    shape = first.shape
    x = ideal_step.prepare(torch.randn(shape, generator=torch.Generator().manual_seed(0)))
    real_step(real_step.prepare(first))
    ideal_step(x)
    _sync(dev)
    real_t, ideal_t = [], []
    steps = sz.cuda_steps if cuda else sz.b3_steps
    for _ in range(steps):
        t0 = time.perf_counter()
        real_step(real_step.prepare(next(it)))
        _sync(dev)
        real_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ideal_step(x)
        _sync(dev)
        ideal_t.append(time.perf_counter() - t0)
    real = 1.0 / float(np.median(real_t))
    ideal = 1.0 / float(np.median(ideal_t))
    return {
        "config": {
            "batch_shape": list(shape),
            "steps": steps,
            "precision": "bf16" if cuda else "fp32",
            "num_workers": int(d["num_workers"]),
            "random_tensors_on": dev.type,
        },
        "real_steps_per_s": real,
        "ideal_steps_per_s": ideal,
        "real_step_s": real_t,
        "ideal_step_s": ideal_t,
        "ratio": _ratio(real, ideal),
    }


# -- B4 encoding ------------------------------------------------------------------------------


def bench_encoding(ctx: dict) -> dict:
    from aad_med.data.io import load_subject
    from aad_med.data.transforms import deterministic_transforms, monai_transforms
    from aad_med.data.validation import load_cohort
    from aad_med.embedding.encode import embed_cohort

    dev: torch.device = ctx["device"]
    emb_cfg = ctx["defaults"]["embedding"]
    prep = ctx["prep"]
    sz: Sizes = ctx["sizes"]
    cohort_dir = ctx["cohort_dir"]
    if sz.b4_subjects != sz.b1_subjects:  # a larger cohort, so worker start-up is amortised
        cohort_dir = make_cohort(ctx["tmp"] / "b4_cohort", sz.b4_subjects, sz.b1_shape)
    cohort = load_cohort(cohort_dir)
    n = len(cohort.subjects)
    model = build_model(ctx["defaults"]["model"]).eval()
    default_workers = int(emb_cfg["num_workers"])

    def embed(workers: int) -> tuple[float, int]:
        t0 = time.perf_counter()
        e = embed_cohort(
            model,
            cohort,
            prep,
            device=dev,
            batch_size=int(emb_cfg["batch_size"]),
            num_workers=workers,
            progress=False,
        )
        return time.perf_counter() - t0, int(e.n_patches.sum())

    if dev.type == "cuda":
        # CUDA context, cuDNN heuristics and allocator warm-up are not per-subject costs.
        from aad_med.data.records import Cohort

        embed_cohort(
            model,
            Cohort(cohort.path, cohort.layout, cohort.subjects[:1]),
            prep,
            device=dev,
            progress=False,
        )
    _log(f"B4 embedding {n} subjects (num_workers={default_workers})")
    wall, patches = embed(default_workers)
    _log("B4 decode and preprocessing alone")
    t0 = time.perf_counter()
    for rec in cohort.subjects:
        load_subject(rec)
    decode = time.perf_counter() - t0
    transform = deterministic_transforms(prep)
    t0 = time.perf_counter()
    for rec in cohort.subjects:
        transform(rec.as_dict())
    preprocess = time.perf_counter() - t0
    reference = monai_transforms(prep)
    t0 = time.perf_counter()
    for rec in cohort.subjects:
        reference(rec.as_dict())
    preprocess_monai = time.perf_counter() - t0
    steps: dict[str, float] = {}
    item = cohort.subjects[0].as_dict()
    # Step by step through the MONAI reference chain (the fused path does the same in one pass).
    for t in monai_transforms(prep).transforms:
        t0 = time.perf_counter()
        item = t(item)
        name = type(t).__name__
        steps[name] = steps.get(name, 0.0) + time.perf_counter() - t0
    alt = ctx.get("b4_workers")
    alt = (2 if default_workers == 0 else 0) if alt is None else alt
    _log(f"B4 embedding with num_workers={alt}")
    wall_alt, _ = embed(alt)
    per_subject_preprocess = preprocess / n
    return {
        "config": {
            "subjects": n,
            "shape": list(ctx["sizes"].b1_shape),
            "batch_size": int(emb_cfg["batch_size"]),
            "num_workers": default_workers,
            "device": dev.type,
        },
        "wall_s": wall,
        "patches": patches,
        "subjects_per_s": n / wall,
        "decode_s": decode,
        "preprocess_s": preprocess,
        "decode_share": decode / wall,
        "preprocess_share": preprocess / wall,
        "preprocess_steps_first_subject_s": steps,
        # The fused path (deterministic_transforms) against the MONAI chain, same subjects.
        "preprocess_monai_chain_s": preprocess_monai,
        "fused_vs_monai_chain": _ratio(preprocess_monai, preprocess),
        f"wall_s_num_workers_{alt}": wall_alt,
        f"speedup_num_workers_{alt}": _ratio(wall, wall_alt),
        "preprocess_s_per_subject": per_subject_preprocess,
        # What 1,251 subjects cost in CPU preprocessing alone, spread over every core here.
        "brats_1251_preprocess_s_on_all_cores": 1251
        * per_subject_preprocess
        / (os.cpu_count() or 1),
    }


# -- B5 statistics ----------------------------------------------------------------------------


def _two_cohorts(n: int, dim: int, shift: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, dim)), rng.standard_normal((n, dim)) + shift


def scipy_aad_test(a: np.ndarray, b: np.ndarray, n_resamples: int, seed: int, batch: int):
    """``scipy.stats.permutation_test`` of the AAD: the samples are subject indices, so whole
    rows are permuted and the statistic is the norm of the mean difference of those rows."""
    from scipy.stats import permutation_test

    z = np.vstack([a, b])

    def stat(ia, ib, axis=-1):
        ia, ib = np.asarray(ia, dtype=np.intp), np.asarray(ib, dtype=np.intp)
        return np.linalg.norm(z[ia].mean(axis=-2) - z[ib].mean(axis=-2), axis=-1)

    res = permutation_test(
        (np.arange(len(a)), np.arange(len(a), len(z))),
        stat,
        permutation_type="independent",
        vectorized=True,
        n_resamples=n_resamples,
        alternative="greater",
        batch=batch,
        random_state=seed,
    )
    return float(res.statistic), float(res.pvalue)


_ONE_THREAD = """
import json, sys, time
import numpy as np
from aad_med.distances.permutation import aad_permutation_test
n, dim, B = (int(v) for v in sys.argv[1:4])
rng = np.random.default_rng(1)
a, b = rng.standard_normal((n, dim)), rng.standard_normal((n, dim)) + 0.01
aad_permutation_test(a, b, 200, seed=0)
times = []
for _ in range(3):
    t0 = time.perf_counter()
    aad_permutation_test(a, b, B, seed=0)
    times.append(time.perf_counter() - t0)
import torch
torch.set_num_threads(1)
x, y = np.ones((dim, 2 * n), np.float32), np.ones((2 * n, 2000), np.float32)
x @ y
t0, reps = time.perf_counter(), 0
while time.perf_counter() - t0 < 0.5:
    x @ y
    reps += 1
rate = 2.0 * dim * 2 * n * 2000 * reps / (time.perf_counter() - t0) / 1e9
print(json.dumps({"seconds": min(times), "all": times, "sgemm_gflop_per_s": rate}))
"""


def bench_statistics(ctx: dict) -> dict:
    from aad_med.distances import compare_embeddings
    from aad_med.distances.permutation import aad_permutation_test

    sz: Sizes = ctx["sizes"]
    n, dim, B = sz.b5_small
    # A shift of 0.04 per dimension puts p near 0.1 at 2 x 300 x 64 (p-values are compared
    # where Monte-Carlo error is largest, not at the floor 1/(B+1)).
    a, b = _two_cohorts(n, dim, 0.04 * math.sqrt(64 / dim) * math.sqrt(300 / n), seed=3)
    _log(f"B5 project permutation test 2x{n}x{dim}, B={B}")
    aad_permutation_test(a, b, 100, seed=0)
    # Best of 2, alternating, for both: the least disturbed run of each on a shared machine.
    t_ours, t_scipy = math.inf, math.inf
    for _ in range(2):
        t0 = time.perf_counter()
        ours = aad_permutation_test(a, b, B, seed=0)
        t_ours = min(t_ours, time.perf_counter() - t0)
        _log(f"B5 scipy.stats.permutation_test 2x{n}x{dim}, B={B}")
        t0 = time.perf_counter()
        stat_scipy, p_scipy = scipy_aad_test(a, b, B, seed=0, batch=500)
        t_scipy = min(t_scipy, time.perf_counter() - t0)
    p_mean = 0.5 * (ours.pvalue + p_scipy)
    se = math.sqrt(max(p_mean * (1 - p_mean), 1.0 / B) / B)
    # Two independent Monte-Carlo estimates: their difference has standard error sqrt(2) se.
    agree = abs(ours.pvalue - p_scipy) <= 4 * math.sqrt(2) * se
    small = {
        "n_per_cohort": n,
        "dim": dim,
        "n_permutations": B,
        "project_s": t_ours,
        "scipy_s": t_scipy,
        "ratio": _ratio(t_scipy, t_ours),
        "statistic_project": ours.statistic,
        "statistic_scipy": stat_scipy,
        "p_project": ours.pvalue,
        "p_scipy": p_scipy,
        "p_mc_se": se,
        "p_agree_4se": bool(agree),
        "scipy_batch": 500,
    }

    n2, dim2, B2 = sz.b5_large
    a2, b2 = _two_cohorts(n2, dim2, 0.01, seed=1)
    _log(f"B5 project permutation test 2x{n2}x{dim2}, B={B2} (all threads)")
    aad_permutation_test(a2, b2, 200, seed=0)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        aad_permutation_test(a2, b2, B2, seed=0)
        times.append(time.perf_counter() - t0)
    _log("B5 same, one thread (subprocess)")
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", _ONE_THREAD, str(n2), str(dim2), str(B2)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    one = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {}
    B3, boot = sz.b5_compare
    _log(f"B5 compare_embeddings (all tests) 2x{n2}x{dim2}, B={B3}, bootstrap={boot}")
    t0 = time.perf_counter()
    compare_embeddings({"a": a2, "b": b2}, n_permutations=B3, n_bootstrap=boot, seed=0)
    t_compare = time.perf_counter() - t0
    return {
        "vs_scipy": small,
        "large": {
            "n_per_cohort": n2,
            "dim": dim2,
            "n_permutations": B2,
            "project_s_all_threads": min(times),
            "project_s_one_thread": one.get("seconds"),
            # The statistic is one float32 product (dim x 2n) @ (2n x B): its rate vs the
            # matmul rate says whether the test is bound by BLAS or by overhead.
            "product_gflop": 2.0 * dim2 * 2 * n2 * B2 / 1e9,
            "effective_gflop_per_s_one_thread": (
                2.0 * dim2 * 2 * n2 * B2 / 1e9 / one["seconds"] if one.get("seconds") else None
            ),
            "sgemm_gflop_per_s_one_thread": one.get("sgemm_gflop_per_s"),
            "one_thread_error": None if proc.returncode == 0 else proc.stderr[-500:],
            "threads": torch.get_num_threads(),
        },
        "compare_embeddings": {
            "n_per_cohort": n2,
            "dim": dim2,
            "n_permutations": B3,
            "n_bootstrap": boot,
            "tests": "all",
            "seconds": t_compare,
        },
    }


# -- B6 memory --------------------------------------------------------------------------------


def b6_child(cohort_dir: str, model_json: str, prep_json: str) -> None:
    """Runs in a fresh process: embed a cohort, print peak RSS before and after as JSON."""
    import threading

    from aad_med.data.preprocessing import PreprocessingConfig
    from aad_med.data.validation import load_cohort
    from aad_med.embedding.encode import embed_cohort

    def peak_mb() -> float:
        # VmHWM is the peak of this process image; ru_maxrss would still hold the parent's
        # peak, inherited through fork and kept across exec on Linux.
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
        except OSError:
            pass
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return kb / 1024.0 if sys.platform != "darwin" else kb / 2**20

    def current_mb() -> float | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
        except OSError:
            return None
        return None

    model = build_model(json.loads(model_json)).eval()
    prep = PreprocessingConfig.from_dict(json.loads(prep_json))
    cohort = load_cohort(cohort_dir)
    # ru_maxrss only ever grows (imports and validation may set it); the growth while
    # embedding is read from RSS samples every 5 ms.
    before_peak, before = peak_mb(), current_mb()
    samples: list[float] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            v = current_mb()
            if v is not None:
                samples.append(v)
            done.wait(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    # quality=True: the image-quality rows aad-compare's per-subject step now takes from the
    # embedding's decoded volumes (issue 17) are held per subject too.
    emb = embed_cohort(model, cohort, prep, device="cpu", progress=False, quality=True)
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    print(
        json.dumps(
            {
                "subjects": len(emb),
                "peak_rss_before_mb": before_peak,
                "peak_rss_mb": peak_mb(),
                "rss_before_embedding_mb": before,
                "rss_max_while_embedding_mb": max(samples) if samples else None,
                "rss_samples": len(samples),
                "seconds": seconds,
            }
        )
    )


def bench_memory(ctx: dict) -> dict:
    from aad_med.data.preprocessing import PreprocessingConfig

    sz: Sizes = ctx["sizes"]
    model_cfg = dict(ctx["defaults"]["model"])
    # Tiny volumes need a patch that fits; 16 keeps the default channels and strides.
    model_cfg["patch_size"] = 16
    prep = PreprocessingConfig(patch_size=16, min_brain_fraction=ctx["prep"].min_brain_fraction)
    rows = []
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    for n in sz.b6_sizes:
        root = make_cohort(ctx["tmp"] / f"b6_{n}", n, sz.b6_shape, distinct=10)
        _log(f"B6 embedding {n} tiny subjects in a fresh process")
        proc = subprocess.run(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--b6-child",
                str(root),
                json.dumps(model_cfg),
                json.dumps(prep.to_dict()),
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=1800,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"B6 child for {n} subjects failed:\n{proc.stderr[-2000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        shutil.rmtree(root, ignore_errors=True)
    small, large = rows
    growth = [
        (r["rss_max_while_embedding_mb"] or 0.0) - (r["rss_before_embedding_mb"] or 0.0)
        for r in rows
    ]
    return {
        "config": {
            "sizes": list(sz.b6_sizes),
            "shape": list(sz.b6_shape),
            "distinct_subjects": 10,
            "patch_size": 16,
        },
        "rows": rows,
        "growth_mb": growth,
        "ratio_peak": _ratio(large["peak_rss_mb"], small["peak_rss_mb"]),
        "ratio_growth": _ratio(growth[1], growth[0]) if growth[0] > 1.0 else None,
        "ratio_rss_while_embedding": _ratio(
            large["rss_max_while_embedding_mb"], small["rss_max_while_embedding_mb"]
        ),
    }


# -- report -----------------------------------------------------------------------------------


def _f(x, fmt: str = ".3g") -> str:
    if x is None:
        return "n/a"
    if isinstance(x, str):
        return x
    return format(x, fmt)


def targets(res: dict, cuda: bool) -> list[dict]:
    """The issue's targets with the measured values next to them."""
    out = []

    def add(name, target, measured, met, note=""):
        out.append({"target": name, "goal": target, "measured": measured, "met": met, "note": note})

    gpu_only = None if cuda else NOT_ON_CPU
    if "B1" in res:
        r = res["B1"]["ratio_steady"]
        add(
            "B1 steady-state epoch, naive / default",
            ">= 10x",
            _f(r) + "x",
            r is not None and r >= 10,
        )
    if "B5" in res:
        s = res["B5"]["vs_scipy"]
        add("B5 scipy / project time", ">= 100x", _f(s["ratio"]) + "x", (s["ratio"] or 0) >= 100)
        add(
            "B5 p-values agree",
            "within Monte-Carlo error",
            f"{s['p_project']:.4f} vs {s['p_scipy']:.4f} (4·√2·SE = {4 * math.sqrt(2) * s['p_mc_se']:.4f})",
            s["p_agree_4se"],
        )
        one = res["B5"]["large"]["project_s_one_thread"]
        add(
            "B5 10,000 permutations of 2x1000x256, one core",
            "< 0.5 s",
            _f(one) + " s",
            one is not None and one < 0.5,
            "CPU seconds on a shared machine",
        )
    if "B6" in res:
        r = res["B6"]["ratio_peak"]
        sizes = res["B6"]["config"]["sizes"]
        add(
            f"B6 peak RSS {sizes[1]} / {sizes[0]} subjects",
            "<= 1.2x",
            _f(r) + "x",
            r is not None and r <= 1.2,
        )
    # A GPU target is listed only when its section ran (``--only`` may leave it out).
    b2 = res.get("B2", {}).get("variants", {})
    if "B2" in res:
        bf16 = b2.get("bf16_cudnn_benchmark", {})
        add(
            "B2 bf16 path / fp32 eager (H100)",
            ">= 1.8x",
            _f(bf16.get("speedup_vs_fp32_eager")) + "x" if cuda else gpu_only,
            (bf16.get("speedup_vs_fp32_eager") or 0) >= 1.8 if cuda else None,
        )
    if "B3" in res:
        b3 = res["B3"].get("ratio")
        add(
            "B3 real loader / random tensors (H100)",
            ">= 0.95",
            _f(b3) if cuda else gpu_only,
            (b3 or 0) >= 0.95 if cuda else None,
            ""
            if cuda
            else f"CPU value {_f(b3)}; a GPU step is far shorter, so the same loader cost weighs more",
        )
    if "B2" in res:
        best_mfu = max(
            (v.get("mfu") or 0 for v in b2.values() if v.get("status") == "measured"), default=None
        )
        add(
            "B2 MFU vs measured bf16 matmul rate (H100)",
            ">= 40%",
            _f(100 * best_mfu, ".1f") + "%" if cuda and best_mfu is not None else gpu_only,
            (best_mfu or 0) >= 0.4 if cuda else None,
            "" if cuda else f"CPU fp32 MFU {_f(100 * best_mfu if best_mfu else None, '.1f')}%",
        )
    b4 = res.get("B4", {})
    if b4:
        # The faster of the two B4 runs: loader workers are one setting (embedding.num_workers).
        alt = next(k for k in b4 if k.startswith("wall_s_num_workers_"))
        rates = {
            b4["config"]["num_workers"]: b4["subjects_per_s"],
            int(alt.rsplit("_", 1)[1]): b4["config"]["subjects"] / b4[alt],
        }
        best_workers = max(rates, key=rates.get)
        best_rate = rates[best_workers]
        add(
            "1,251 BraTS-size subjects embedded (H100)",
            "<= 60 s",
            _f(1251 / best_rate, ".0f") + f" s ({best_workers} workers)" if cuda else gpu_only,
            (1251 / best_rate) <= 60 if cuda else None,
            ""
            if cuda
            else f"CPU preprocessing alone, 1,251 subjects of "
            f"{'x'.join(map(str, b4['config']['shape']))}: "
            f"{_f(b4['brats_1251_preprocess_s_on_all_cores'], '.0f')} s on {os.cpu_count()} cores",
        )
    return out


def markdown(res: dict) -> str:
    m = res["meta"]
    lines = [
        f"Benchmark ({m['mode']}) on {m['device']} — {m['date']}",
        f"`{m['command']}`",
        "",
        "| Section | Figure | Baseline | Project | Ratio |",
        "|---|---|---|---|---|",
    ]

    def row(*cells):
        lines.append("| " + " | ".join(cells) + " |")

    if "B1" in res:
        b = res["B1"]
        r, c = b["rows"], b["config"]
        shape = "x".join(map(str, c["shape"]))
        row(
            "B1",
            f"first epoch, {c['subjects']} subjects {shape} (s)",
            "naive " + _f(r["naive_dataset"]["first_epoch_s"]),
            f"default ({c['default_cache']} cache) " + _f(r["default"]["first_epoch_s"]),
            _f(b["ratio_first_epoch"]) + "x",
        )
        row(
            "B1",
            "steady-state epoch (s)",
            "naive " + _f(r["naive_dataset"]["steady_epoch_s"]),
            "default " + _f(r["default"]["steady_epoch_s"]),
            _f(b["ratio_steady"]) + "x",
        )
        if "memory_cache_2_workers" in r:
            row(
                "B1",
                "steady epoch, default vs 2 loader workers (s)",
                "default " + _f(r["default"]["steady_epoch_s"]),
                "2 workers " + _f(r["memory_cache_2_workers"]["steady_epoch_s"]),
                _f(b["ratio_2_workers_vs_default_steady"]) + "x",
            )
        if "memory_cache_2_persistent_workers" in r:
            row(
                "B1",
                "steady epoch, default vs 2 persistent workers (s)",
                "default " + _f(r["default"]["steady_epoch_s"]),
                "2 persistent " + _f(r["memory_cache_2_persistent_workers"]["steady_epoch_s"]),
                _f(b["ratio_2_persistent_workers_vs_default_steady"]) + "x",
            )
        row(
            "B1",
            "disk cache: first / steady epoch (s)",
            "naive " + _f(r["naive_dataset"]["steady_epoch_s"]),
            f"{_f(r['disk_cache']['first_epoch_s'])} / {_f(r['disk_cache']['steady_epoch_s'])}",
            _f(b["ratio_disk_vs_naive_steady"]) + "x steady",
        )
    if "B2" in res:
        b = res["B2"]
        c = b["config"]
        row(
            "B2",
            f"FLOPs per step (batch {c['batch']}, patch {c['patch_size']})",
            "",
            _f(b["flops_per_step"] / 1e9, ".1f") + " GFLOP",
            "",
        )
        row(
            "B2",
            f"{b['matmul_rate_dtype']} matmul rate measured",
            "",
            _f(b["matmul_flops_per_s"] / 1e9, ".1f") + " GFLOP/s",
            "",
        )
        for name, v in b["variants"].items():
            if v.get("status") != "measured":
                row("B2", name, "fp32 eager", v["status"], "")
                continue
            row(
                "B2",
                f"{name}: patches/s, MFU, loss rel. diff",
                "fp32 eager",
                f"{_f(v['patches_per_s'])} p/s, MFU {_f(100 * v['mfu'], '.1f')}%, "
                f"Δloss {_f(v['loss_rel_diff_vs_fp32'], '.1e')}",
                _f(v["speedup_vs_fp32_eager"]) + "x",
            )
    if "B3" in res:
        b = res["B3"]
        row(
            "B3",
            "steps/s, default loader vs in-memory random tensors",
            "random " + _f(b["ideal_steps_per_s"]),
            "loader " + _f(b["real_steps_per_s"]),
            _f(b["ratio"]),
        )
    if "B4" in res:
        b = res["B4"]
        c = b["config"]
        shape = "x".join(map(str, c["shape"]))
        row(
            "B4",
            f"embedding {c['subjects']} subjects {shape} from .nii.gz",
            "",
            f"{_f(b['subjects_per_s'])} subjects/s; decode {_f(100 * b['decode_share'], '.0f')}%, "
            f"all preprocessing {_f(100 * b['preprocess_share'], '.0f')}% of wall",
            "",
        )
        steps = b["preprocess_steps_first_subject_s"]
        top = sorted(steps.items(), key=lambda kv: -kv[1])[:4]
        row(
            "B4",
            "slowest preprocessing steps, one subject (s)",
            "",
            ", ".join(f"{k} {_f(v, '.2f')}" for k, v in top),
            "",
        )
        alt = [k for k in b if k.startswith("speedup_num_workers_")][0]
        row(
            "B4", f"embedding with {alt.rsplit('_', 1)[1]} workers", "default", "", _f(b[alt]) + "x"
        )
    if "B5" in res:
        s, lg, ce = res["B5"]["vs_scipy"], res["B5"]["large"], res["B5"]["compare_embeddings"]
        row(
            "B5",
            f"AAD permutation test 2x{s['n_per_cohort']}x{s['dim']}, B={s['n_permutations']} (s)",
            "scipy " + _f(s["scipy_s"]),
            "project " + _f(s["project_s"]),
            _f(s["ratio"]) + "x",
        )
        row(
            "B5",
            "p-values (same data, independent permutations)",
            "scipy " + _f(s["p_scipy"], ".4f"),
            "project " + _f(s["p_project"], ".4f"),
            "agree" if s["p_agree_4se"] else "DISAGREE",
        )
        row(
            "B5",
            f"2x{lg['n_per_cohort']}x{lg['dim']}, B={lg['n_permutations']}: 1 thread / "
            f"{lg['threads']} threads (s)",
            "",
            f"{_f(lg['project_s_one_thread'])} / {_f(lg['project_s_all_threads'])}",
            "",
        )
        row(
            "B5",
            f"compare_embeddings, all tests, B={ce['n_permutations']}, "
            f"bootstrap {ce['n_bootstrap']} (s)",
            "",
            _f(ce["seconds"]),
            "",
        )
    if "B6" in res:
        b = res["B6"]
        (n0, n1), (r0, r1) = b["config"]["sizes"], b["rows"]
        row(
            "B6",
            f"peak RSS embedding {n0} vs {n1} subjects (MB)",
            _f(r0["peak_rss_mb"], ".0f"),
            _f(r1["peak_rss_mb"], ".0f"),
            _f(b["ratio_peak"]) + "x",
        )
        row(
            "B6",
            "RSS growth while embedding, sampled (MB)",
            _f(b["growth_mb"][0], ".0f"),
            _f(b["growth_mb"][1], ".0f"),
            _f(b["ratio_growth"]) + "x" if b["ratio_growth"] is not None else "n/a",
        )
    lines += ["", "| Target | Goal | Measured | Met | Note |", "|---|---|---|---|---|"]
    for t in res["targets"]:
        met = "n/a" if t["met"] is None else ("yes" if t["met"] else "no")
        lines.append(f"| {t['target']} | {t['goal']} | {t['measured']} | {met} | {t['note']} |")
    return "\n".join(lines) + "\n"


def meta(args, device: torch.device, mode: str) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({cpu})"
    return {
        "mode": mode,
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(["python", "scripts/benchmark.py", *sys.argv[1:]]),
        "device": name,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "thread_env": {
            k: os.environ.get(k)
            for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
        },
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "numpy": np.__version__,
        "platform": platform.platform(),
    }


def run(args) -> dict:
    sizes = QUICK if args.quick else FULL
    if getattr(args, "b4_subjects", None):
        sizes = replace(sizes, b4_subjects=args.b4_subjects)
    only = [s.strip().upper() for s in args.only.split(",")] if args.only else list(SECTIONS)
    unknown = set(only) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"benchmark: unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    from aad_med.device import resolve_device
    from aad_med.errors import ConfigError

    try:  # one line, before anything is measured, when --device cuda finds no GPU
        device = resolve_device(args.device, key="--device")
    except ConfigError as e:
        raise SystemExit(f"benchmark: {e}") from None
    defaults = project_defaults()
    if sizes.patch_size:
        defaults["data"]["patch_size"] = defaults["model"]["patch_size"] = sizes.patch_size
    batch = sizes.b2_batch or int(defaults["trainer"]["batch_size"])
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    res: dict = {"meta": meta(args, device, "quick" if args.quick else "full")}
    res["meta"]["sizes"] = asdict(sizes)
    tmp = Path(tempfile.mkdtemp(prefix="aad-bench-", dir=args.tmp))
    try:
        ctx = {
            "sizes": sizes,
            "device": device,
            "defaults": defaults,
            "prep": preprocessing_from(defaults["data"]),
            "batch": batch,
            "tmp": tmp,
            "b4_workers": getattr(args, "b4_workers", None),
        }
        if {"B1", "B3", "B4"} & set(only):
            _log(f"writing a synthetic cohort of {sizes.b1_subjects} subjects {sizes.b1_shape}")
            ctx["cohort_dir"] = make_cohort(
                tmp / "cohort", sizes.b1_subjects, sizes.b1_shape, distinct=1
            )
        benches: dict[str, Callable[[dict], dict]] = {
            "B1": bench_data,
            "B2": bench_train_step,
            "B3": bench_loader,
            "B4": bench_encoding,
            "B5": bench_statistics,
            "B6": bench_memory,
        }
        for name in SECTIONS:
            if name in only:
                t0 = time.perf_counter()
                res[name] = benches[name](ctx)
                res[name]["section_wall_s"] = time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res["targets"] = targets(res, device.type == "cuda")
    table = markdown(res)
    res["markdown"] = table
    (out_dir / "benchmark.json").write_text(json.dumps(res, indent=2, default=float) + "\n")
    (out_dir / "benchmark.md").write_text(table)
    print(table)
    return res


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--b6-child":
        b6_child(*argv[1:4])
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes: about a minute on 2 cores")
    p.add_argument("--out", default="outputs/benchmark", help="folder for benchmark.json/.md")
    p.add_argument("--only", default="", help="comma-separated sections, e.g. B1,B5")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--tmp", default=None, help="scratch folder for synthetic cohorts")
    p.add_argument(
        "--b4-subjects",
        type=int,
        default=None,
        help="B4 on a cohort of this many subjects (hard links of one; default: B1's cohort)",
    )
    p.add_argument(
        "--b4-workers",
        type=int,
        default=None,
        help="B4's second run with this many loader workers (default: 2, or 0 if configs use some)",
    )
    args = p.parse_args(argv)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
