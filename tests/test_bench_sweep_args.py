"""The sweep benchmark's arguments: parts, torch.compile modes, the cuDNN switch and batch rows."""
import argparse
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _common import choice_list  # noqa: E402
from bench_sweep import COMPILE_MODES, FISHER_METHODS, PARTS, cudnn_benchmark, int_list, main  # noqa: E402


def test_parts_and_modes_parse_as_lists():
    assert choice_list(PARTS)("fisher, sweep") == ("fisher", "sweep")
    assert choice_list(PARTS)(",".join(PARTS)) == PARTS
    with pytest.raises(argparse.ArgumentTypeError, match="default given more than once"):
        choice_list(COMPILE_MODES)("default,max-autotune,default")
    assert choice_list(tuple(FISHER_METHODS))("func,kv") == ("func", "kv")


@pytest.mark.parametrize("choices,text", [(PARTS, "sweep,everything"), (PARTS, " , "),
                                          (COMPILE_MODES, "default,fast"), (COMPILE_MODES, ""),
                                          (tuple(FISHER_METHODS), "kv,exact")])
def test_unknown_entries_are_refused_with_the_choices(choices, text):
    with pytest.raises(argparse.ArgumentTypeError, match="give one or more of"):
        choice_list(choices)(text)


@pytest.mark.parametrize("start", [False, True])
def test_cudnn_benchmark_is_on_for_the_call_only(start, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", start)
    seen = []
    assert cudnn_benchmark(lambda: seen.append(torch.backends.cudnn.benchmark) or 7) == 7
    assert seen == [True] and torch.backends.cudnn.benchmark is start
    with pytest.raises(KeyError):
        cudnn_benchmark(lambda: {}["missing"])
    assert torch.backends.cudnn.benchmark is start


@pytest.mark.parametrize("argv,message", [(["--cudnn-benchmark"], "--cudnn-benchmark: cuDNN runs on CUDA only"),
                                          (["--batch-rows", "-5"], "--batch-rows: -5 must be >= 1")])
def test_bad_options_exit_with_a_message_naming_them(argv, message, capsys):
    assert main(["--device", "cpu", *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.fixture
def sigterm_stops(monkeypatch):
    """SIGTERM raises TimeUp for the test's length; the handler and the flag are restored after."""
    import signal

    import _common

    previous = signal.getsignal(signal.SIGTERM)
    monkeypatch.setitem(_common._STOP, "requested", False)
    _common.stop_on_sigterm()
    yield _common
    signal.signal(signal.SIGTERM, previous)


def test_sigterm_keeps_the_finished_rounds_and_stops_the_later_steps(sigterm_stops, tmp_path):
    import json
    import os
    import signal

    from bench_sweep import time_interleaved

    calls = {"a": 0, "b": 0}

    def fn(name, kill_on=None):
        def run():
            calls[name] += 1
            if calls[name] == kill_on:
                os.kill(os.getpid(), signal.SIGTERM)
        return run

    # b's third call (warm-up, round 1, round 2) is cut: a and c have one round more than b.
    times = time_interleaved({"a": fn("a"), "b": fn("b", kill_on=3), "c": lambda: None}, lambda: None, 5,
                             lambda msg: None)
    assert (times["a"]["rounds"], times["b"]["rounds"], times["c"]["rounds"]) == (2, 1, 1)
    assert sigterm_stops.stop_requested()
    # Cut during the warm-ups: nothing was timed.
    calls.update(a=0, b=0)
    times = time_interleaved({"a": fn("a"), "b": fn("b", kill_on=1)}, lambda: None, 5, lambda msg: None)
    assert times == {n: "n/a (stopped by SIGTERM before a timed round)" for n in ("a", "b")}

    result = sigterm_stops.Results(str(tmp_path / "r.json"), {}, rows=[])
    ran = []
    result.run_steps([("later", lambda: ran.append("later"))])
    assert ran == [] and result["errors"] == ["later: not run (stopped by SIGTERM)"]

    # A step that caught the signal itself (as time_interleaved does) is recorded as cut too.
    sigterm_stops._STOP["requested"] = False
    result = sigterm_stops.Results(str(tmp_path / "r.json"), {}, rows=[])
    result.run_steps([("timed", lambda: time_interleaved({"a": fn("a", kill_on=calls["a"] + 2)}, lambda: None, 5,
                                                         lambda msg: None)),
                      ("later", lambda: ran.append("later"))])
    assert ran == [] and result["errors"] == ["timed: stopped by SIGTERM; the rows it had recorded are kept",
                                              "later: not run (stopped by SIGTERM)"]
    assert json.loads((tmp_path / "r.json").read_text())["errors"] == result["errors"]


def test_a_step_cut_by_sigterm_is_recorded(sigterm_stops):
    import os
    import signal

    result = sigterm_stops.Results(None, {}, rows=[])
    ran = []

    def cut():
        result["rows"].append({"kept": True})
        os.kill(os.getpid(), signal.SIGTERM)
        ran.append("after the signal")  # never reached

    result.run_steps([("first", cut), ("second", lambda: ran.append("second"))])
    assert ran == [] and result["rows"] == [{"kept": True}]
    assert result["errors"] == ["first: stopped by SIGTERM; the rows it had recorded are kept",
                                "second: not run (stopped by SIGTERM)"]


def test_fisher_batches_parse_as_positive_ints():
    assert int_list("64, 512") == (64, 512)
    for text in ("", "64,x", "0,64", "-1"):
        with pytest.raises(argparse.ArgumentTypeError, match="64,512"):
            int_list(text)


def test_the_memory_benchmark_never_takes_an_existing_store_folder(tmp_path, capsys):
    import bench_memory

    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "mine.txt").write_text("kept")
    assert bench_memory.main(["--dir", str(tmp_path), "--images", "8"]) == 2
    assert "--dir: " in capsys.readouterr().err and (tmp_path / "store" / "mine.txt").read_text() == "kept"
    (tmp_path / "file").write_text("x")
    assert bench_memory.main(["--dir", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err
