"""Decompression-bomb and header-extension-bomb cohorts: a few MB on disk, gigabytes once read.

Built in seconds: the gzip stream is several members, the large constant parts compressed once
and repeated, which every gzip reader (Python's, nibabel's) reads as one file.
"""

from __future__ import annotations

import functools
import gzip
import struct
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from tests.nifti_factory import BRATS2021_SUFFIX, brain_like, write_nifti

_CHUNK = 64 * 1024 * 1024


@functools.lru_cache(maxsize=8)
def _fill_member(n_bytes: int, fill: int) -> bytes:
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)  # wbits 31: a gzip member
    return comp.compress(bytes([fill]) * n_bytes) + comp.flush()


def _members(n_bytes: int, fill: int) -> list[bytes]:
    full, rest = divmod(n_bytes, _CHUNK)
    return [_fill_member(_CHUNK, fill)] * full + ([_fill_member(rest, fill)] if rest else [])


def _header_bytes(shape, dtype, extension_bytes: int = 0) -> bytes:
    img = nib.Nifti1Image(np.zeros((1, 1, 1), dtype), np.eye(4))
    hdr = img.header
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(dtype)
    raw = bytearray(hdr.binaryblock)
    if extension_bytes:
        # One extension (code 0) of the declared size; vox_offset points past it and must be
        # exact in float32 (e.g. 1.5 GiB - 352 bytes), or nibabel starts the voxels elsewhere.
        vox_offset = 352 + extension_bytes
        assert float(np.float32(vox_offset)) == vox_offset, "vox_offset not exact in float32"
        raw[108:112] = struct.pack("<f", float(vox_offset))
        raw += b"\x01\x00\x00\x00" + struct.pack("<ii", extension_bytes, 0)
    else:
        raw[108:112] = struct.pack("<f", 352.0)
        raw += b"\x00\x00\x00\x00"
    return bytes(raw)


def write_bomb(path: Path, shape=(800, 800, 800), extension_bytes: int = 0) -> Path:
    """A ``.nii.gz`` of uint8 voxels all 1 (a valid, non-empty image; 512 MB decoded at 800³),
    optionally with one header extension of ``extension_bytes`` (zeros) before the voxels."""
    head = _header_bytes(shape, np.uint8, extension_bytes)
    padding = extension_bytes - 8 if extension_bytes else 0
    parts = [gzip.compress(head, compresslevel=1), *_members(padding, 0)]
    parts += _members(int(np.prod(shape)), 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(parts))
    return path


def write_bomb_cohort(
    root: Path, shape=(800, 800, 800), extension_bytes: int = 0, bombs=("t1", "t1ce", "t2", "flair")
) -> Path:
    """One BraTS-2021 subject whose channels in ``bombs`` are bombs (:func:`write_bomb`) and the
    others ordinary volumes of the same ``shape``."""
    sid = "BraTS2021_00000"
    for ch, suffix in BRATS2021_SUFFIX.items():
        path = root / sid / f"{sid}_{suffix}.nii.gz"
        if ch in bombs:
            write_bomb(path, shape, extension_bytes)
        else:
            write_nifti(path, brain_like(shape))
    return root
