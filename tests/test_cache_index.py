"""`forgetscore cache`: what the cache root holds, and the removal of folders nothing reads any more."""
import json
import os
import shutil
import subprocess
import sys

import pytest

import tiny
from forgetscore import cli
from forgetscore.attribution import Attributor, DiffusionModel, ScoringPlan, TrainingSet, locks
from forgetscore.attribution.cache_index import folder_size, scan

PLAN = ScoringPlan(timesteps=(5, 500), flips=False)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache_index")
    return DiffusionModel.load(tiny.build_model(root / "model")), tiny.build_train(root / "train", n=6)


def _prepared(model, source, folder):
    """A copy of the training folder `source` at `folder`, prepared into the default cache; its run folder."""
    shutil.copytree(source, folder, copy_function=shutil.copy)  # fresh modification times: an identity of its own
    with Attributor(model, TrainingSet.load(folder), plan=PLAN, progress=False) as att:  # a job that ends
        att.prepare()
    return att.cache_dir


def _touch(path):
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))


def _listing(capsys, *args):
    assert cli.main(["cache", *args]) == 0
    return capsys.readouterr().out


def test_folders_are_listed_with_their_training_folder_state_and_size(made, tmp_path, monkeypatch, capsys):
    model, source = made
    root = tmp_path / "root"
    monkeypatch.setenv("FORGETSCORE_CACHE", str(root))
    assert _listing(capsys) == f"cache {root}: nothing cached yet ($FORGETSCORE_CACHE moves it)\n"
    kept = _prepared(model, source, tmp_path / "kept")
    changed = _prepared(model, source, tmp_path / "changed")
    gone = _prepared(model, source, tmp_path / "gone")
    assert len({kept, changed, gone}) == 3  # each folder has its own modification times: its own identity
    _touch(tmp_path / "changed" / "003.png")
    shutil.rmtree(tmp_path / "gone")
    (kept / "sweeps" / "0123abcd").mkdir(parents=True)  # an interrupted sweep
    (kept / "sweeps" / "0123abcd" / "chunk-000000.npy").write_bytes(b"x" * 100)
    (root / "odd").mkdir()
    (root / "odd" / "f").write_bytes(b"x" * 10)
    entries = {e.path: e for e in scan(root)}
    assert set(entries) == {kept, changed, gone, root / "odd"}
    for path, e in entries.items():
        assert e.size == sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) == folder_size(path)
    assert [entries[p].stale for p in (kept, changed, gone, root / "odd")] == [False, True, True, False]
    out = _listing(capsys)
    lines = out.splitlines()
    assert lines[0].startswith(f"cache {root} (") and lines[0].endswith("in 4 folders; $FORGETSCORE_CACHE moves it)")
    line = {p: next(x for x in lines if str(p.relative_to(root)) in x) for p in entries}
    assert line[kept].endswith(f"{tmp_path / 'kept'}: prepared {folder_size(kept / 'prepared') / 1024:.1f} KiB, "
                               "1 interrupted sweep (100 B; a rerun with the options named resumes it: [0123abcd: "
                               f"settings not recorded]); model {model.source}")
    assert f"{tmp_path / 'changed'} (changed since: nothing reads this): prepared" in line[changed]
    assert f"{tmp_path / 'gone'} (gone: nothing reads this): prepared" in line[gone]
    assert line[root / "odd"].endswith("odd  not a forgetscore folder")
    assert lines[-1].startswith("2 folders (") and lines[-1].endswith("`forgetscore cache --remove-stale` deletes them")

    out = _listing(capsys, "--remove-stale")
    assert f"removed {changed.relative_to(root)}" in out and f"removed {gone.relative_to(root)}" in out
    assert not changed.exists() and not gone.exists() and kept.is_dir() and (root / "odd").is_dir()
    assert not [p for p in (root / "runs").iterdir() if p.name.startswith(".")]  # nothing half-removed left
    assert _listing(capsys, "--remove-stale").endswith("nothing stale to remove\n")
    # The kept folder still serves: its prepared data is read as it is.
    again = Attributor(model, TrainingSet.load(tmp_path / "kept"), plan=PLAN, progress=False)
    assert again.cache_dir == kept and again.prepare().n == 6


def test_copies_of_a_training_folder_share_its_cache_folder_until_the_last_is_gone(made, tmp_path, monkeypatch,
                                                                                  capsys):
    model, source = made
    root = tmp_path / "root"
    monkeypatch.setenv("FORGETSCORE_CACHE", str(root))
    first = _prepared(model, source, tmp_path / "first")
    shutil.copytree(tmp_path / "first", tmp_path / "second")  # names, sizes and modification times kept
    second = Attributor(model, TrainingSet.load(tmp_path / "second"), plan=PLAN, progress=False)
    second.prepare()
    assert second.cache_dir == first
    assert (first / "train_dir.txt").read_text() == f"{tmp_path / 'first'}\n{tmp_path / 'second'}\n"
    second.prepare()  # prepared once per Attributor; a new one records nothing twice
    Attributor(model, TrainingSet.load(tmp_path / "second"), plan=PLAN, progress=False).prepare()
    assert len((first / "train_dir.txt").read_text().splitlines()) == 2
    shutil.rmtree(tmp_path / "first")
    (e,) = scan(root)
    assert not e.stale and e.what.startswith(f"{tmp_path / 'second'} and 1 other copy: prepared")
    assert _listing(capsys, "--remove-stale").endswith("nothing stale to remove\n") and first.is_dir()
    shutil.rmtree(tmp_path / "second")
    (e,) = scan(root)
    assert e.stale and e.what.startswith(f"{tmp_path / 'first'} and 1 other copy (gone: nothing reads this)")


def test_a_folder_that_records_no_training_folder_is_removable_under_the_cache_root(made, tmp_path, monkeypatch,
                                                                                   capsys):
    """No run reads it (each records its training folder before preparing): a prepare killed before that, as older
    versions left, or what a job wrote after its folder was removed under it. A --cache folder is only listed."""
    model, source = made
    root = tmp_path / "root"
    monkeypatch.setenv("FORGETSCORE_CACHE", str(root))
    run = _prepared(model, source, tmp_path / "train")
    (run / "train_dir.txt").unlink()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's own")
    (e,) = scan(root)
    assert e.stale and e.what.startswith("no training folder recorded (nothing reads this): prepared")
    out = _listing(capsys, "--cache", str(mine), "--remove-stale")
    assert "a training set whose preparation has not finished: nothing yet" in out and "nothing stale" in out
    assert (mine / "notes.txt").is_file()
    out = _listing(capsys, "--remove-stale")
    assert f"removed {run.relative_to(root)}" in out and not run.exists()


def test_a_folder_made_current_after_the_scan_is_kept(made, tmp_path, monkeypatch):
    """Staleness is judged again under the locks: a job may have recorded (or re-prepared) the folder since the
    scan, then let go of it before the removal came to it."""
    from forgetscore.attribution.cache_index import remove_stale

    model, source = made
    root = tmp_path / "root"
    monkeypatch.setenv("FORGETSCORE_CACHE", str(root))
    run = _prepared(model, source, tmp_path / "train")
    record = (run / "train_dir.txt").read_bytes()
    (run / "train_dir.txt").unlink()
    (e,) = scan(root)
    assert e.stale
    (run / "train_dir.txt").write_bytes(record)  # what a job starting on it now writes first
    removed, busy, failed = remove_stale([e])
    assert (removed, busy, failed) == ([], [], []) and (run / "train_dir.txt").is_file()
    (e,) = scan(root)
    assert not e.stale


@pytest.mark.skipif(locks.fcntl is None, reason="stage locks need fcntl's flock")
def test_a_stale_folder_a_job_is_in_is_left_to_it(made, tmp_path, monkeypatch, capsys):
    model, source = made
    root = tmp_path / "root"
    monkeypatch.setenv("FORGETSCORE_CACHE", str(root))
    run = _prepared(model, source, tmp_path / "train")
    shutil.rmtree(tmp_path / "train")
    lock = run / "sweeps" / ".0123abcd.lock"
    lock.parent.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); "
        "print('held', flush=True); sys.stdin.read()"), str(lock)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        out = _listing(capsys, "--remove-stale")
        assert f"left {run.relative_to(root)}: a job is working in it" in out and run.is_dir()
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
        holder.stdout.close()
    out = _listing(capsys, "--remove-stale")  # the job is done (its lock file stays, held by nobody)
    assert f"removed {run.relative_to(root)}" in out and not run.exists()


def test_a_folder_given_to_cache_is_listed_and_removed_on_its_own(made, tmp_path, monkeypatch, capsys):
    model, source = made
    monkeypatch.setenv("FORGETSCORE_CACHE", str(tmp_path / "root"))
    folder = tmp_path / "train"
    shutil.copytree(source, folder, copy_function=shutil.copy)
    mine = tmp_path / "my-cache"
    Attributor(model, TrainingSet.load(folder), plan=PLAN, cache_dir=mine, progress=False).prepare()
    assert (mine / "train_dir.txt").read_text() == f"{folder}\n"
    out = _listing(capsys, "--cache", str(mine)).splitlines()
    assert out[0].startswith(f"{mine} (") and f"): {folder}: prepared " in out[0], out
    assert _listing(capsys, "--cache", str(mine), "--remove-stale").endswith("nothing stale to remove\n")
    _touch(folder / "003.png")  # changed since: nothing reads that folder's data any more
    out = _listing(capsys, "--cache", str(mine), "--remove-stale")
    assert f"{folder} (changed since: nothing reads this): prepared" in out and "removed my-cache" in out
    assert not mine.exists() and not (tmp_path / "root").exists()  # the cache root was not touched
    assert cli.main(["cache", "--cache", str(mine)]) == 2
    assert f"--cache: {str(mine)!r} is not a folder" in capsys.readouterr().err


def test_the_listing_says_when_the_model_is_no_longer_where_it_was(made, tmp_path, monkeypatch):
    _, source = made
    monkeypatch.setenv("FORGETSCORE_CACHE", str(tmp_path / "root"))
    model_dir = tiny.build_model(tmp_path / "model", seed=5)
    run = _prepared(DiffusionModel.load(model_dir), source, tmp_path / "train")
    (e,) = scan(tmp_path / "root")
    assert e.what.endswith(f"; model {model_dir}")
    shutil.rmtree(model_dir)
    (e,) = scan(tmp_path / "root")
    assert e.what.endswith(f"; model {model_dir} (no longer there)") and not e.stale and e.path == run


def test_a_cache_root_that_is_a_file_is_refused(tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("FORGETSCORE_CACHE", str(tmp_path / "file"))
    assert cli.main(["cache"]) == 2
    assert capsys.readouterr().err.strip() == (f"forgetscore cache: error: FORGETSCORE_CACHE: {str(tmp_path / 'file')!r} "
                                                "is a file, not a folder; point FORGETSCORE_CACHE at a folder")


def test_a_folder_prepared_by_an_earlier_version_is_stale(made, tmp_path, monkeypatch, capsys):
    """Its name holds that version's encoders id, so no run reads it again: --remove-stale may take it."""
    model, source = made
    root = tmp_path / "root"
    monkeypatch.setenv("FORGETSCORE_CACHE", str(root))
    run = _prepared(model, source, tmp_path / "kept")
    (entry,) = scan(root)
    assert not entry.stale
    manifest = json.loads((run / "prepared" / "manifest.json").read_text())
    (run / "prepared" / "manifest.json").write_text(json.dumps({**manifest, "format": manifest["format"] - 1}))
    (entry,) = scan(root)
    assert entry.stale and "(prepared by an earlier version of forgetscore: nothing reads this)" in entry.what
    assert _listing(capsys, "--remove-stale").splitlines()[-1] == f"removed {run.relative_to(root)}"
