"""Property tests (hypothesis) of the loading and validation layer: whatever the file (random
shapes, dtypes, affines, raw header fields, NaN/Inf, truncation, corrupted bytes), loading gives
either a valid subject or one of the project's own errors with a message, never another
exception.

Each property runs 50 examples by default (seconds); set ``AAD_MED_FUZZ_EXAMPLES=2000`` for a
longer hunt. ``--hypothesis-show-statistics`` shows how often each outcome was reached.
"""

from __future__ import annotations

import gzip
import os
import struct
import tempfile
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from aad_med import CHANNELS
from aad_med.data.io import load_subject
from aad_med.data.records import Cohort, ImageSource, SubjectRecord
from aad_med.data.validation import subject_problems, validate_cohort
from aad_med.errors import AADError, CohortError

FUZZ = settings(
    max_examples=int(os.environ.get("AAD_MED_FUZZ_EXAMPLES", "50")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

DTYPES = ["uint8", "int8", "int16", "uint16", "int32", "uint32", "int64", "float32", "float64",
          "complex64", ">i2", ">f4"]  # fmt: skip

# Offsets and struct formats of NIfTI-1 header fields (little-endian, as nibabel writes them).
HEADER_FIELDS = {
    "dim": (40, "<8h"),
    "datatype": (70, "<h"),
    "bitpix": (72, "<h"),
    "pixdim": (76, "<8f"),
    "vox_offset": (108, "<f"),
    "scl_slope": (112, "<f"),
    "scl_inter": (116, "<f"),
    "qform_code": (252, "<h"),
    "sform_code": (254, "<h"),
    "quatern": (256, "<6f"),
    "srow": (280, "<12f"),
    "magic": (344, "4s"),
}

weird_floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from([0.0, -1.0, 1.0, 1e-30, 1e30, float("nan"), float("inf")]),
)
weird_ints = st.one_of(st.integers(-(2**15), 2**15 - 1), st.sampled_from([0, 1, 3, 4, 5, 8, -1]))


@st.composite
def header_patch(draw):
    name = draw(st.sampled_from(sorted(HEADER_FIELDS)))
    offset, fmt = HEADER_FIELDS[name]
    n = struct.calcsize(fmt)
    if fmt.endswith("s"):
        value = (draw(st.sampled_from([b"n+1\0", b"ni1\0", b"n+2\0", b"\0\0\0\0", b"abcd"])),)
    elif fmt[-1] == "h":
        value = tuple(draw(weird_ints) for _ in range(int(fmt[1:-1] or 1)))
    else:
        value = tuple(draw(weird_floats) for _ in range(int(fmt[1:-1] or 1)))
    return offset, struct.pack(fmt, *value)[:n]


def maybe(strategy, empty):
    """``strategy`` one time in three: most cases stay near-valid so the loader goes deep."""
    return st.one_of(st.just(empty), st.just(empty), strategy)


@st.composite
def nifti_case(draw):
    ndim = draw(st.sampled_from([3, 3, 3, 4, 4, 1, 2, 5]))
    shape = list(draw(st.lists(st.integers(1, 6), min_size=ndim, max_size=ndim)))
    if ndim == 4 and draw(st.booleans()):
        shape[3] = 4  # a Decathlon-like 4D image
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    fill = draw(st.sampled_from(["random", "random", "zeros", "nan", "inf", "labels"]))
    affine = np.eye(4)
    if draw(st.booleans()):
        # Tame here: nibabel's writer runs an SVD on the affine, which can spin for ever on
        # subnormal or wildly scaled matrices. NaN/Inf/garbage reach the loader through the
        # raw "srow"/"quatern" header patches instead.
        spacing = st.floats(0.0, 10.0, allow_subnormal=False)
        affine[:3, :3] = np.diag([draw(spacing) for _ in range(3)])
        affine[:3, :3] = affine[:3, draw(st.permutations([0, 1, 2]))]
        affine[:3, :3] *= np.array([draw(st.sampled_from([-1, 1])) for _ in range(3)])
        affine[:3, 3] = [draw(st.floats(-300, 300, allow_subnormal=False)) for _ in range(3)]
    return {
        "shape": tuple(shape),
        "dtype": dtype,
        "fill": fill,
        "affine": affine,
        "gz": draw(st.booleans()),
        "patches": draw(maybe(st.lists(header_patch(), min_size=1, max_size=3), [])),
        "truncate": draw(maybe(st.floats(0.0, 1.0), None)),
        "flip": draw(
            maybe(
                st.lists(
                    st.tuples(st.integers(0, 2000), st.integers(0, 255)), min_size=1, max_size=4
                ),
                [],
            )
        ),
        "seed": draw(st.integers(0, 2**16)),
    }


def write_case(folder: Path, case: dict) -> Path | None:
    """Write the case's file; ``None`` when nibabel itself refuses to write such an image."""
    rng = np.random.default_rng(case["seed"])
    shape, dtype = case["shape"], case["dtype"]
    data = rng.normal(50, 20, size=shape)
    if case["fill"] == "zeros":
        data = np.zeros(shape)
    elif case["fill"] == "labels":
        data = rng.integers(0, 6, size=shape).astype(np.float64)
    elif case["fill"] in ("nan", "inf") and dtype.kind in "fc":
        data.flat[rng.integers(0, data.size)] = np.nan if case["fill"] == "nan" else np.inf
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        arr = data.astype(dtype)
        try:
            img = nib.Nifti1Image(arr, case["affine"])
            raw = img.header.binaryblock + b"\0\0\0\0" + arr.tobytes(order="F")
        except Exception:  # the writer, not the loader under test, refused the case
            return None
    raw = bytearray(raw)
    for offset, blob in case["patches"]:
        raw[offset : offset + len(blob)] = blob
    for pos, byte in case["flip"]:
        if pos < len(raw):
            raw[pos] = byte
    blob = gzip.compress(bytes(raw)) if case["gz"] else bytes(raw)
    if case["truncate"] is not None:
        blob = blob[: int(len(blob) * case["truncate"])]
    path = folder / ("img.nii.gz" if case["gz"] else "img.nii")
    path.write_bytes(blob)
    return path


def record_for(path: Path, four_d: bool, with_seg: bool) -> SubjectRecord:
    images = {ch: ImageSource(path, i if four_d else None) for i, ch in enumerate(CHANNELS)}
    return SubjectRecord("fuzz", images, ImageSource(path) if with_seg else None)


def check_loaded(result) -> None:
    image = result.image
    assert image.dtype == np.float32 and image.ndim == 4 and image.shape[0] == len(CHANNELS)
    assert np.all(np.isfinite(image)) and np.all(np.isfinite(result.affine))
    assert all(np.any(image[c]) for c in range(len(CHANNELS)))
    if result.seg is not None:
        assert result.seg.shape == image.shape[1:] and result.seg.dtype == np.int16
        assert set(np.unique(result.seg)) <= {0, 1, 2, 3, 4}


@FUZZ
@given(case=nifti_case(), four_d=st.booleans(), with_seg=st.booleans())
def test_load_subject_gives_subject_or_project_error(case, four_d, with_seg):
    with tempfile.TemporaryDirectory() as tmp:
        path = write_case(Path(tmp), case)
        assume(path is not None)
        record = record_for(path, four_d, with_seg)
        try:
            result = load_subject(record)
        except AADError as e:
            event(f"error: {str(e)[len(str(path)) :].split('(')[0].strip(': ')[:40]}")
            assert str(e).startswith(str(path)) and len(str(e)) > len(str(path)) + 2
        else:
            event("loaded")
            check_loaded(result)


@FUZZ
@given(case=nifti_case(), four_d=st.booleans(), with_seg=st.booleans())
def test_validation_agrees_with_loading(case, four_d, with_seg):
    with tempfile.TemporaryDirectory() as tmp:
        path = write_case(Path(tmp), case)
        assume(path is not None)
        record = record_for(path, four_d, with_seg)
        lines = subject_problems(record)
        assert all(line.startswith(str(path)) for line in lines)
        cohort = Cohort(Path(tmp), "csv", [record])
        try:
            checked = validate_cohort(cohort)
        except CohortError as e:
            assert e.problems == lines and lines
        else:
            assert not lines and checked.subjects == [record]
            # What validation accepts, the loader loads.
            check_loaded(load_subject(record))


@FUZZ
@given(blob=st.binary(max_size=800), gz=st.booleans(), prefix=st.booleans())
def test_arbitrary_bytes(blob, gz, prefix):
    if prefix:
        # A valid header start makes the parser go further before it meets garbage.
        hdr = nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)).header.binaryblock
        blob = hdr[: len(blob) % 352] + blob
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ("x.nii.gz" if gz else "x.nii")
        path.write_bytes(gzip.compress(blob) if gz else blob)
        record = record_for(path, four_d=False, with_seg=False)
        try:
            check_loaded(load_subject(record))
        except AADError as e:
            assert str(e).startswith(str(path))
