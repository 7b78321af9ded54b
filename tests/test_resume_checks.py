"""Resuming, stopping and tidying: what a run says when it cannot resume chunks (or resumes chunks made otherwise),
how a command ends on SIGTERM, what a running job protects from `forgetscore cache --remove-stale`, and what killed
or refused runs leave behind."""
import contextlib
import errno
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import tiny
from conftest import NATIVE_BACKENDS
from subprocs import child_env, free_port, sigkill_when, stop_after_chunks
from forgetscore import cli
from forgetscore.attribution import Attribution, Attributor, ScoringPlan, TrainingSet, locks
from forgetscore.attribution import results as results_mod
from forgetscore.attribution.cache_index import scan
from forgetscore.attribution.io import remove_dir

pytestmark = pytest.mark.usefixtures("one_thread")
needs_flock = pytest.mark.skipif(locks.fcntl is None, reason="jobs hold folders with fcntl's flock")

PLAN = ScoringPlan(timesteps=(5, 500), flips=False, seed=1)
N = 6
dirs, model, train = tiny.folder_fixtures(N, "resume")


def _interrupted(model, train, cache, monkeypatch, **kw) -> None:
    """A `score` of the original model's losses killed after its first chunk (of 3: 6 images in chunks of 2)."""
    att = Attributor(model, train, plan=PLAN, cache_dir=cache, progress=False, **{"chunk_size": 2, "batch_size": 4,
                                                                                   "backend": "torch", **kw})
    undo = stop_after_chunks(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        att.before_losses()
    undo()
    att.close()


def _sweeps(cache: Path) -> list[Path]:
    return sorted(p for p in (cache / "sweeps").iterdir() if not p.name.startswith("."))


def _said(att: Attributor) -> list[str]:
    said: list[str] = []
    att._log = said.append
    return said


def _touch(path: Path) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))


# --- a running job's folder, and folders that record no training folder -----------------------------------------
@needs_flock
def test_a_running_jobs_folder_is_left_by_remove_stale_between_its_stages(model, dirs, tmp_path, monkeypatch, capsys):
    root = tmp_path / "root"
    monkeypatch.setenv("FORGETSCORE_CACHE", str(root))
    folder = tmp_path / "train"
    shutil.copytree(dirs[1], folder, copy_function=shutil.copy)
    att = Attributor(model, TrainingSet.load(folder), plan=PLAN, progress=False, chunk_size=2)
    att.prepare()  # then its unlearning step, say, which holds no stage lock
    _touch(folder / "003.png")  # the training folder changed meanwhile: its cache folder is stale
    (entry,) = scan(root)
    assert entry.stale and entry.path == att.cache_dir
    assert cli.main(["cache", "--remove-stale"]) == 0
    assert f"left {entry.path.relative_to(root)}: a job is working in it" in capsys.readouterr().out
    before = att.before_losses()  # the job goes on with its prepared data
    assert before.shape == (N, 1) and (att.cache_dir / "prepared" / "manifest.json").is_file()
    att.close()  # the job ends: nothing holds the folder now
    assert cli.main(["cache", "--remove-stale"]) == 0
    assert f"removed {entry.path.relative_to(root)}" in capsys.readouterr().out and not entry.path.exists()


@needs_flock
def test_a_job_used_again_after_close_holds_its_folder_again(model, train, tmp_path):
    att = Attributor(model, train, plan=PLAN, cache_dir=tmp_path / "c", progress=False, chunk_size=2)
    att.prepare()
    att.close()
    with locks.unless_busy(att.cache_dir / locks.JOB_LOCK) as free:
        assert free
    att.prepare()  # its data prepared already: the next stage (a sweep, an unlearning step) works in the folder
    with locks.unless_busy(att.cache_dir / locks.JOB_LOCK) as free:
        assert not free
    att.close()


@needs_flock
def test_a_job_starting_while_its_folder_is_removed_holds_the_folder_made_again(tmp_path):
    run = tmp_path / "runs" / "x"
    (run / "prepared").mkdir(parents=True)
    removal = locks._acquire(run / locks.JOB_LOCK, wait=False)  # as `cache --remove-stale` holds it
    got = []
    job = threading.Thread(target=lambda: got.append(locks.hold_folder(run)), daemon=True)
    job.start()  # waits for the removal if it finds the old file, else makes the folder afresh after it
    remove_dir(run)
    locks._release(run / locks.JOB_LOCK, removal)
    job.join(60)
    (held,) = got
    assert os.fstat(held).st_ino == os.stat(run / locks.JOB_LOCK).st_ino and not (run / "prepared").exists()
    with locks.unless_busy(run / locks.JOB_LOCK) as free:
        assert not free  # a removal now finds the job there
    locks.let_go_of_folder(run, held, remove_empty=True)
    assert not run.exists()  # the last job out takes the lock file, and the folder it left empty


# --- resuming chunks made otherwise ---------------------------------------------------------------------------------
@pytest.mark.skipif("cpu" not in NATIVE_BACKENDS, reason="needs a second backend on the CPU")
def test_a_resume_under_another_backend_names_whose_chunks_it_reuses(model, train, tmp_path, monkeypatch):
    _interrupted(model, train, tmp_path / "c", monkeypatch)
    again = Attributor(model, train, plan=PLAN, cache_dir=tmp_path / "c", chunk_size=2, batch_size=4, backend="cpu",
                       progress=False)
    said = _said(again)
    again.before_losses()
    (line,) = [m for m in said if m.startswith("sweep: ")]
    assert line.startswith("sweep: reusing 1 finished chunk of 3 made under backend torch, compile off, device cpu, "
                           "not this run's backend cpu, compile off, device cpu: ")
    assert "agree to float32 rounding only" in line and "delete '" in line and "a fresh sweep" in line
    # Resumed under the backend that made its chunks: nothing to say.
    _interrupted(model, train, tmp_path / "d", monkeypatch)
    same = Attributor(model, train, plan=PLAN, cache_dir=tmp_path / "d", chunk_size=2, batch_size=4,
                      backend="torch", progress=False)
    said = _said(same)
    same.before_losses()
    assert said == []


def test_a_run_at_another_batch_size_names_the_interrupted_sweep_it_discards(model, train, tmp_path, monkeypatch):
    _interrupted(model, train, tmp_path / "c", monkeypatch)
    again = Attributor(model, train, plan=PLAN, cache_dir=tmp_path / "c", chunk_size=2, batch_size=8,
                       backend="torch", progress=False)
    said = _said(again)
    again.before_losses()
    assert said == ["sweep: an interrupted sweep of these losses at batch size 4 holds 1 of 3 finished chunks, which "
                    "this run at batch size 8 cannot use (the batch size changes the last bits): it starts afresh and "
                    "deletes them when it finishes; to resume them instead, stop it and run again with --batch-size 4"]
    assert _sweeps(tmp_path / "c") == []


def test_a_run_at_another_chunk_size_names_the_interrupted_sweep_and_supersedes_it(model, train, tmp_path,
                                                                                  monkeypatch, capsys):
    cache = tmp_path / "c"
    _interrupted(model, train, cache, monkeypatch)
    assert cli.main(["cache", "--cache", str(cache)]) == 0
    assert ("1 interrupted sweep (" in (out := capsys.readouterr().out)
            and ": the original model's losses at --batch-size 4 --chunk-size 2 --precision fp32 (backend torch, "
                "compile off, device cpu), 1 of 3 chunks done])" in out), out
    again = Attributor(model, train, plan=PLAN, cache_dir=cache, chunk_size=4, batch_size=4, backend="torch",
                       progress=False)
    said = _said(again)
    again.before_losses()
    assert said == ["sweep: an interrupted sweep of these losses in chunks of 2 images holds 1 of 3 finished chunks, "
                    "which this run in chunks of 4 cannot use: it starts afresh and deletes them when it finishes; to "
                    "resume them instead, stop it and run again with --chunk-size 2 --batch-size 4"]
    assert _sweeps(cache) == []  # superseded, as a sweep of another batch size is


def test_remove_stale_removes_interrupted_sweeps_whose_losses_are_cached(model, train, tmp_path, monkeypatch, capsys):
    """Any chunk size: as a job killed between saving the losses and removing its chunks leaves them."""
    cache = tmp_path / "c"
    _interrupted(model, train, cache, monkeypatch)
    again = Attributor(model, train, plan=PLAN, cache_dir=cache, chunk_size=4, batch_size=4, progress=False)
    monkeypatch.setattr(Attributor, "forget_sweeps", lambda self: self._finished.clear())
    again.before_losses()
    again.close()
    monkeypatch.undo()
    assert len(_sweeps(cache)) == 2
    assert cli.main(["cache", "--cache", str(cache)]) == 0
    out = capsys.readouterr().out
    assert out.count("; its losses are cached: nothing resumes it]") == 2 and "2 interrupted sweeps (" in out
    assert cli.main(["cache", "--cache", str(cache), "--remove-stale"]) == 0
    out = capsys.readouterr().out
    assert _sweeps(cache) == [] and out.count("removed c/sweeps/") == 2, out
    assert len(list(cache.glob("before-*.npy"))) == 1  # the losses stay
    assert cli.main(["cache", "--cache", str(cache), "--remove-stale"]) == 0
    assert capsys.readouterr().out.endswith("nothing stale to remove\n")


# --- two runs into one --out, and saves that fail -----------------------------------------------------------------
def _attribute_args(dirs, tmp_path) -> list[str]:
    return ["attribute", "--model", str(dirs[0]), "--train", str(dirs[1]), "--cache", str(tmp_path / "c"),
            "--timesteps", "5,400", "--no-flips", "--batch-size", "8", "--chunk-size", "2", "--method", "sgd",
            "--draws", "4", "--micro-batch", "4", "--prompt", "a red dot", "--query", str(dirs[1] / "000.png"),
            "--out", str(tmp_path / "out")]


@contextlib.contextmanager
def _claimed_elsewhere(folder: Path) -> Iterator[int]:
    """`folder` claimed by another process for the `with`; yields its pid."""
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys\nfrom pathlib import Path\nfrom forgetscore.attribution.locks import claim_folder\n"
        "with claim_folder(Path(sys.argv[1]), '--out'):\n    print('held', flush=True)\n    sys.stdin.read()\n"),
        str(folder)], env=child_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        yield holder.pid
    finally:
        holder.stdin.close()
        holder.wait(60)
        holder.stdout.close()


@needs_flock
def test_a_second_run_into_the_same_out_is_refused_at_once(dirs, tmp_path, capsys):
    out = tmp_path / "out"
    with _claimed_elsewhere(out) as pid:
        assert cli.main(_attribute_args(dirs, tmp_path)) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"forgetscore attribute: error: --out: {str(out)!r} is claimed by another job that will "
                              f"write its results there (pid {pid} on "), err
        assert err.rstrip().endswith("wait for it to end, or give another --out")
        assert not (tmp_path / "c").exists()  # refused before any stage
    assert not out.exists()  # the folder the claim made, left empty, goes with it


@needs_flock
def test_a_folder_inside_one_another_job_claims_is_refused(tmp_path):
    """`attribute --queries` claims --out and writes a folder per query in it: a report into one of those would
    remove the temporary files of the save in progress there."""
    out = tmp_path / "res"
    with _claimed_elsewhere(out):
        with pytest.raises(ValueError, match=r"^--out: '.*/res/cat' is in '.*/res', which another job claims"):
            with locks.claim_folder(out / "cat", "--out"):
                pass
        assert not (out / "cat").exists()
    with locks.claim_folder(out / "cat", "--out"):  # once that job has ended
        assert (out / "cat").is_dir()


def test_a_refused_save_leaves_no_chunks_and_a_full_disk_keeps_them(dirs, tmp_path, monkeypatch, capsys):
    args, real = _attribute_args(dirs, tmp_path), results_mod.Attribution.save

    def full(self, out, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(results_mod.Attribution, "save", full)
    assert cli.main(args) == 1
    assert _sweeps(tmp_path / "c")  # kept: the same command, once there is room, reads them instead of sweeping

    def refused(self, out, **kw):  # results appeared in --out during the run
        (Path(out) / "attribution.json").write_text("{}")
        return real(self, out, **kw)

    monkeypatch.setattr(results_mod.Attribution, "save", refused)
    assert cli.main(args) == 2
    assert "already holds results" in capsys.readouterr().err
    assert _sweeps(tmp_path / "c") == []


# --- stopping ------------------------------------------------------------------------------------------------------
# `attribute` held where it would load the model: it holds its claim on --out (rank 0) and the ranks' group. Once the
# test makes file "go", each rank meets the others in a collective, as the stages do.
STUCK = """
import os, sys, time
from pathlib import Path
from forgetscore import cli
from forgetscore.attribution.ranks import agree

gates = Path(sys.argv[1])
rank = os.environ.get("RANK", "0")


def held(args):
    (gates / f"ready-{rank}").touch()
    while not (gates / "go").exists():
        time.sleep(0.02)
    agree(lambda: None)
    raise SystemExit("not stopped")


cli._attributor = held
sys.exit(cli.main(sys.argv[2:]))
"""


def _wait_for(path: Path, procs: list[subprocess.Popen], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        for p in procs:
            assert p.poll() is None, p.communicate()[1]
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.02)


def _stuck(dirs, tmp_path: Path, ranks: int = 1) -> tuple[Path, list[subprocess.Popen]]:
    gates, script = tmp_path / "gates", tmp_path / "stuck.py"
    gates.mkdir()
    script.write_text(STUCK)
    port, env = free_port(), child_env()
    procs = [subprocess.Popen([sys.executable, str(script), str(gates), *_attribute_args(dirs, tmp_path)],
                              env=env if ranks == 1 else dict(env, WORLD_SIZE=str(ranks), RANK=str(r),
                                                              LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                                                              MASTER_PORT=str(port)),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for r in range(ranks)]
    return gates, procs


def _end(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.communicate()


TERMINATED = "terminated by SIGTERM; finished stages are cached and a rerun resumes from them"


def test_sigterm_ends_a_command_as_ctrl_c_does_with_its_clean_ups(dirs, tmp_path):
    gates, procs = _stuck(dirs, tmp_path)
    try:
        _wait_for(gates / "ready-0", procs)
        assert (tmp_path / "out" / locks.CLAIM).is_file() or locks.fcntl is None  # its claim on --out
        procs[0].send_signal(signal.SIGTERM)
        _, err = procs[0].communicate(timeout=60)
    finally:
        _end(procs)
    assert procs[0].returncode == 128 + signal.SIGTERM and err.rstrip().endswith(TERMINATED), err
    assert not (tmp_path / "out").exists()  # the clean-ups ran: the claim let go, the folder it made removed


def test_sigterm_on_one_rank_ends_it_and_leaves_no_rank_waiting(dirs, tmp_path):
    """As torchrun's own rank failure handling needs: the rank ends at once (by the signal, as a rank blocked in a
    collective could not run a handler), and the others' next collective fails at once rather than waiting on a
    rank that is gone."""
    gates, procs = _stuck(dirs, tmp_path, ranks=2)
    try:
        for r in range(2):
            _wait_for(gates / f"ready-{r}", procs)
        procs[1].send_signal(signal.SIGTERM)
        _, err1 = procs[1].communicate(timeout=60)
        (gates / "go").touch()
        _, err0 = procs[0].communicate(timeout=120)
    finally:
        _end(procs)
    assert procs[1].returncode == -signal.SIGTERM and TERMINATED not in err1, err1
    assert procs[0].returncode not in (0, None) and "not stopped" not in err0, err0
    assert not (tmp_path / "out").exists()


def test_progress_printed_to_a_redirected_stdout_survives_a_kill(tmp_path):
    ready, script, log = tmp_path / "ready", tmp_path / "long.py", tmp_path / "log.txt"
    script.write_text(f"""
import sys, time
from pathlib import Path
from forgetscore import cli

def long_command(args):
    print("step 1 of 2 done")
    Path({str(ready)!r}).touch()
    time.sleep(600)

cli._cache = long_command
sys.exit(cli.main(["cache"]))
""")
    env = {k: v for k, v in child_env().items() if k != "PYTHONUNBUFFERED"}  # as a batch job's usually is
    with open(log, "w") as stdout:
        sigkill_when(script, ready, env=env, stdout=stdout)
    assert log.read_text() == "step 1 of 2 done\n"


# --- what killed saves leave -----------------------------------------------------------------------------------------
def test_a_save_clears_the_temporaries_of_a_save_killed_midway(dirs, tmp_path):
    out, script, marker = tmp_path / "out", tmp_path / "save.py", tmp_path / "writing"
    script.write_text(f"""
import time
from pathlib import Path
import numpy as np
import torch
from forgetscore.attribution import Attribution, TrainingSet

data = TrainingSet.load({str(dirs[1])!r})
result = Attribution(np.arange({N}, dtype=float), np.zeros(({N}, 1)), "a red dot", torch.zeros(1, 8, 8),
                     data.file_names, data.captions)
real = np.save

def slow(f, arr, **kw):  # killed in the middle of writing scores.npy
    real(f, arr, **kw)
    f.flush()
    Path({str(marker)!r}).touch()
    time.sleep(600)

np.save = slow
result.save({str(out)!r}, train_dir={str(dirs[1])!r})
""")
    sigkill_when(script, marker)
    left = list(out.glob(".scores.npy.*.tmp"))
    assert len(left) == 1
    data = TrainingSet.load(dirs[1])
    also = [out / ".gallery.png.4242.tmp", out / "..gallery.png.4242.tmp.x1y2.tmp"]  # what a killed report leaves
    for path in also:
        path.write_bytes(b"half")
    mine = out / ".notes.txt.tmp"
    mine.write_text("the user's own")
    result = Attribution(np.arange(N, dtype=float), np.zeros((N, 1)), "a red dot", torch.zeros(1, 8, 8),
                         data.file_names, data.captions)
    result.save(out, train_dir=dirs[1])  # the rerun's save
    assert not [p for p in [*left, *also] if p.exists()] and mine.is_file()
    for path in also:
        path.write_bytes(b"half")
    assert cli.main(["report", "--out", str(out)]) == 0
    assert not [p for p in also if p.exists()] and mine.is_file()


# --- timings of jobs that waited ---------------------------------------------------------------------------------
@needs_flock
def test_a_job_that_waited_for_anothers_prepare_reports_no_rate_of_its_own(model, train, tmp_path, monkeypatch):
    monkeypatch.setattr(locks, "POLL_S", 0.02)
    cache = tmp_path / "c"
    first = Attributor(model, train, plan=PLAN, cache_dir=cache, progress=False)
    second = Attributor(model, train, plan=PLAN, cache_dir=cache, progress=False)
    held, waiting = threading.Event(), threading.Event()

    def other_job():  # another thread takes its turn at a stage as another process does
        with locks.stage_lock(cache / ".prepared.lock", "preparing this training set"):
            held.set()
            waiting.wait(60)
            first.prepare()

    job = threading.Thread(target=other_job, daemon=True)
    job.start()
    assert held.wait(60)
    second._log = lambda message: waiting.set()
    second.prepare()
    job.join(60)
    (mine,) = [line for line in second.timings.lines() if line.split()[0] == "prepare"]
    assert "img/s" not in mine and mine.endswith("s of it waiting for another job)"), mine
    (theirs,) = [line for line in first.timings.lines() if line.split()[0] == "prepare"]
    assert theirs.endswith(" img/s)") and "waiting" not in theirs, theirs
    assert second.timings.stages["prepare"][1] == 0 and first.timings.stages["prepare"][1] == N


def test_a_lock_path_that_cannot_be_made_is_named_rather_than_retried_forever(tmp_path):
    lock = tmp_path / ".stage.lock"
    os.symlink(tmp_path / "missing" / "x", lock)  # a link into a folder that is not there
    with pytest.raises(OSError, match=r"cannot make the lock file .*\.stage\.lock.* move away what stands there"):
        locks._acquire(lock, wait=False)
