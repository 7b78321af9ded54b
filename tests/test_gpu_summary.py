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
    assert got.startswith("tf32 (4.00x fp32's speed on the first model, top-100 >= 0.98 on 2 model(s)")
    assert suggest_default_precision([digits]).startswith("mixed (7.00x")
    assert suggest_default_precision([digits, str(tmp_path / "missing.json")]).startswith("mixed")
    assert suggest_default_precision([str(tmp_path / "none.json")]) == "no precision table"


def _sweep(path: Path, speeds: dict) -> str:
    rows = [{"part": "precision", "method": f"LossSweep.run (precision {p})", "rows_per_s": v}
            for p, v in speeds.items()]
    rows.append({"part": "2 published", "method": "LossSweep.run (bfloat16)", "rows_per_s": 1e9})
    path.write_text(json.dumps({"meta": {}, "rows": rows}))
    return str(path)


def test_speed_is_taken_from_the_large_unet_when_it_covers_the_passing_precisions(tmp_path):
    # On the small models every precision runs at launch speed; the large UNet tells them apart.
    digits = _table(tmp_path / "a.json", {"fp32": (100, 1.0), "tf32": (99, 0.99), "fp16": (98, 0.99),
                                          "bf16": (97, 0.8)})
    tuned = _table(tmp_path / "b.json", {"fp32": (100, 1.0), "tf32": (130, 0.98), "fp16": (120, 0.95),
                                         "bf16": (110, 0.79)})
    big = _sweep(tmp_path / "s.json", {"fp32": 1000, "tf32": 2000, "fp16": 3000, "bf16": 3100})
    got = suggest_default_precision([digits, tuned], speed_path=big)
    assert got.startswith("fp16 (3.00x fp32's speed on the MSCOCO-scale UNet, top-100 >= 0.95 on 2 model(s)")
    partial = _sweep(tmp_path / "p.json", {"fp32": 1000, "tf32": 2000, "bf16": 3100})  # fp16 not timed there
    got = suggest_default_precision([digits, tuned], speed_path=partial)
    assert got.startswith("tf32 (2.00x fp32's speed on the MSCOCO-scale UNet")
    assert got.endswith("passing: fp32, tf32, fp16; not timed there: fp16)")
    no_fp32 = _sweep(tmp_path / "n.json", {"tf32": 2000, "fp16": 3000})
    assert "on the first model" in suggest_default_precision([digits, tuned], speed_path=no_fp32)
    assert suggest_default_precision([digits, tuned], speed_path=str(tmp_path / "no.json")).startswith("fp32")


def test_the_sweep_summary_prints_a_profile_row_as_its_note(tmp_path, capsys):
    from gpu_check import _summary_sweep

    path = tmp_path / "sweep.json"
    note = "device busy 91% of the median call; convolution 44%, matmul 30%"
    path.write_text(json.dumps({"meta": {}, "rows": [
        {"part": "2 published", "method": "LossSweep.run (bfloat16)", "median_s": 0.5, "rows_per_s": 32000.0},
        {"part": "2 profile", "method": "LossSweep (bfloat16)", "median_s": 0.5, "note": note},
        {"part": "2 profile", "method": "LossSweep (compile default)", "skipped": "n/a (RuntimeError: no CUPTI)"}]}))
    _summary_sweep(str(path))
    lines = capsys.readouterr().out.splitlines()
    assert lines[-3].endswith("0.500s  32000 rows/s")
    assert lines[-2].endswith(note) and lines[-1].endswith("n/a (RuntimeError: no CUPTI)")
