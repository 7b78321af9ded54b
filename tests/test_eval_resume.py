"""What an evaluation's output folder keeps: one run's settings, resumable scoring, progress lines a kill keeps."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import tiny
from subprocs import child_env
from test_eval_custom import TINY, _pixels_as_features, build_digits_vocab_model
from test_eval_loo import FakeTrainer

from forgetscore.attribution import ScoringPlan, TrainingSet
from forgetscore.attribution import losses as engine_losses
from forgetscore.attribution.unlearning import UnlearnConfig
from forgetscore.evaluation import custom, loo, methods, store
from forgetscore.evaluation.retrain import MeasureSettings, RetrainJob

pytestmark = pytest.mark.usefixtures("one_thread")

QUICK = MeasureSettings(loss_stride=100, loss_draws=1, gen_steps=3)
PLAN = ScoringPlan(timesteps=(100, 700), flips=False)


def _calls(path: Path) -> list:
    return path.read_text().splitlines() if path.is_file() else []


def _stamps(root: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def loo_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("loo")
    return tiny.build_model(root / "model"), tiny.build_train(root / "train", n=12)


def _loo(model_dir, train_dir, calls, **kw):
    setup = loo.LooSetup(FakeTrainer(model_dir, calls), train_dir, [loo.QuerySpec("a red square", seed=1),
                                                                   loo.QuerySpec("a big blue circle", seed=2)])
    cfg = loo.LooConfig(**{"ks": (2,), "methods": ("pixel",), "random_sets": 1, "workers": 1, "measure": QUICK,
                           "effectiveness": False, "plan": PLAN, **kw})
    return setup, cfg


def test_loo_refuses_another_protocol_or_plan_before_training(loo_dirs, tmp_path):
    model_dir, train_dir = loo_dirs
    calls, out = tmp_path / "calls.jsonl", tmp_path / "run"
    loo.run_loo(out, *_loo(model_dir, train_dir, calls), log=None)
    trained, before = _calls(calls), _stamps(out)
    for kw, match in (({"coupled": False}, r"^out: .* holds the models of a coupled run, and this run is uncoupled "
                                           r"\(coupled: True there, False here\);.* give another output folder "
                                           r"\(--out\) for this run, or resume that one without --uncoupled$"),
                      ({"plan": ScoringPlan.with_stride(250, flips=False)},
                       r"^out: .* holds a run scored under another plan \(timesteps: \[100, 700\] there, \[0, 250, "
                       r"500, 750\] here\);.* give another output folder \(--out\) for this plan, or resume that "
                       r"run with its plan$")):
        with pytest.raises(ValueError, match=match):
            loo.run_loo(out, *_loo(model_dir, train_dir, calls, **kw), log=None)
        assert _calls(calls) == trained and _stamps(out) == before  # refused before anything trained or changed
    assert not (out / "retrains" / RetrainJob((), False).key).exists()
    # A folder of an earlier version records neither: results.json says which, or else the original model there.
    record = json.loads((out / "trainer.json").read_text())
    (out / "trainer.json").write_text(json.dumps({k: record[k] for k in ("trainer", "train", "train_dir")}))
    with pytest.raises(ValueError, match=r"plan \(timesteps: \[100, 700\] there"):
        loo.run_loo(out, *_loo(model_dir, train_dir, calls, plan=ScoringPlan.with_stride(250, flips=False)), log=None)
    (out / "results.json").unlink()
    with pytest.raises(ValueError, match=r"holds the models of a coupled run"):
        loo.run_loo(out, *_loo(model_dir, train_dir, calls, coupled=False), log=None)
    assert _calls(calls) == trained
    # The same settings resume (more methods and Ks may be added), and the record is complete again.
    loo.run_loo(out, *_loo(model_dir, train_dir, calls, ks=(2, 3), methods=("pixel", "random")), log=None)
    assert json.loads((out / "trainer.json").read_text())["coupled"] is True
    # The other protocol in a folder of its own.
    res = loo.run_loo(tmp_path / "uncoupled", *_loo(model_dir, train_dir, calls, coupled=False), log=None)
    assert res["config"]["coupled"] is False


def test_the_help_says_what_a_resumed_run_must_match(capsys):
    from forgetscore import cli

    for which, same in (("loo", "--recipe, --uncoupled and --plan-stride"), ("custom", "--quick and --pool-captions")):
        with pytest.raises(SystemExit):
            cli.main(["evaluate", which, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert f"a run already there is resumed if it had the same {same} (a run with others is refused" in text


@pytest.fixture(scope="module")
def custom_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("custom")
    return build_digits_vocab_model(root / "model"), tiny.build_train(root / "train", n=9, seed=3)


def _custom_kw(custom_dirs, **kw):
    return {"methods": ("pixel",), "settings": replace(TINY, concepts=("segment",)), "model_dir": custom_dirs[0],
            "train_dir": custom_dirs[1], "features": _pixels_as_features, "log": None, **kw}


def test_custom_refuses_other_settings_before_any_work(custom_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("FORGETSCORE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    first = custom.run_custom(out, **_custom_kw(custom_dirs))
    before = _stamps(out)
    with pytest.raises(ValueError, match=r"^out: .* holds a run made with other settings \(pool_captions: "
                                         r"'fine-tuning' there, 'plain' here\);.* give another output folder "
                                         r"\(--out\), or that run's settings \(--pool-captions fine-tuning\)$"):
        custom.run_custom(out, **_custom_kw(custom_dirs, pool_captions="plain"))
    assert _stamps(out) == before  # pool, keys, scores and results as the first run left them
    quick = replace(custom.QUICK_SETTINGS, concepts=("segment",))
    with pytest.raises(ValueError, match=r"custom_steps: 2 there, 300 here.*that run's settings$"):
        custom.run_custom(out, **_custom_kw(custom_dirs, settings=quick))
    # A folder of an earlier version has only results.json, which says the same.
    (out / custom.SETTINGS_FILE).unlink()
    with pytest.raises(ValueError, match=r"pool_captions: 'fine-tuning' there, 'plain' here"):
        custom.run_custom(out, **_custom_kw(custom_dirs, pool_captions="plain"))
    # Other methods and other concepts are the same run, extended; its scores are reused.
    again = custom.run_custom(out, **_custom_kw(custom_dirs, methods=("pixel", "caption"),
                                                settings=replace(TINY, concepts=("segment", "triangle"))))
    assert again["concepts"]["segment"]["per_method"]["pixel"] == first["concepts"]["segment"]["per_method"]["pixel"]
    assert json.loads((out / custom.SETTINGS_FILE).read_text())["pool_captions"] == "fine-tuning"
    plain = custom.run_custom(tmp_path / "plain", **_custom_kw(custom_dirs, pool_captions="plain"))
    assert plain["settings"]["pool_captions"] == "plain"


class Interrupt(Exception):
    pass


REAL_SWEEP_RUN = engine_losses.LossSweep.run


def _counting_sweeps(monkeypatch, fail_at: int | None):
    """LossSweep.run counted per call (the images of each chunk); the call numbered `fail_at` raises."""
    real, seen = REAL_SWEEP_RUN, []

    def run(self, variants, indices, *a, **k):
        if fail_at is not None and len(seen) == fail_at:
            raise Interrupt("killed")
        seen.append(len(indices))
        return real(self, variants, indices, *a, **k)

    monkeypatch.setattr(engine_losses.LossSweep, "run", run)
    return seen


def _small_sweeps(monkeypatch):
    # Batches of 8 rows (1 to 4 images here) and chunks of about 3 images: a pass of several chunks.
    monkeypatch.setattr(engine_losses, "AUTO_BATCH_CPU", 8)
    monkeypatch.setattr(store, "SCORING_CHUNK", 3)
    monkeypatch.setattr(methods, "DEFAULT_UNLEARN", UnlearnConfig(steps=1, alpha=0.01, draws=20, micro_batch=10))


def test_an_interrupted_loo_scoring_resumes_and_chunks_change_no_bit(loo_dirs, tmp_path, monkeypatch):
    model_dir, train_dir = loo_dirs
    _small_sweeps(monkeypatch)
    calls, out = tmp_path / "calls.jsonl", tmp_path / "run"
    setup, cfg = _loo(model_dir, train_dir, calls, methods=("unlearning",))
    seen = _counting_sweeps(monkeypatch, fail_at=2)
    with pytest.raises(Interrupt):
        loo.run_loo(out, setup, cfg, log=None)
    assert not (out / "scores" / "unlearning.npy").exists() and len(seen) == 2
    first = sum(seen)
    seen = _counting_sweeps(monkeypatch, fail_at=None)
    loo.run_loo(out, setup, cfg, log=None)
    assert sum(seen) == 12 - first  # the two finished chunks were read back, not swept again
    chunked = np.load(out / "scores" / "unlearning.npy")
    # The same pass in one chunk (as before chunks were set), in a folder of its own: the same bits.
    monkeypatch.setattr(loo, "scoring_chunk_size", lambda a: a.chunk_size)
    seen = _counting_sweeps(monkeypatch, fail_at=None)
    loo.run_loo(tmp_path / "whole", setup, cfg, log=None)
    assert seen == [12]
    assert np.array_equal(np.load(tmp_path / "whole" / "scores" / "unlearning.npy"), chunked)


def test_an_interrupted_custom_scoring_resumes_and_chunks_change_no_bit(custom_dirs, tmp_path, monkeypatch):
    _small_sweeps(monkeypatch)
    monkeypatch.setenv("FORGETSCORE_CACHE", str(tmp_path / "cache"))
    kw = _custom_kw(custom_dirs, methods=("unlearning",), settings=replace(TINY, concepts=("segment",), batch_size=8))
    n = len(TrainingSet.load(custom_dirs[1])) + TINY.n_exemplars
    out = tmp_path / "run"
    seen = _counting_sweeps(monkeypatch, fail_at=1)
    with pytest.raises(Interrupt):
        custom.run_custom(out, **kw)
    first = sum(seen)
    assert 0 < first < n
    seen = _counting_sweeps(monkeypatch, fail_at=None)
    custom.run_custom(out, **kw)
    assert sum(seen) == n - first
    chunked = np.load(out / "concepts" / "segment" / "scores" / "unlearning.npy")
    monkeypatch.setattr(custom, "scoring_chunk_size", lambda a: a.chunk_size)
    monkeypatch.setenv("FORGETSCORE_CACHE", str(tmp_path / "cache-whole"))  # its own before-losses
    seen = _counting_sweeps(monkeypatch, fail_at=None)
    custom.run_custom(tmp_path / "whole", **kw)
    assert seen == [n]
    assert np.array_equal(np.load(tmp_path / "whole" / "concepts" / "segment" / "scores" / "unlearning.npy"), chunked)


def test_chunks_start_where_the_unchunked_batches_do(loo_dirs, tmp_path):
    from forgetscore.attribution import Attributor

    a = Attributor.load(loo_dirs[0], loo_dirs[1], plan=PLAN, cache_dir=tmp_path / "cache", batch_size=8,
                        progress=False)
    starts = {int(b[0]) for b in a.sweep().image_batches(np.arange(12))}
    for target in (1, 3, 5, 8):
        c = store.scoring_chunk_size(a, target)
        assert c < 12 and all(s in starts for s in range(0, 12, c))
    a.batch_size = 10 ** 6  # one batch: no boundary to cut at, so one chunk as before
    assert store.scoring_chunk_size(a, 3) == a.chunk_size >= 12


KILLED = """
import os, signal, sys
from pathlib import Path

sys.path.insert(0, {tests!r})
from tiny import build_train
from forgetscore.evaluation import custom, loo


def kill(*args, **kw):
    os.kill(os.getpid(), signal.SIGKILL)


root = Path({root!r})
train = build_train(root / "train", n=4)
if sys.argv[1] == "loo":  # killed as it trains the original model
    loo.run_loo(root / "out", loo.LooSetup(kill, train, [loo.QuerySpec("a red square")]),
                loo.LooConfig(ks=(1,), methods=("pixel",), workers=1))
else:  # killed as it customizes (the base model is never read before)
    custom.customize = kill
    (root / "model").mkdir()
    custom.run_custom(root / "out", methods=("pixel",), settings=custom.CustomSettings(concepts=("segment",)),
                      model_dir=root / "model", train_dir=train)
"""


@pytest.mark.parametrize("which, line", [("loo", "training the original model"),
                                         ("custom", "[segment] customizing (800 steps)")])
def test_progress_lines_survive_a_kill_with_output_in_a_file(tmp_path, which, line):
    script = tmp_path / "run.py"
    script.write_text(KILLED.format(tests=str(Path(__file__).parent), root=str(tmp_path)))
    env = child_env()
    env.pop("PYTHONUNBUFFERED", None)  # as most shells have it: stdout into a file is block-buffered
    log = tmp_path / "log.txt"
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, str(script), which], stdout=f, stderr=subprocess.PIPE, env=env,
                              timeout=300)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert log.read_text() == line + "\n"
