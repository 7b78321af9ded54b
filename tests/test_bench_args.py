"""The sweep benchmark's list arguments: parts and torch.compile modes."""
import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_sweep import COMPILE_MODES, PARTS, list_arg  # noqa: E402


def test_parts_and_modes_parse_as_lists():
    assert list_arg(PARTS)("fisher, sweep") == ("fisher", "sweep")
    assert list_arg(PARTS)(",".join(PARTS)) == PARTS
    assert list_arg(COMPILE_MODES)("default,max-autotune,default") == ("default", "max-autotune")


@pytest.mark.parametrize("choices,text", [(PARTS, "sweep,everything"), (PARTS, " , "),
                                          (COMPILE_MODES, "default,fast"), (COMPILE_MODES, "")])
def test_unknown_entries_are_refused_with_the_choices(choices, text):
    with pytest.raises(argparse.ArgumentTypeError, match="give one or more of"):
        list_arg(choices)(text)
