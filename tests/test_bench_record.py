"""The benchmarks' JSON record: kept whole on disk after every step, failures recorded, not fatal."""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _common import Results, run_meta  # noqa: E402


def test_steps_that_fail_are_recorded_and_the_rest_run(tmp_path, capsys):
    path = tmp_path / "out.json"
    res = Results(str(path), run_meta(torch.device("cpu")), rows=[])
    seen_on_disk = []

    def good(k):
        res["rows"].append({"k": k})

    def bad():
        seen_on_disk.append(json.loads(path.read_text()))  # what a kill at this moment would leave
        raise RuntimeError("out of memory (simulated)")

    res.run_steps([("a", lambda: good(1)), ("b", bad), ("c", lambda: good(2))])
    assert [r["k"] for r in res["rows"]] == [1, 2]
    assert res["errors"] == ["b: RuntimeError: out of memory (simulated)"]
    assert seen_on_disk[0]["rows"] == [{"k": 1}] and seen_on_disk[0]["errors"] == []
    rc = res.finish(0.0, lambda r: f"{len(r['rows'])} rows")
    assert rc == 1
    disk = json.loads(path.read_text())
    assert disk["rows"] == [{"k": 1}, {"k": 2}] and disk["meta"]["elapsed_s"] > 0 and disk["meta"]["device"] == "cpu"
    assert not list(tmp_path.glob("*.tmp"))
    out = capsys.readouterr().out
    assert "2 rows" in out and "b: RuntimeError" in out


def test_no_path_writes_nothing_and_a_clean_run_exits_zero(tmp_path):
    res = Results(None, {"device": "cpu"}, rows=[])
    res.run_steps([("a", lambda: res["rows"].append(1))])
    assert res.finish(0.0, str) == 0 and not list(tmp_path.iterdir())
