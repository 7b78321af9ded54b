"""The sweep benchmark's list arguments: parts and torch.compile modes."""
import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_sweep import PARTS, compile_modes_arg, parts_arg  # noqa: E402


def test_parts_and_modes_parse_as_lists():
    assert parts_arg("sweep, fisher") == {"sweep", "fisher"}
    assert parts_arg(",".join(sorted(PARTS))) == PARTS
    assert compile_modes_arg("default,max-autotune,default") == ("default", "max-autotune")


@pytest.mark.parametrize("fn,text", [(parts_arg, "sweep,everything"), (parts_arg, " , "),
                                     (compile_modes_arg, "default,fast"), (compile_modes_arg, "")])
def test_unknown_entries_are_refused_with_the_choices(fn, text):
    with pytest.raises(argparse.ArgumentTypeError, match="give one or more of"):
        fn(text)
