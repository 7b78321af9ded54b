"""The main job: `forgetscore demo` on the trained embedded model.

Trains the default digits model on first use (a few minutes on two cores; cached in
$FORGETSCORE_CACHE afterwards), then checks what the method must show on it.
"""
import json

import numpy as np
import pytest

from forgetscore import cli


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    assert cli.main(["demo", "--out", str(out), "--topk", "10"]) == 0
    return out


def test_demo_writes_every_output(demo_run):
    for name in ("model/unet", "model/tokenizer", "train/metadata.jsonl", "attribution.json", "scores.npy",
                 "gallery.png", "report.html"):
        assert (demo_run / name).exists(), name
    scores = np.load(demo_run / "scores.npy")
    assert scores.shape == (1797,) and np.isfinite(scores).all()


def test_model_makes_the_prompted_digits(demo_run):
    rec = json.loads((demo_run / "attribution.json").read_text())
    assert rec["digits_model_accuracy"] >= 0.7


def test_unlearning_is_selective(demo_run):
    rec = json.loads((demo_run / "attribution.json").read_text())
    # The query's own loss must rise far more than the average training image's.
    assert rec["query_loss_rise"] > 5 * rec["train_loss_rise_mean"] > 0


def test_top_images_share_the_query_digit_more_than_chance(demo_run):
    rec = json.loads((demo_run / "attribution.json").read_text())
    labels = np.array([json.loads(line)["label"] for line in open(demo_run / "train" / "metadata.jsonl")])
    top = [r["id"] for r in rec["top"]]
    share = np.mean(labels[top] == 7)  # the default prompt asks for a seven
    assert share > 3 * np.mean(labels == 7)
