"""The GPU check's suggestion of a default precision from its precision tables."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from gpu_check import suggest_default_precision  # noqa: E402


def _table(path: Path, rows: dict) -> str:
    path.write_text(json.dumps({"meta": {}, "rows": [{"precision": p, "rows_per_s": s, "top100": t}
                                                     for p, (s, t) in rows.items()]}))
    return str(path)


def test_fastest_precision_that_passes_on_every_model(tmp_path):
    digits = _table(tmp_path / "a.json", {"fp32": (100, 1.0), "tf32": (400, 0.99), "bf16": (900, 0.79),
                                          "mixed": (700, 0.94), "bf16+reduce-overhead": (2000, 0.79)})
    tuned = _table(tmp_path / "b.json", {"fp32": (100, 1.0), "tf32": (400, 0.98), "bf16": (900, 0.77),
                                         "mixed": (700, 0.88)})
    got = suggest_default_precision([digits, tuned])
    assert got.startswith("tf32 (4.00x fp32's speed, top-100 >= 0.98 on 2 model(s)")
    assert suggest_default_precision([digits]).startswith("mixed (7.00x")
    assert suggest_default_precision([digits, str(tmp_path / "missing.json")]).startswith("mixed")
    assert suggest_default_precision([str(tmp_path / "none.json")]) == "no precision table"
