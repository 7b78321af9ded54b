"""Jobs sharing one cache: a job waits for the stage another job is in, then reuses what that job made."""
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

import tiny
from subprocs import child_env
from forgetscore.attribution import Attributor, ScoringPlan, locks
from forgetscore.attribution import attributor as attributor_mod
from forgetscore.attribution import fisher as fisher_mod
from forgetscore.attribution.losses import LossSweep

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(locks.fcntl is None, reason="stages are locked where fcntl's flock exists")]

PLAN = ScoringPlan(timesteps=(5, 500), flips=True, seed=3)
SAMPLES, CHUNK = 13, 4


def _open_gate_when(said: list, count: int, gate, child: subprocess.Popen, timeout_s: float = 120) -> threading.Thread:
    """A thread that creates file `gate` once `said` holds `count` messages (this job waits), or kills `child`
    after `timeout_s` (so that a job that never waits fails the test instead of hanging it)."""
    def run():
        deadline = time.monotonic() + timeout_s
        while len(said) < count:
            if time.monotonic() > deadline:
                child.kill()
                return
            time.sleep(0.02)
        gate.touch()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


# The first job: it stops at the start of its prepare, its Fisher and its sweep until the test opens a gate, so the
# second job is sure to find each stage taken.
FIRST_JOB = """
import sys, time
from pathlib import Path
from forgetscore.attribution import Attributor, ScoringPlan
from forgetscore.attribution import attributor as attributor_mod
from forgetscore.attribution import fisher as fisher_mod
from forgetscore.attribution.losses import LossSweep

model, train, cache, gates = sys.argv[1:5]

def held(name, real):
    def wrapped(*a, **kw):
        if not (Path(gates) / name).exists():
            print(name, flush=True)
        while not (Path(gates) / name).exists():
            time.sleep(0.02)
        return real(*a, **kw)
    return wrapped

attributor_mod.prepare = held("prepare", attributor_mod.prepare)
fisher_mod.fisher_sums = held("fisher", fisher_mod.fisher_sums)
LossSweep.run = held("sweep", LossSweep.run)
att = Attributor.load(model, train, cache_dir=cache, plan=ScoringPlan(timesteps=(5, 500), flips=True, seed=3),
                      chunk_size=%d, progress=False)
att.fisher(%d, seed=7)
att.before_losses()
print("done", flush=True)
""" % (CHUNK, SAMPLES)


def test_a_second_job_waits_for_the_first_and_reuses_its_data_fisher_and_losses(tmp_path, monkeypatch):
    model, train = tiny.build_model(tmp_path / "model"), tiny.build_train(tmp_path / "train", n=9)
    cache, gates = tmp_path / "cache", tmp_path / "gates"
    gates.mkdir()
    script = tmp_path / "first_job.py"
    script.write_text(FIRST_JOB)
    first = subprocess.Popen([sys.executable, str(script), str(model), str(train), str(cache), str(gates)],
                             env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "prepare", first.stderr.read()  # the first job prepares
        att = Attributor.load(model, train, cache_dir=cache, plan=PLAN, chunk_size=CHUNK, progress=False)
        said: list[str] = []
        att._log = said.append
        computed = []
        real_sums, real_run = fisher_mod.fisher_sums, LossSweep.run
        monkeypatch.setattr(attributor_mod, "prepare",
                            lambda *a, real=attributor_mod.prepare, **kw: computed.append("prepare") or real(*a, **kw))
        monkeypatch.setattr(att.model, "encode_images",
                            lambda *a, real=att.model.encode_images, **kw: computed.append("encode") or real(*a, **kw))
        monkeypatch.setattr(fisher_mod, "fisher_sums", lambda *a, **kw: computed.append("fisher") or real_sums(*a, **kw))
        monkeypatch.setattr(LossSweep, "run", lambda *a, **kw: computed.append("sweep") or real_run(*a, **kw))

        _open_gate_when(said, 1, gates / "prepare", first)
        att.prepare()
        assert said == [f"waiting for another job preparing this training set in {str(cache)!r}"]
        assert first.stdout.readline().strip() == "fisher", first.stderr.read()  # now in its Fisher
        _open_gate_when(said, 2, gates / "fisher", first)
        fisher = att.fisher(SAMPLES, seed=7)
        assert said[1] == f"waiting for another job computing this Fisher in {str(cache)!r}"
        assert first.stdout.readline().strip() == "sweep", first.stderr.read()  # now in its before-losses
        _open_gate_when(said, 3, gates / "sweep", first)
        before = att.before_losses()
        assert said[2] == f"waiting for another job sweeping these losses in {str(cache / 'sweeps')!r}"
        assert computed == ["prepare"]  # which found the first job's data: nothing encoded, swept or summed
        assert first.stdout.readline().strip() == "done" and first.wait(60) == 0, first.stderr.read()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
        first.stdout.close()
        first.stderr.close()
    monkeypatch.setattr(fisher_mod, "fisher_sums", real_sums)
    monkeypatch.setattr(LossSweep, "run", real_run)

    # What this job would have computed alone.
    alone = Attributor.load(model, train, cache_dir=tmp_path / "alone", plan=PLAN, chunk_size=CHUNK, progress=False)
    want = alone.fisher(SAMPLES, seed=7)
    for name in want:
        torch.testing.assert_close(fisher[name], want[name], rtol=1e-6, atol=0)
    np.testing.assert_allclose(before, alone.before_losses(), rtol=1e-6, atol=0)
    assert list((cache / "sweeps").iterdir()) == []  # the finished sweep's chunks are gone ...
    assert [p.name for p in cache.rglob("*.lock")] == [".jobs.lock"]  # ... only this job's hold on the folder ...
    att.close()
    assert not [p for p in cache.rglob("*.lock")]  # ... and no lock file stays behind once it ends
    assert not list(cache.glob("fisher-*.parts-*"))


def test_stage_lock_waits_for_another_process_then_goes_on(tmp_path):
    lock, gate, released = tmp_path / "stage" / ".x.lock", tmp_path / "go", tmp_path / "released"
    holder = subprocess.Popen([sys.executable, "-c", f"""
import os, time
from pathlib import Path
from forgetscore.attribution import locks
fd = locks._acquire(Path({str(lock)!r}), wait=False)
print("held" if fd is not None else "busy", flush=True)
while not os.path.exists({str(gate)!r}):
    time.sleep(0.02)
Path({str(released)!r}).touch()
locks._release(Path({str(lock)!r}), fd)
"""], env=child_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        said: list[str] = []
        _open_gate_when(said, 1, gate, holder)
        with locks.stage_lock(lock, "doing x", said.append):
            assert released.exists()  # not before the other process let go
            assert said == [f"waiting for another job doing x in {str(lock.parent)!r}"]
            with locks.stage_lock(lock, "doing x", said.append):  # this process's own stage: no waiting
                with locks.unless_busy(lock) as free:
                    assert free
            assert lock.exists()
        assert holder.wait(60) == 0
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        holder.stdout.close()
    assert not lock.exists() and len(said) == 1


def test_unless_busy_leaves_what_another_job_holds(tmp_path):
    lock = tmp_path / ".y.lock"
    other = locks._acquire(lock, wait=False)  # another job's hold (its own open file)
    try:
        with locks.unless_busy(lock) as free:
            assert not free
    finally:
        locks._release(lock, other)
    with locks.unless_busy(lock) as free:
        assert free and lock.exists()
    assert not lock.exists()


def test_a_waiter_locks_the_paths_new_file_when_the_holder_removed_the_old_one(tmp_path):
    """A job blocked on a lock file that its holder removes on release must not count that file as held."""
    lock = tmp_path / ".z.lock"
    first = locks._acquire(lock, wait=False)
    got = []
    waiter = threading.Thread(target=lambda: got.append(locks._acquire(lock, wait=True)), daemon=True)
    waiter.start()
    time.sleep(0.2)  # the waiter is blocked on the first file (a later start takes the same path below)
    locks._release(lock, first)  # removes the file it waited on
    waiter.join(30)
    (fd,) = got
    assert os.fstat(fd).st_ino == os.stat(lock).st_ino  # it holds the file now at the path
    assert locks._acquire(lock, wait=False) is None
    locks._release(lock, fd)


def test_the_ranks_meet_before_rank_0_lets_go(tmp_path, monkeypatch):
    """Under torchrun a slower rank may still read the stage's files after rank 0 is done with them."""
    lock, seen = tmp_path / ".s.lock", []
    monkeypatch.setattr(locks, "barrier", lambda: seen.append(locks._acquire(lock, wait=False) is None))
    with locks.stage_lock(lock, "doing s"):
        pass
    assert seen == [True]  # the meeting came while the lock was still held
    assert not lock.exists()


def test_a_filesystem_without_locks_runs_unguarded_and_says_so(tmp_path, monkeypatch):
    import errno

    def no_locks(fd, op):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(locks.fcntl, "flock", no_locks)
    monkeypatch.setattr(locks, "_said_unlockable", set())
    lock = tmp_path / "cache" / ".p.lock"
    ran = []
    with pytest.warns(UserWarning, match=r"is on a filesystem without file locks .*must not run at the same time"):
        with locks.stage_lock(lock, "doing p"):
            ran.append(1)
    with locks.stage_lock(lock, "doing p"):  # said once
        ran.append(2)
    with locks.unless_busy(lock) as free:
        assert free
    assert ran == [1, 2] and not lock.exists()


def test_threads_of_one_process_take_turns_too(tmp_path):
    lock, events, inside = tmp_path / ".t.lock", [], threading.Event()

    def other_thread():
        with locks.stage_lock(lock, "doing t"):
            events.append("other in")
            inside.set()
            time.sleep(0.5)
            with locks.unless_busy(lock) as free:  # its own stage
                assert free
            events.append("other out")

    thread = threading.Thread(target=other_thread, daemon=True)
    thread.start()
    inside.wait(30)
    with locks.unless_busy(lock) as free:  # another thread's stage is busy for this one
        assert not free
    said: list[str] = []
    with locks.stage_lock(lock, "doing t", said.append):
        events.append("this in")
    thread.join(30)
    assert events == ["other in", "other out", "this in"] and len(said) == 1
