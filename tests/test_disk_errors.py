"""The filesystem under stress: full disks, dangling links, damaged cache files, deletions cut short."""
import errno
import os
import shutil

import numpy as np
import pytest

import tiny
from forgetscore.attribution import Attributor, ScoringPlan, UnlearnConfig
from forgetscore.attribution import io as fio

dirs, model, train = tiny.folder_fixtures(6, "disk")
PLAN = ScoringPlan(timesteps=(10, 600), seed=3)


def test_a_link_to_a_missing_folder_and_an_overlong_name_are_refused_before_any_work(tmp_path):
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"^--out: '.*dangling' is a link to '.*nowhere', which does not exist"):
        fio.check_writable(tmp_path / "dangling" / "sub", "--out")
    with pytest.raises(ValueError, match=r"^--out: the name 'xxxx.*is longer than the 255 bytes a file name may"):
        fio.check_writable(tmp_path / ("x" * 300) / "out", "--out")
    fio.check_writable(tmp_path / "fine" / "out", "--out")  # a folder still to be made is fine
    assert not (tmp_path / "fine").exists()


@pytest.mark.parametrize("code, says", [(errno.ENOSPC, "the disk is full"), (errno.EDQUOT, "quota"),
                                        (errno.EFBIG, "a file size limit")])
def test_a_write_on_a_full_disk_names_its_file_and_what_to_do(tmp_path, code, says):
    def full(_f):
        raise OSError(code, os.strerror(code))

    with pytest.raises(OSError) as failed:
        fio._write_atomic(tmp_path / "a.npy", full)
    message = str(failed.value)
    assert failed.value.errno == code
    assert f"cannot write {str(tmp_path / 'a.npy')!r}" in message and says in message and "a rerun resumes" in message
    assert list(tmp_path.iterdir()) == []  # no temporary file left


def test_a_short_write_without_an_errno_on_a_nearly_full_disk_reads_as_a_full_disk(tmp_path, monkeypatch):
    def short(_f):
        raise OSError("3840 requested and 992 written")  # NumPy's own error: no errno

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 ** 9, 10 ** 9 - 4096, 4096))
    with pytest.raises(OSError, match=r"cannot write .*3840 requested and 992 written \(the disk is full\)"):
        fio._write_atomic(tmp_path / "a.npy", short)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 ** 9, 0, 10 ** 9))
    with pytest.raises(OSError) as failed:
        fio._write_atomic(tmp_path / "a.npy", short)
    # Room left: no guess about the cause (and no "[Errno None]" before the message).
    assert str(failed.value) == f"cannot write {str(tmp_path / 'a.npy')!r}: 3840 requested and 992 written"


def test_an_empty_cache_file_is_made_again(model, train, tmp_path):
    att = Attributor(model, train, plan=PLAN, cache_dir=tmp_path / "c", progress=False)
    first = att.prepare().inputs(np.arange(len(train)))
    before = att.before_losses()
    (tmp_path / "c" / "prepared" / "inputs-00000.npy").write_bytes(b"")  # as a full disk or a crash can leave it
    again = Attributor(model, train, plan=PLAN, cache_dir=tmp_path / "c", progress=False)
    np.testing.assert_array_equal(again.prepare().inputs(np.arange(len(train))), first)
    (path,) = (tmp_path / "c").glob("before-*.npy")
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=rf"^cache: cannot read {str(path)!r} .*delete it to recompute"):
        again.before_losses()
    path.unlink()
    path.with_suffix(".json").write_text('{"plan": ')
    np.save(path, before)
    with pytest.raises(ValueError, match=r"^cache: '.*before-.*\.json' is damaged \(.*\); delete it and before-"):
        again.before_losses()


def test_the_results_sweep_is_kept_until_they_are_saved(dirs, model, train, tmp_path, monkeypatch):
    """A save that fails (a full --out disk) must not cost the sweep: a rerun reads its chunks."""
    from forgetscore.attribution.results import check_output_dir

    att = Attributor(model, train, plan=PLAN, cache_dir=tmp_path / "c", progress=False, chunk_size=2)
    config = UnlearnConfig(method="sgd", steps=1, draws=4, micro_batch=4)
    query = att.query_inputs(dirs[1] / "000.png")
    result = att.attribute_many([(query, "a red dot")], config=config, keep_sweeps=True)[0]
    kept = [p for p in (tmp_path / "c" / "sweeps").iterdir() if not p.name.startswith(".")]
    assert kept and any(kept[0].glob("chunk-*"))
    # An interrupted save left some result files and no attribution.json: not a result, so no --overwrite needed.
    out = tmp_path / "out"

    def full(path, data, real=fio.write_bytes):
        if path.name == "gallery.png":
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr("forgetscore.attribution.results.write_bytes", full)
    with pytest.raises(OSError, match="No space left"):
        result.save(out, train_dir=dirs[1])
    monkeypatch.undo()
    assert (out / "scores.npy").is_file() and not (out / "attribution.json").exists()
    check_output_dir(out, overwrite=False)
    rerun = Attributor(model, train, plan=PLAN, cache_dir=tmp_path / "c", progress=False, chunk_size=2)
    again = rerun.attribute_many([(query, "a red dot")], config=config)[0]
    np.testing.assert_array_equal(again.scores, result.scores)
    swept = [n for stage, (_, n, _) in rerun.timings.stages.items() if stage.startswith("score")]
    assert swept == [0]  # read from the kept chunks: nothing swept again
    att.forget_sweeps()
    assert not [p for p in (tmp_path / "c" / "sweeps").iterdir() if not p.name.startswith(".")]
    again.save(out, train_dir=dirs[1])
    with pytest.raises(ValueError, match="already holds results"):
        check_output_dir(out, overwrite=False)


def test_a_deletion_that_fails_is_reported_and_one_cut_short_is_finished(tmp_path, monkeypatch):
    from forgetscore.attribution.cache_index import remove_stale, scan

    runs = tmp_path / "runs"
    left = runs / ".abc-def.removing-12-34"
    (left / "prepared").mkdir(parents=True)
    (left / "prepared" / "inputs-00000.npy").write_bytes(b"0" * 1000)
    (entry,) = scan(tmp_path)
    assert entry.path == left and entry.stale and entry.what.startswith("what a deletion cut short left")
    real = shutil.rmtree

    def stubborn(path, **kw):  # one file that will not go (another user's, or held open on a network disk)
        handler = kw.get("onexc") or kw.get("onerror")
        arg = OSError(errno.EACCES, "Permission denied")
        handler(os.unlink, str(path) + "/prepared/inputs-00000.npy", arg if "onexc" in kw else (OSError, arg, None))

    monkeypatch.setattr(shutil, "rmtree", stubborn)
    removed, busy, failed = remove_stale(scan(tmp_path))
    assert removed == [] and busy == [] and len(failed) == 1
    assert failed[0].startswith("could not delete all of ") and "Permission denied" in failed[0]
    monkeypatch.setattr(shutil, "rmtree", real)
    removed, busy, failed = remove_stale(scan(tmp_path))
    assert len(removed) == 1 and failed == [] and list(runs.iterdir()) == []


def test_a_training_folder_whose_path_holds_a_line_break_is_refused(tmp_path):
    from forgetscore.attribution.cache_index import record_training_folder

    with pytest.raises(ValueError, match=r"^train: '.*a\\nb' holds a line break"):
        record_training_folder(tmp_path / "run", tmp_path / "a\nb")


def test_a_full_disk_while_saving_weights_is_one_line(monkeypatch, capsys):
    from forgetscore import cli

    SafetensorError = type("SafetensorError", (Exception,), {})

    def full(args):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(cli, "_demo", full)
    assert cli.main(["demo", "--out", "x"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["forgetscore demo: error: could not write model weights (Error while serializing: I/O error: No "
                   "space left on device (os error 28)); free space where they go (the cache: FORGETSCORE_CACHE, "
                   "--cache; or --out) and run again"]
