"""The main job: `forgetscore demo` on the trained embedded model.

Trains the default digits model on first use (a few minutes on two cores; cached in
$FORGETSCORE_CACHE afterwards), then checks what the method must show on it.
"""
import contextlib
import io
import json

import numpy as np
import pytest

import tiny
from forgetscore import cli


@pytest.fixture(scope="module")
def demo_output(tmp_path_factory):
    """The demo's output folder and what it printed. Its digit accuracy is measured afresh, not read from the
    record beside the cached model, so that this stage runs too."""
    from forgetscore.digits.train import default_model_dir

    (default_model_dir() / "digit_accuracy.json").unlink(missing_ok=True)
    out = tmp_path_factory.mktemp("demo") / "run"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli.main(["demo", "--out", str(out), "--topk", "10"]) == 0
    return out, printed.getvalue()


@pytest.fixture(scope="module")
def demo_run(demo_output):
    return demo_output[0]


def test_demo_times_every_stage(demo_output):
    table = demo_output[1].split("time per stage:")[1]
    for stage in ("digit accuracy", "generate query", "unlearn", "total"):
        assert f"\n  {stage} " in table, stage
    # The scoring pass: of the unlearned model alone, or with the original's when its losses are not cached.
    assert ("\n  score after " in table) != ("\n  score before+after " in table), table


def test_digit_accuracy_shows_its_progress(tmp_path, capsys):
    from forgetscore.digits.classifier import digit_accuracy

    model = tiny.build_model(tmp_path / "model")
    capsys.readouterr()
    res = digit_accuracy(model, n_per_digit=3, steps=1, progress=True)
    assert res["predictions"].shape == (10, 3)
    assert "digit accuracy: 100%" in capsys.readouterr().err


def test_demo_writes_every_output(demo_run):
    for name in ("model/unet", "model/tokenizer", "train/metadata.jsonl", "attribution.json", "scores.npy",
                 "gallery.png", "report.html"):
        assert (demo_run / name).exists(), name
    scores = np.load(demo_run / "scores.npy")
    assert scores.shape == (1797,) and np.isfinite(scores).all()


def test_model_makes_the_prompted_digits(demo_run):
    rec = json.loads((demo_run / "attribution.json").read_text())
    assert rec["digits_model_accuracy"] >= 0.7
    from forgetscore.demo import DEMO_GUIDANCE, DEMO_SAMPLING_STEPS
    assert rec["generated"] == {"seed": 0, "steps": DEMO_SAMPLING_STEPS, "guidance_scale": DEMO_GUIDANCE}


def test_unlearning_is_selective(demo_run):
    rec = json.loads((demo_run / "attribution.json").read_text())
    # The query's own loss must rise far more than the average training image's.
    assert rec["query_loss_rise"] > 5 * rec["train_loss_rise_mean"] > 0


def test_top_images_share_the_query_digit_more_than_chance(demo_run):
    rec = json.loads((demo_run / "attribution.json").read_text())
    lines = (demo_run / "train" / "metadata.jsonl").read_text().splitlines()
    labels = np.array([json.loads(line)["label"] for line in lines])
    top = [r["id"] for r in rec["top"]]
    share = np.mean(labels[top] == 7)  # the default prompt asks for a seven
    assert share > 3 * np.mean(labels == 7)
