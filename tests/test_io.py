"""Atomic writes: whole files or none, and arrays streamed to disk without a copy in memory."""
import tracemalloc

import numpy as np
import pytest

from conftest import fresh_seed
import os
import time

from forgetscore.attribution import io
from forgetscore.attribution.io import write_npy


def test_write_npy_round_trips_and_streams(tmp_path):
    arr = np.random.default_rng(fresh_seed("data")).standard_normal((64, 1024, 128)).astype(np.float32)  # 32 MiB
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        write_npy(tmp_path / "a.npy", arr)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert peak < arr.nbytes / 8, f"writing {arr.nbytes} bytes held {peak} more in memory"
    assert np.array_equal(np.load(tmp_path / "a.npy"), arr)
    assert [p.name for p in tmp_path.iterdir()] == ["a.npy"]


def test_a_failed_write_leaves_nothing(tmp_path):
    write_npy(tmp_path / "a.npy", np.arange(3))
    with pytest.raises(ValueError):
        write_npy(tmp_path / "a.npy", np.array([{"not": "an array of numbers"}], dtype=object))
    assert [p.name for p in tmp_path.iterdir()] == ["a.npy"]  # the old file whole, no temporary beside it
    assert np.array_equal(np.load(tmp_path / "a.npy"), np.arange(3))


def test_write_npy_rows_streams_parts_into_one_array(tmp_path):
    g = np.random.default_rng(fresh_seed("data"))
    parts = [g.standard_normal((n, 7, 5)).astype(np.float16) for n in (4, 1, 6)]
    from forgetscore.attribution.io import write_npy_rows

    write_npy_rows(tmp_path / "r.npy", (11, 7, 5), np.float16, iter(parts))
    got = np.load(tmp_path / "r.npy")
    assert got.dtype == np.float16 and np.array_equal(got, np.concatenate(parts))
    for shape, says in (((12, 7, 5), "11 rows written for an array of 12"), ((11, 7, 4), "a part of shape")):
        with pytest.raises(ValueError, match=says):
            write_npy_rows(tmp_path / "bad.npy", shape, np.float16, iter(parts))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.npy"]  # nothing half-written


def test_write_dir_recovers_from_a_kill_between_its_renames(tmp_path):
    out = tmp_path / "model"
    io.write_dir(out, lambda d: (d / "v").write_text("1"))
    # What a kill between "out -> .out.old-PID" and ".out.tmp-* -> out" leaves: no out at all.
    os.replace(out, tmp_path / ".model.old-4242")
    cut_short = tmp_path / "..model.old-7.removing-8"  # an old copy's removal, killed
    cut_short.mkdir()
    half = tmp_path / ".model.tmp-abc"
    half.mkdir()
    old = time.time() - 2 * io.STALE_S
    os.utime(half, (old, old))
    fresh = tmp_path / ".model.tmp-def"  # another process's write in progress: left alone
    fresh.mkdir()
    seen = []
    io.write_dir(out, lambda d: (seen.append((out / "v").read_text()), (d / "v").write_text("2")))
    assert seen == ["1"]  # the old folder was back in place before the new one was made
    assert (out / "v").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.tmp-def", "model"]


def test_remove_dir_is_one_rename_then_cleaned(tmp_path, monkeypatch):
    folder = tmp_path / "sweep"
    folder.mkdir()
    (folder / "a.npy").write_bytes(b"x")
    monkeypatch.setattr(io.shutil, "rmtree", lambda *a, **kw: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):  # killed while deleting: the name is already gone
        io.remove_dir(folder)
    monkeypatch.undo()
    assert not folder.exists() and len(list(tmp_path.glob(".sweep.removing-*"))) == 1
    (tmp_path / ".x.npy.abc.tmp").write_bytes(b"old")
    old = time.time() - 2 * io.STALE_S
    os.utime(tmp_path / ".x.npy.abc.tmp", (old, old))
    (tmp_path / ".y.npy.def.tmp").write_bytes(b"being written")
    io.clean_removed(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".y.npy.def.tmp"]
    io.remove_dir(tmp_path / "missing")  # nothing to remove: no error


def test_written_files_and_folders_get_the_users_usual_permissions(tmp_path):
    mask = os.umask(0o027)
    os.umask(mask)
    write_npy(tmp_path / "a.npy", np.zeros(3))
    out = io.write_dir(tmp_path / "d", lambda d: (d / "f").write_text("x"))
    assert (tmp_path / "a.npy").stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's private 0600
    assert out.stat().st_mode & 0o777 == 0o777 & ~mask  # not mkdtemp's 0700
