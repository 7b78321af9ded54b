"""Ranks that were started alike, or stop together: a failure or another option on one rank alone.

torchrun gives every rank the same command line; ranks on several machines each get their own (and their
own folders). The ranks here are started by hand, as two machines' would be, each with its own options.
"""
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import tiny
from subprocs import child_env, free_port

PLAN = ["--timesteps", "5,900", "--seed", "2", "--batch-size", "8", "--chunk-size", "4"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ranks")
    return tiny.build_model(root / "model"), tiny.build_train(root / "train", n=6)


def _two_ranks(argv: list[list[str]], envs: list[dict] | None = None, timeout_s: float = 240):
    """Start rank 0 and rank 1 with their own arguments (after `python`); (return code, stderr) of each."""
    port = free_port()
    procs = []
    for rank, args in enumerate(argv):
        env = dict(child_env(), WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), **((envs or [{}, {}])[rank]))
        procs.append(subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True))
    deadline = time.monotonic() + timeout_s
    try:
        out = []
        for p in procs:
            _, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            out.append((p.returncode, err))
        return out
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _last_line(err: str) -> str:
    return err.strip().splitlines()[-1]


def test_ranks_started_with_other_options_are_refused_on_every_rank(dirs, tmp_path):
    model, train = dirs
    common = ["-m", "forgetscore", "score", "--model", str(model), "--train", str(train), "--cache", str(tmp_path / "c")]
    results = _two_ranks([common + PLAN, common + PLAN[:-1] + ["8"]])  # rank 1: another --chunk-size
    for code, err in results:
        assert code == 2, err
        assert _last_line(err) == ("forgetscore score: error: ranks: rank 1 was started with another chunk_size than "
                                   "rank 0 (8 vs 4); give every rank the same options"), err
    assert not list((tmp_path / "c").glob("before-*"))  # refused before any sweep


def test_a_check_failing_on_one_rank_stops_both_at_once(dirs, tmp_path):
    """As a folder missing on one machine would: rank 0 is told why and stops, rather than wait for rank 1."""
    model, train = dirs
    common = ["-m", "forgetscore", "score", "--model", str(model), *PLAN]
    started = time.monotonic()
    (code0, err0), (code1, err1) = _two_ranks([common + ["--train", str(train), "--cache", str(tmp_path / "c")],
                                               common + ["--train", str(tmp_path / "absent"),
                                                         "--cache", str(tmp_path / "c")]])
    assert time.monotonic() - started < 200
    missing = str(tmp_path / "absent" / "metadata.jsonl")
    assert code1 == 2 and _last_line(err1).startswith(f"forgetscore score: error: --train: {missing!r} not found"), err1
    assert code0 == 2 and _last_line(err0).startswith("forgetscore score: error: rank 1 failed: train: "), err0


def test_a_cache_the_ranks_do_not_share_is_refused_before_any_work(dirs, tmp_path):
    model, train = dirs
    common = ["-m", "forgetscore", "score", "--model", str(model), "--train", str(train), *PLAN]
    results = _two_ranks([common + ["--cache", str(tmp_path / "a")], common + ["--cache", str(tmp_path / "b")]])
    for code, err in results:
        assert code == 2, err
        assert "is not one folder for all ranks: rank 1 does not see a file rank 0 wrote there" in _last_line(err), err
    assert not any(p.name.startswith(".forgetscore-ranks") for p in tmp_path.rglob("*"))  # the probe is removed


def test_queries_that_differ_between_ranks_are_refused(dirs, tmp_path):
    """Rank 0 alone unlearns; every rank must sweep the same queries (their count sets the collectives too)."""
    model, train = dirs
    common = ["-m", "forgetscore", "attribute", "--model", str(model), "--train", str(train), *PLAN,
              "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "out"), "--generate-seed", "1",
              "--fisher-samples", "4", "--draws", "4", "--micro-batch", "4"]
    results = _two_ranks([common + ["--prompt", "a red square"], common + ["--prompt", "a blue line"]])
    for code, err in results:
        assert code == 2, err
        assert _last_line(err).startswith("forgetscore attribute: error: ranks: rank 1 was started with another "
                                          "prompts than rank 0 (['a blue line'] vs ['a red square'])"), err


AGREE = textwrap.dedent("""
    import sys
    from pathlib import Path
    from forgetscore.attribution import ranks

    ranks.init_distributed("cpu")
    rank = ranks.distributed_env()[0]

    def check():
        if rank == 1:
            raise OSError("disk gone")
        return 5

    try:
        ranks.agree(check)
    except OSError as exc:
        print("failed:", exc, file=sys.stderr)
    # After a failure every rank is still in step: the next collective pairs up as it should.
    print("value:", ranks.agree(lambda: rank * 10, lambda v: {"n": 1}), file=sys.stderr)
    ranks.check_shared(Path(sys.argv[1]), "cache")
    print("shared", file=sys.stderr)
    ranks.leave_distributed()
""")


def test_agree_passes_a_failure_on_and_keeps_the_ranks_in_step(tmp_path):
    script = tmp_path / "agree.py"
    script.write_text(AGREE)
    (code0, err0), (code1, err1) = _two_ranks([[str(script), str(tmp_path / "shared")]] * 2, timeout_s=120)
    assert code0 == code1 == 0, err0 + err1
    assert err0.splitlines() == ["failed: rank 1 failed: disk gone", "value: 0", "shared"], err0
    assert err1.splitlines() == ["failed: disk gone", "value: 10", "shared"], err1
    assert not (tmp_path / "shared").exists()  # made for the check alone, and removed


LEAVE = textwrap.dedent("""
    import os
    import sys

    from forgetscore.attribution import ranks

    ranks.init_distributed()
    ranks.all_gather(1)
    import diffusers.models  # noqa: F401  (as loading a model does, after the join)

    ranks.leave_distributed()
    threads = sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))
    print("gloo threads:", [t for t in threads if "gloo" in t], file=sys.stderr)
""")


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="lists threads through /proc")
def test_leaving_the_group_stops_its_threads_though_diffusers_was_imported_after_the_join(tmp_path):
    # A group that outlives destroy_process_group is torn down with the interpreter, where ranks were seen to abort.
    script = tmp_path / "leave.py"
    script.write_text(LEAVE)
    for code, err in _two_ranks([[str(script)]] * 2, timeout_s=120):
        assert code == 0, err
        assert err.splitlines()[-1] == "gloo threads: []", err


@pytest.mark.parametrize("command", [["demo", "--out", "x"], ["report", "--out", "x"], ["cache"]])
def test_commands_of_one_process_refuse_torchrun(command, monkeypatch, capsys):
    from forgetscore import cli

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert cli.main(command) == 2
    assert capsys.readouterr().err.strip() == (
        f"forgetscore {command[0]}: error: {command[0]} runs in one process, but torchrun started 2; run it without "
        "torchrun (only prepare, fisher, score, attribute share their work between ranks)")
