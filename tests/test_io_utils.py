"""The shared file helpers: the atomic writer leaves the old file or the new one and never a
temporary file; JSON is strict; the cache key follows file contents' stats; hashes are SHA-256."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest

from aad_med.errors import InputError
from aad_med.io_utils import (
    atomic_path,
    cache_key,
    file_sha256,
    file_stats,
    to_jsonable,
    write_json_atomic,
    write_nifti_atomic,
    write_text_atomic,
)


def test_atomic_path_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "a.txt"
    write_text_atomic(target, "old\n")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_write_errors_name_the_file(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InputError, match="cannot write") as err:
        write_text_atomic(blocker / "inside.txt", "y")
    assert str(blocker / "inside.txt") in str(err.value)


def test_json_is_strict_and_numpy_free(tmp_path):
    payload = {"a": np.float32(1.5), "b": np.array([1, 2]), "c": float("nan"), 3: (np.bool_(True),)}
    assert to_jsonable(payload) == {"a": 1.5, "b": [1, 2], "c": None, "3": [True]}
    path = write_json_atomic(tmp_path / "x.json", payload)
    assert json.loads(path.read_text()) == {"a": 1.5, "b": [1, 2], "c": None, "3": [True]}


def test_nifti_bytes_are_reproducible(tmp_path):
    data = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    a = write_nifti_atomic(tmp_path / "a.nii.gz", data, np.eye(4)).read_bytes()
    b = write_nifti_atomic(tmp_path / "b.nii.gz", data, np.eye(4)).read_bytes()
    assert a == b


def test_cache_key_follows_file_stats_and_hash_is_sha256(tmp_path):
    f = tmp_path / "v.bin"
    f.write_bytes(b"abc")
    key = cache_key({"files": file_stats([f])})
    assert len(key) == 40 and key == cache_key({"files": file_stats([f])})
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    moved = cache_key({"files": file_stats([f])})
    assert moved != key
    assert file_stats([tmp_path / "missing"])[0][1:] == [None, None, None]
    assert file_sha256(f) == hashlib.sha256(b"abc").hexdigest()
    # Other bytes of the same size with the mtime restored (cp -p, rsync -t): another key.
    f.write_bytes(b"abd")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert f.stat().st_size == 3 and cache_key({"files": file_stats([f])}) != moved
    assert file_stats([f])[0][3] == hashlib.sha256(b"abd").hexdigest()


def test_results_are_made_durable_and_cache_entries_are_not(tmp_path, monkeypatch):
    """Results and checkpoints fsync their folder after the rename; cache entries, which heal,
    are renamed atomically without it (BENCHMARKS.md: up to 53 ms per preprocessed entry)."""
    from aad_med import io_utils

    synced = []
    monkeypatch.setattr(io_utils, "_fsync_dir", lambda folder: synced.append(folder))
    io_utils.write_text_atomic(tmp_path / "result.json", "{}")
    assert synced == [tmp_path]
    synced.clear()
    assert io_utils.write_cache_entry(tmp_path / "c" / "e.bin", lambda f: f.write(b"x"), "test")
    assert (tmp_path / "c" / "e.bin").read_bytes() == b"x" and synced == []
    assert not list((tmp_path / "c").glob(".*tmp*"))


def _fresh_process(monkeypatch):
    """Forget the in-process digests (a new run) and count the files hashed from now on."""
    import aad_med.io_utils as io_utils

    monkeypatch.setattr(io_utils, "_DIGESTS", {})
    hashed = []
    real = io_utils.file_sha256

    def counting(path, *args, **kwargs):
        hashed.append(os.path.basename(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(io_utils, "file_sha256", counting)
    return hashed


def _subject(tmp_path, n=3):
    folder = tmp_path / "subject"
    folder.mkdir()
    files = []
    for i in range(n):
        files.append(folder / f"ch{i}.nii.gz")
        files[-1].write_bytes(bytes([i]) * (1000 + i))
    return files


def test_digest_memo_spares_a_second_run_the_hashing(tmp_path, monkeypatch):
    from aad_med.io_utils import DigestMemo

    files = _subject(tmp_path)
    memo = DigestMemo(tmp_path / "cache" / "digests")
    hashed = _fresh_process(monkeypatch)
    first = file_stats(files, memo)
    assert sorted(hashed) == ["ch0.nii.gz", "ch1.nii.gz", "ch2.nii.gz"]
    assert [row[3] for row in first] == [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
    assert len(list((tmp_path / "cache" / "digests").glob("*.json"))) == 1
    hashed = _fresh_process(monkeypatch)
    assert file_stats(files, memo) == first and hashed == []
    # Without the memo a new process hashes again (the memo is what saves it).
    hashed = _fresh_process(monkeypatch)
    assert file_stats(files) == first and len(hashed) == 3


def test_digest_memo_rehashes_a_copy_and_an_edit_with_restored_mtime(tmp_path, monkeypatch):
    import shutil

    from aad_med.io_utils import DigestMemo

    files = _subject(tmp_path)
    memo = DigestMemo(tmp_path / "digests")
    _fresh_process(monkeypatch)
    before = file_stats(files, memo)
    # cp -p: same bytes, size and mtime at another path/inode: hashed, not taken from the memo.
    copy = tmp_path / "copy"
    shutil.copytree(files[0].parent, copy)  # copy2 keeps the modification times
    copies = [copy / f.name for f in files]
    hashed = _fresh_process(monkeypatch)
    assert [r[3] for r in file_stats(copies, memo)] == [r[3] for r in before]
    assert len(hashed) == 3
    # An in-place edit of the same size whose mtime is restored: the status-change time moved.
    st = files[1].stat()
    files[1].write_bytes(b"\xff" * st.st_size)
    os.utime(files[1], ns=(st.st_atime_ns, st.st_mtime_ns))
    hashed = _fresh_process(monkeypatch)
    after = file_stats(files, memo)
    assert after[1][1:3] == before[1][1:3]  # size and mtime as before...
    assert after[1][3] == hashlib.sha256(b"\xff" * st.st_size).hexdigest() != before[1][3]
    assert len(hashed) == 3  # ...yet the subject's group was not found: all three hashed


@pytest.mark.parametrize(
    "damage",
    [
        b"not json",
        b"",
        b'{"files": [], "sha256": []}',
        b"[1, 2]",
        "wrong digest",
    ],
)
def test_a_damaged_digest_memo_is_ignored_and_rewritten(tmp_path, monkeypatch, damage):
    from aad_med.io_utils import DigestMemo

    files = _subject(tmp_path)
    memo = DigestMemo(tmp_path / "digests")
    _fresh_process(monkeypatch)
    good = file_stats(files, memo)
    (entry,) = (tmp_path / "digests").glob("*.json")
    if damage == "wrong digest":  # right identities, a digest that is not 64 hex digits
        doc = json.loads(entry.read_text())
        doc["sha256"][0] = "x" * 64
        damage = json.dumps(doc).encode()
    entry.write_bytes(damage)
    hashed = _fresh_process(monkeypatch)
    assert file_stats(files, memo) == good and len(hashed) == 3
    assert json.loads(entry.read_text())["sha256"] == [row[3] for row in good]  # healed


def test_a_read_only_digest_memo_writes_nothing(tmp_path, monkeypatch):
    from aad_med.io_utils import DigestMemo

    files = _subject(tmp_path)
    _fresh_process(monkeypatch)
    rows = file_stats(files, DigestMemo(tmp_path / "digests", write=False))
    assert all(len(r[3]) == 64 for r in rows) and not (tmp_path / "digests").exists()
    files[2].unlink()
    assert file_stats(files, DigestMemo(tmp_path / "d2"))[2] == [str(files[2]), None, None, None]
