"""The sweep benchmark's arguments: parts, torch.compile modes, the cuDNN switch and batch rows."""
import argparse
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_sweep import COMPILE_MODES, FISHER_METHODS, PARTS, cudnn_benchmark, list_arg, main  # noqa: E402


def test_parts_and_modes_parse_as_lists():
    assert list_arg(PARTS)("fisher, sweep") == ("fisher", "sweep")
    assert list_arg(PARTS)(",".join(PARTS)) == PARTS
    assert list_arg(COMPILE_MODES)("default,max-autotune,default") == ("default", "max-autotune")
    assert list_arg(tuple(FISHER_METHODS))("func,kv") == ("func", "kv")


@pytest.mark.parametrize("choices,text", [(PARTS, "sweep,everything"), (PARTS, " , "),
                                          (COMPILE_MODES, "default,fast"), (COMPILE_MODES, ""),
                                          (tuple(FISHER_METHODS), "kv,exact")])
def test_unknown_entries_are_refused_with_the_choices(choices, text):
    with pytest.raises(argparse.ArgumentTypeError, match="give one or more of"):
        list_arg(choices)(text)


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
