"""NIfTI reading: values, canonical channel order, 4D volumes, dtypes and header checks."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nifti_factory import (
    brain_like,
    tumour_like,
    write_brats_subject,
    write_msd_cohort,
    write_nifti,
)

from aad_med import CHANNELS
from aad_med.data import io
from aad_med.data.layouts import discover_cohort
from aad_med.data.records import ImageSource, SubjectRecord
from aad_med.errors import InputError

SHAPE = (24, 28, 20)


def record_for(folder: Path, sid: str) -> SubjectRecord:
    images = {ch: ImageSource(folder / f"{sid}_{ch}.nii.gz") for ch in CHANNELS}
    return SubjectRecord(sid, images, ImageSource(folder / f"{sid}_seg.nii.gz"))


def test_load_subject_values_and_order(tmp_path):
    aff = np.diag([1.2, 1.0, 2.0, 1.0])
    folder = tmp_path / "S1"
    for c, ch in enumerate(CHANNELS):
        write_nifti(folder / f"S1_{ch}.nii.gz", brain_like(SHAPE, seed=c, scale=c + 1), affine=aff)
    write_nifti(folder / "S1_seg.nii.gz", tumour_like(SHAPE), affine=aff, dtype=np.uint8)
    s = io.load_subject(record_for(folder, "S1"))
    assert s.subject_id == "S1"
    assert s.image.shape == (4, *SHAPE) and s.image.dtype == np.float32
    for c in range(4):
        np.testing.assert_array_equal(s.image[c], brain_like(SHAPE, seed=c, scale=c + 1))
    assert s.seg.dtype == np.int16
    np.testing.assert_array_equal(s.seg, tumour_like(SHAPE))
    np.testing.assert_allclose(s.affine, aff)
    assert s.spacing == pytest.approx((1.2, 1.0, 2.0))


def test_load_subject_without_seg(tmp_path):
    folder = write_brats_subject(tmp_path, "BraTS2021_00001", with_seg=False)
    (rec,) = discover_cohort(tmp_path).subjects
    s = io.load_subject(rec)
    assert s.seg is None and s.image.shape == (4, *SHAPE)
    assert folder.is_dir()


def test_msd_4d_channels_land_in_canonical_order(tmp_path, monkeypatch):
    write_msd_cohort(tmp_path, n=1, order=("t2", "flair", "t1ce", "t1"))
    (rec,) = discover_cohort(tmp_path).subjects
    calls = []
    real = io.read_stored
    monkeypatch.setattr(io, "read_stored", lambda *a: calls.append(a[2]) or real(*a))
    s = io.load_subject(rec)
    # The factory scales channel c of canonical order by (c + 1): means ~100, 200, 300, 400.
    means = [float(s.image[c][s.image[c] > 0].mean()) for c in range(4)]
    assert means == pytest.approx([100, 200, 300, 400], rel=0.05)
    assert set(np.unique(s.seg)) == {0, 1, 2, 3}
    # The 4D file is decompressed once for its four channels (the 3D seg once too).
    assert calls.count(-1) == 1


def _scaled_int16_file(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """An int16 ``.nii.gz`` with slope 0.5 and intercept 10, and its stored values."""
    data = (brain_like() / 2).astype(np.int16)
    img = nib.Nifti1Image(data, np.eye(4))
    img.header.set_slope_inter(0.5, 10)
    path = tmp_path / "scaled.nii.gz"
    nib.save(img, str(path))
    return path, data


def test_scaling_and_integer_dtypes(tmp_path):
    path, data = _scaled_int16_file(tmp_path)
    vol, _ = io.load_volume(ImageSource(path))
    np.testing.assert_allclose(vol, data * 0.5 + 10)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.uint16, np.int32, np.float64, ">i2"])
def test_loads_common_dtypes_as_float32(tmp_path, dtype):
    data = (brain_like() / 2).astype(dtype)
    path = write_nifti(tmp_path / "x.nii", data)
    vol, _ = io.load_volume(ImageSource(path))
    assert vol.dtype == np.float32
    np.testing.assert_array_equal(vol, data.astype(np.float32))


def test_complex_and_rgb_refused(tmp_path):
    cplx = write_nifti(tmp_path / "c.nii", brain_like().astype(np.complex64))
    with pytest.raises(InputError, match=r"c\.nii: unsupported voxel data type complex64"):
        io.load_volume(ImageSource(cplx))
    rgb = np.zeros(SHAPE, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb["R"] = 1
    path = tmp_path / "rgb.nii"
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), str(path))
    with pytest.raises(InputError, match="unsupported voxel data type"):
        io.load_volume(ImageSource(path))


def test_non_nifti_image_format_refused(tmp_path):
    path = tmp_path / "scan.mgz"
    nib.save(nib.MGHImage(brain_like(), np.eye(4)), str(path))
    with pytest.raises(InputError, match="not a NIfTI image .*MGHImage"):
        io.read_header(path)


def test_read_header_missing_folder_empty(tmp_path):
    with pytest.raises(InputError, match="file does not exist"):
        io.read_header(tmp_path / "nope.nii")
    with pytest.raises(InputError, match="is a folder"):
        io.read_header(tmp_path)
    (tmp_path / "e.nii.gz").write_bytes(b"")
    with pytest.raises(InputError, match="file is empty"):
        io.read_header(tmp_path / "e.nii.gz")


def test_singular_affine_refused(tmp_path):
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(SHAPE)
    hdr.set_data_dtype(np.float32)
    hdr.set_qform(None, code=0)
    hdr.set_sform(np.diag([1.0, 0.0, 1.0, 1.0]), code=1)
    path = tmp_path / "s.nii"
    nib.save(nib.Nifti1Image(brain_like(), None, header=hdr), str(path))
    assert np.linalg.det(nib.load(path).affine[:3, :3]) == 0
    with pytest.raises(InputError, match="affine is singular or not finite"):
        io.load_volume(ImageSource(path))


def test_volume_index_out_of_range(tmp_path):
    path = write_nifti(tmp_path / "4d.nii.gz", np.stack([brain_like()] * 2, -1))
    vol, _ = io.load_volume(ImageSource(path, volume=1))
    assert vol.shape == SHAPE
    with pytest.raises(InputError, match="has 2 volumes, volume 2 requested"):
        io.load_volume(ImageSource(path, volume=2))


def test_load_subject_refuses_bad_seg_labels(tmp_path):
    folder = write_brats_subject(tmp_path, "S")
    seg = tumour_like()
    seg[0, 0, 0] = 9
    bad = write_nifti(folder / "S_seg.nii.gz", seg, dtype=np.int16)
    with pytest.raises(InputError) as ei:
        io.load_subject(discover_cohort(tmp_path).subjects[0])
    assert str(ei.value) == f"{bad}: segmentation labels {{9}} outside {{0, 1, 2, 3, 4}}"


def test_load_subject_can_skip_seg(tmp_path):
    folder = write_brats_subject(tmp_path, "S")
    (folder / "S_seg.nii.gz").write_text("broken")
    s = io.load_subject(discover_cohort(tmp_path).subjects[0], load_seg=False)
    assert s.seg is None


def test_is_nifti_path():
    assert io.is_nifti_path("a/B.NII.GZ") and io.is_nifti_path("x.nii")
    assert not io.is_nifti_path("x.nii.bak") and not io.is_nifti_path("x.mgz")


def test_fast_inflate_reads_what_nibabel_reads(tmp_path, monkeypatch):
    """ISA-L inflate (when installed), the zlib fallback and nibabel's own reader agree on every
    voxel, for plain and scaled headers, gzipped or not."""
    data = (brain_like(SHAPE) * 3).astype(np.int16)
    plain = write_nifti(tmp_path / "a.nii.gz", data, dtype=np.int16)
    scaled_img = nib.Nifti1Image(data, np.eye(4))
    scaled_img.header.set_slope_inter(0.5, 10)
    scaled = tmp_path / "b.nii"
    nib.save(scaled_img, scaled)
    for path in (plain, scaled):
        expected = np.asarray(nib.load(str(path)).get_fdata(dtype=np.float32))
        img = io.read_header(path)
        np.testing.assert_array_equal(io.read_voxels(img, path, None), expected)
        monkeypatch.setattr(io, "_gunzip", __import__("gzip").decompress)
        np.testing.assert_array_equal(io.read_voxels(img, path, None), expected)
        monkeypatch.undo()


def test_corrupt_gzip_payload_is_named(tmp_path):
    path = write_nifti(tmp_path / "a.nii.gz", brain_like(SHAPE))
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2 : len(raw) // 2 + 64] = b"\x00" * 64
    path.write_bytes(bytes(raw))
    with pytest.raises(InputError, match=r"a\.nii\.gz.*(truncated or corrupt|could not read)"):
        io.load_volume(ImageSource(path))


def test_mid_slice_is_the_volumes_middle_slice(tmp_path):
    path, _ = _scaled_int16_file(tmp_path)
    vol, _ = io.load_volume(ImageSource(path))
    mid = io.read_mid_slice(ImageSource(path))
    assert mid.dtype == np.float32
    np.testing.assert_array_equal(mid, vol[:, :, vol.shape[2] // 2])
    # One volume of a 4D (Decathlon) file: channel c of the factory is scaled by c + 1.
    write_msd_cohort(tmp_path / "msd", n=1)
    (rec,) = discover_cohort(tmp_path / "msd").subjects
    whole = io.load_subject(rec, load_seg=False).image
    for c, ch in enumerate(CHANNELS):
        z = whole.shape[3] // 2
        np.testing.assert_array_equal(io.read_mid_slice(rec.images[ch]), whole[c][:, :, z])


def test_mid_slice_of_a_truncated_file_is_named(tmp_path):
    path = write_nifti(tmp_path / "a.nii.gz", brain_like(SHAPE))
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 3])
    with pytest.raises(InputError, match=r"a\.nii\.gz.*(truncated or corrupt|could not read)"):
        io.read_mid_slice(ImageSource(path))


@pytest.mark.parametrize(
    ("values", "bad"),
    [
        ([0, 1, 2, 4], None),
        ([0, 0, 0], None),
        ([2, 3], None),
        ([0, 4, 5], "{5}"),
        ([-1, 0, 2], "{-1}"),
        ([0, 7, 300], "{7, 300}"),
    ],
)
@pytest.mark.parametrize("dtype", [np.int16, np.uint16, np.int32, np.float32])
def test_check_seg_labels_range_shortcut_agrees_with_the_label_set(values, bad, dtype):
    from aad_med.data.io import check_seg_labels

    if np.dtype(dtype).kind == "u" and min(values) < 0:
        pytest.skip("negative label in an unsigned type")
    seg = np.asfortranarray(np.resize(np.array(values, dtype=dtype), (6, 5, 4)))
    if bad is None:
        out = check_seg_labels(seg, "s.nii.gz")
        assert out.dtype == np.int16 and np.array_equal(out, seg.astype(np.int16))
    else:
        with pytest.raises(InputError, match=rf"s.nii.gz: segmentation labels \{bad}"):
            check_seg_labels(seg, "s.nii.gz")


def test_check_seg_labels_refuses_a_seg_spanning_the_whole_integer_range():
    # Found by the fuzz test: the range shortcut once built a set of every integer in
    # [min, max] before checking the bounds, which took all the memory for such a seg.
    from aad_med.data.io import check_seg_labels

    info = np.iinfo(np.int64)
    seg = np.array([info.min, 0, 1, info.max], dtype=np.int64).reshape(1, 2, 2)
    with pytest.raises(InputError, match=r"s.nii.gz: segmentation labels"):
        check_seg_labels(seg, "s.nii.gz")


@pytest.mark.parametrize(
    "dtypes",
    [
        ("int16",) * 4,
        ("uint8",) * 4,
        ("int16", "int16", "float32", "int16"),
        ("float64",) * 4,
    ],
)
def test_native_load_keeps_the_stored_dtype_and_layout_and_the_float32_values(tmp_path, dtypes):
    """load_subject(native=True): the stored dtype where every channel shares one that float32
    holds exactly (else float32), each channel and the seg in the stored (x fastest) layout, and
    the same values as the default C-ordered float32 read."""
    folder = tmp_path / "S"
    images = {}
    for i, (ch, dt) in enumerate(zip(CHANNELS, dtypes, strict=True)):
        data = np.clip(np.round(brain_like(SHAPE, seed=i)), 0, 250).astype(dt)
        images[ch] = ImageSource(write_nifti(folder / f"S_{ch}.nii.gz", data))
    seg = write_nifti(folder / "S_seg.nii.gz", tumour_like(SHAPE), dtype=np.int16)
    rec = SubjectRecord("S", images, ImageSource(seg))
    ref = io.load_subject(rec)
    native = io.load_subject(rec, native=True)
    same = len(set(dtypes)) == 1 and dtypes[0] != "float64"
    assert native.image.dtype == (np.dtype(dtypes[0]) if same else np.float32)
    assert ref.image.dtype == np.float32 and ref.image.flags.c_contiguous
    assert all(native.image[c].flags.f_contiguous for c in range(len(CHANNELS)))
    np.testing.assert_array_equal(native.image.astype(np.float32), ref.image)
    assert native.seg.dtype == np.int16 and native.seg.flags.f_contiguous
    assert ref.seg.flags.c_contiguous
    np.testing.assert_array_equal(native.seg, ref.seg)


def test_mid_slices_of_a_native_load_are_read_back_without_the_file(tmp_path, monkeypatch):
    """load_subject(native=True) keeps each channel's middle slice (4D volumes too): a
    thumbnail then reads nothing, gets what the file gives, and a rewritten file is read again;
    a scaled file is not kept (its float32 values come from nibabel's scaling)."""
    from aad_med.data.io import MID_SLICES

    MID_SLICES.clear()
    write_msd_cohort(tmp_path / "msd", n=1)
    (msd,) = discover_cohort(tmp_path / "msd").subjects
    folder = tmp_path / "S"
    images = {
        ch: ImageSource(write_nifti(folder / f"S_{ch}.nii.gz", brain_like(SHAPE, seed=i)))
        for i, ch in enumerate(CHANNELS)
    }
    scaled = nib.Nifti1Image((brain_like(SHAPE) / 2).astype(np.int16), np.eye(4))
    scaled.header.set_slope_inter(0.5, 10)
    nib.save(scaled, str(folder / "S_t1.nii.gz"))
    rec = SubjectRecord("S", images, None)
    expected = {}
    for r in (msd, rec):
        whole = io.load_subject(r, load_seg=False).image
        expected[r.subject_id] = [whole[c][:, :, whole.shape[3] // 2] for c in range(4)]
        io.load_subject(r, load_seg=False, native=True)
    reads = []
    real_header = io.read_header
    monkeypatch.setattr(
        io, "read_header", lambda *a, **k: reads.append(a[0]) or real_header(*a, **k)
    )
    for r in (msd, rec):
        for c, ch in enumerate(CHANNELS):
            mid = io.read_mid_slice(r.images[ch])
            assert mid.dtype == np.float32
            np.testing.assert_array_equal(mid, expected[r.subject_id][c])
    assert reads == [images["t1"].path]  # only the scaled file was opened
    new = brain_like(SHAPE, seed=9) + 1
    write_nifti(images["t2"].path, new)
    np.testing.assert_array_equal(io.read_mid_slice(images["t2"]), new[:, :, SHAPE[2] // 2])
    MID_SLICES.clear()


def test_the_mid_slice_memo_keeps_the_most_recent_within_its_bound(tmp_path):
    paths = [write_nifti(tmp_path / f"{i}.nii", brain_like(SHAPE, seed=i)) for i in range(3)]
    one = SHAPE[0] * SHAPE[1] * 4
    memo = io.MidSliceMemo(max_bytes=2 * one)
    for p in paths:
        img = nib.load(str(p))
        memo.put(ImageSource(p), img, np.asarray(img.dataobj, dtype=np.float32))
    assert memo.get(ImageSource(paths[0])) is None
    for i in (1, 2):
        np.testing.assert_array_equal(
            memo.get(ImageSource(paths[i])), brain_like(SHAPE, seed=i)[:, :, SHAPE[2] // 2]
        )


def test_mid_slices_kept_with_a_cached_subject_are_read_back_without_the_file(
    tmp_path, monkeypatch
):
    """subject_slices / restore: the slices stored beside a cached subject serve its thumbnails
    in a later process (no file opened), with the values the file gives."""
    from aad_med.data.io import MID_SLICES

    MID_SLICES.clear()
    folder = tmp_path / "S"
    images = {
        ch: ImageSource(write_nifti(folder / f"S_{ch}.nii.gz", brain_like(SHAPE, seed=i)))
        for i, ch in enumerate(CHANNELS)
    }
    rec = SubjectRecord("S", images, None)
    assert MID_SLICES.subject_slices(rec) is None
    io.load_subject(rec, load_seg=False, native=True)
    kept = MID_SLICES.subject_slices(rec)
    assert kept.shape == (4, SHAPE[0], SHAPE[1]) and kept.dtype == np.float32
    MID_SLICES.clear()  # a new process
    MID_SLICES.restore(rec, kept)
    monkeypatch.setattr(io, "read_header", lambda *a, **k: pytest.fail("a file was opened"))
    for i, ch in enumerate(CHANNELS):
        expected = brain_like(SHAPE, seed=i)[:, :, SHAPE[2] // 2]
        np.testing.assert_array_equal(io.read_mid_slice(rec.images[ch]), expected)
    MID_SLICES.clear()


@pytest.mark.skipif(io.INFLATER != "isal", reason="ISA-L (isal) not installed")
@pytest.mark.parametrize("tail", ["members", "zeros", "garbage", "crc", "truncated"])
def test_isal_inflate_reads_every_gzip_form_as_gzip_does(tmp_path, tail):
    """The ISA-L inflate gives gzip's bytes for a file of several members (bgzip) or with zero
    padding, and refuses what gzip refuses: a wrong CRC, garbage after the stream, a truncated
    stream (each named as a corrupt file)."""
    import gzip

    data = (brain_like(SHAPE) * 3).astype(np.int16)
    path = write_nifti(tmp_path / "a.nii.gz", data, dtype=np.int16)
    raw = path.read_bytes()
    plain = gzip.decompress(raw)
    if tail == "members":  # the same bytes split in two gzip members
        raw = gzip.compress(plain[:1000]) + gzip.compress(plain[1000:])
    elif tail == "zeros":
        raw = raw + b"\x00" * 16
    elif tail == "garbage":
        raw = raw + b"not gzip"
    elif tail == "crc":
        raw = raw[:-8] + bytes([raw[-8] ^ 0xFF]) + raw[-7:]
    else:
        raw = raw[: len(raw) // 2]
    if tail in ("members", "zeros"):
        assert io._gunzip(raw) == plain
        path.write_bytes(raw)
        np.testing.assert_array_equal(io.load_volume(ImageSource(path))[0], data)
    else:
        with pytest.raises((EOFError, io._InflateError, gzip.BadGzipFile)):
            io._gunzip(raw)
        path.write_bytes(raw)
        with pytest.raises(InputError, match=r"a\.nii\.gz.*(truncated or corrupt|could not read)"):
            io.load_volume(ImageSource(path))


def test_a_file_rewritten_in_place_with_its_time_put_back_is_read_again(tmp_path):
    """The memo's key holds the status-change time, which ``cp`` over a file then ``touch -r``
    (or ``rsync -t``, ``os.utime``) cannot restore: same inode, size and mtime, new voxels."""
    import os

    from aad_med.data.io import MID_SLICES

    MID_SLICES.clear()
    path = write_nifti(tmp_path / "t1.nii", brain_like(SHAPE, seed=1))
    source = ImageSource(path)
    img = nib.load(str(path))
    MID_SLICES.put(source, img, np.asarray(img.dataobj))
    before = os.stat(path)
    new = (brain_like(SHAPE, seed=2) + 3).astype(np.int16)
    with open(path, "r+b") as f:  # in place: the same inode
        f.write(nib.Nifti1Image(new, np.eye(4)).to_bytes())
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        before.st_ino,
        before.st_size,
        before.st_mtime_ns,
    )
    assert after.st_ctime_ns != before.st_ctime_ns  # what the key relies on
    np.testing.assert_array_equal(io.read_mid_slice(source), new[:, :, SHAPE[2] // 2])
    MID_SLICES.clear()


def test_slices_restored_from_a_cache_keep_int16_values_in_half_the_bytes(tmp_path):
    folder = tmp_path / "S"
    images = {
        ch: ImageSource(write_nifti(folder / f"S_{ch}.nii", brain_like(SHAPE, seed=i)))
        for i, ch in enumerate(CHANNELS)
    }
    rec = SubjectRecord("S", images, None)
    memo = io.MidSliceMemo()
    slices = np.stack([np.rint(brain_like(SHAPE, seed=i)[:, :, SHAPE[2] // 2]) for i in range(4)])
    memo.restore(rec, slices.astype(np.float32))
    assert memo._bytes == slices.size * 2  # kept as int16
    np.testing.assert_array_equal(memo.subject_slices(rec), slices.astype(np.float32))
    memo.restore(rec, slices.astype(np.float32) + 0.5)  # not integer-valued: kept as float32
    assert memo._bytes == slices.size * 4
    np.testing.assert_array_equal(memo.subject_slices(rec), slices.astype(np.float32) + 0.5)
