"""Leave-K-out with a user's train_fn: what is checked before anything trains, and what a failed training leaves."""
from __future__ import annotations

import functools
import json
import os
import signal
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from test_eval_loo import FakeTrainer, _alive
from tiny import build_model, build_train

from forgetscore.evaluation import Query, loo
from forgetscore.evaluation.retrain import MeasureSettings, RetrainJob, run_retrains

QUICK = MeasureSettings(loss_stride=100, loss_draws=1, gen_steps=3)


def _config(**kw) -> loo.LooConfig:
    return loo.LooConfig(**{"ks": (2,), "methods": ("pixel",), "random_sets": 1, "workers": 1, "measure": QUICK,
                            "effectiveness": False, **kw})


def _specs(n: int = 1) -> list[loo.QuerySpec]:
    rng = np.random.default_rng()
    return [loo.QuerySpec(f"a {rng.choice(['red', 'blue'])} square", seed=int(rng.integers(2 ** 32)))
            for _ in range(n)]


def _never(exclude, out_dir, coupled):
    raise AssertionError("trained although the run should have stopped before training")


def _calls(path: Path) -> list[list[int]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


class HalfTrainer:
    """Saves the UNet, then fails, as a training killed midway leaves it (the rest never written)."""

    def __init__(self, src):
        self.src = src

    def __call__(self, exclude, out_dir, coupled):
        import shutil
        shutil.copytree(self.src / "unet", Path(out_dir) / "unet")
        raise RuntimeError("killed")


class BrokenTrainer:
    """Returns normally having saved a model that does not load (a config that is not JSON)."""

    def __init__(self, src):
        self.src = src

    def __call__(self, exclude, out_dir, coupled):
        import shutil
        shutil.copytree(self.src, out_dir)
        (Path(out_dir) / "unet" / "config.json").write_text("{not json")


def test_a_failed_or_broken_training_is_redone_not_reused(tmp_path):
    model_dir = build_model(tmp_path / "model")
    train_dir = build_train(tmp_path / "train", n=8)
    out, specs, cfg = tmp_path / "run", _specs(), _config()
    key = RetrainJob((), cfg.coupled).key
    with pytest.raises(RuntimeError, match="killed"):
        loo.run_loo(out, loo.LooSetup(HalfTrainer(model_dir), train_dir, specs), cfg, log=None)
    assert not (out / "retrains" / key).exists()
    with pytest.raises(ValueError, match=r"^train_fn: the model it saved does not load: .*unet.*; save the whole "):
        loo.run_loo(out, loo.LooSetup(BrokenTrainer(model_dir), train_dir, specs), cfg, log=None)
    assert not (out / "retrains" / key).exists()
    with pytest.raises(ValueError, match=r"^train_fn: returned without saving a model to out_dir"):
        loo.run_loo(out, loo.LooSetup(lambda e, d, c: None, train_dir, specs), cfg, log=None)
    # What a training killed outright (no clean-up at all) left an hour ago is cleared when the model is trained.
    left = out / "retrains" / f".{key}.tmp-killed"
    (left / "unet").mkdir(parents=True)
    (left / "unet" / "config.json").write_text("{}")
    os.utime(left, (time.time() - 7200, time.time() - 7200))
    calls = tmp_path / "calls.jsonl"
    # The failed runs recorded their trainers but trained nothing: this one is not refused.
    res = loo.run_loo(out, loo.LooSetup(FakeTrainer(model_dir, calls), train_dir, specs), cfg, log=None)
    assert _calls(calls)[0] == [] and len(_calls(calls)) == 1 + res["retrains"]
    assert not left.exists() and (out / "retrains" / key / "tokenizer").is_dir()
    assert json.loads((out / "trainer.json").read_text())["trainer"] == loo.trainer_id(FakeTrainer(model_dir, calls))


def test_models_trained_on_other_training_data_are_refused(tmp_path):
    model_dir = build_model(tmp_path / "model")
    train_dir = build_train(tmp_path / "train", n=8, seed=int(np.random.default_rng().integers(2 ** 31)))
    calls = tmp_path / "calls.jsonl"
    out, specs, cfg = tmp_path / "run", _specs(), _config()
    setup = loo.LooSetup(FakeTrainer(model_dir, calls), train_dir, specs)
    first = loo.run_loo(out, setup, cfg, log=None)
    trained = _calls(calls)
    image = train_dir / "003.png"
    st = image.stat()
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))  # as a rewritten image would be
    with pytest.raises(ValueError, match=rf"^train_dir: {str(train_dir)!r} is not the training data the models in "
                                         rf"{str(out)!r} were trained on .*give another output folder"):
        loo.run_loo(out, setup, cfg, log=None)
    assert _calls(calls) == trained
    # The same data again: accepted, and nothing is retrained.
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert loo.run_loo(out, setup, cfg, log=None)["methods"] == first["methods"]
    assert _calls(calls) == trained


def test_config_normalises_ks_and_methods():
    k = int(np.random.default_rng().integers(2, 50))
    for ks in (np.array([k, k + 1]), [np.int64(k), k + 1], (np.int32(k), np.uint8(k + 1))):
        cfg = loo.LooConfig(ks=ks, methods=["pixel", "random"])
        assert cfg.ks == (k, k + 1) and all(type(v) is int for v in cfg.ks)
        assert cfg.methods == ("pixel", "random")
        assert hash(cfg) == hash(loo.LooConfig(ks=(k, k + 1), methods=("pixel", "random")))
        assert json.loads(json.dumps(cfg.to_dict()))["ks"] == [k, k + 1]
    for ks in (np.array([]), np.array(k), np.array([[k]]), [float(k)], [True]):
        with pytest.raises(ValueError, match=r"^ks: .*give a sequence of integer Ks"):
            loo.LooConfig(ks=ks, methods=("pixel",))


@pytest.mark.parametrize("field, value", [
    ("random_sets", 0), ("random_sets", True), ("random_sets", 2.0), ("random_sets", "3"),
    ("seed", -1), ("seed", False), ("seed", 1.5), ("seed", "0"),
    ("workers", 0), ("workers", True), ("workers", 2.0),
    ("coupled", 1), ("coupled", "yes"), ("effectiveness", None),
    ("plan", {"timesteps": [0, 500]}), ("measure", {"gen_steps": 3}),
])
def test_config_refuses_bad_fields(field, value):
    with pytest.raises(ValueError, match=rf"^{field}: "):
        loo.LooConfig(ks=(2,), methods=("pixel",), **{field: value})


def test_config_keeps_good_fields_as_python_values():
    seed = int(np.random.default_rng().integers(2 ** 40))
    cfg = loo.LooConfig(ks=(2,), methods=("pixel",), random_sets=np.int64(2), seed=np.uint64(seed),
                        workers=np.int16(3), coupled=np.bool_(False))
    assert (cfg.random_sets, cfg.seed, cfg.workers, cfg.coupled) == (2, seed, 3, False)
    assert [type(v) for v in (cfg.random_sets, cfg.seed, cfg.workers, cfg.coupled)] == [int, int, int, bool]


@pytest.mark.parametrize("kw, match", [
    ({"prompt": ""}, r"^prompt: ''"), ({"prompt": "  "}, r"^prompt: "), ({"prompt": None}, r"^prompt: None"),
    ({"seed": -1}, r"^seed: -1"), ({"seed": True}, r"^seed: True"), ({"seed": 1.0}, r"^seed: 1.0"),
    ({"seed": "3"}, r"^seed: '3'"), ({"seed": 2 ** 64}, r"^seed: "), ({"label": 1.5}, r"^label: 1.5"),
    ({"label": True}, r"^label: True"),
])
def test_query_spec_refuses_bad_fields(kw, match):
    with pytest.raises(ValueError, match=match):
        loo.QuerySpec(**{"prompt": "a red square", **kw})


def test_query_spec_keeps_python_ints():
    seed = int(np.random.default_rng().integers(2 ** 40))
    q = loo.QuerySpec("a red square", seed=np.int64(seed), label=np.int8(3))
    assert (q.seed, q.label) == (seed, 3) and type(q.seed) is int and type(q.label) is int
    assert json.dumps({"seed": q.seed, "label": q.label})  # the query cache's keys


def test_setup_refuses_what_is_not_a_query_spec_or_a_function(tmp_path):
    query = Query(torch.rand(1, 8, 8) * 2 - 1, "a red square", seed=1)  # its picture would be ignored
    with pytest.raises(ValueError, match=r"^queries: item 1 is a Query, not a QuerySpec; give QuerySpec\("):
        loo.LooSetup(_never, tmp_path, [loo.QuerySpec("a red square"), query])
    for queries in ([], loo.QuerySpec("a red square"), "a red square"):
        with pytest.raises(ValueError, match=r"^queries: .*give a list of at least one QuerySpec"):
            loo.LooSetup(_never, tmp_path, queries)
    with pytest.raises(ValueError, match=r"^train_fn: 'str' is not callable; pass the function that trains"):
        loo.LooSetup("str", tmp_path, [loo.QuerySpec("a red square")])
    setup = loo.LooSetup(_never, tmp_path, (loo.QuerySpec("a red square"),))
    setup.queries.append(query)  # changed after it was made: run_loo checks again
    with pytest.raises(ValueError, match=r"^queries: item 1 is a Query"):
        loo.run_loo(tmp_path / "run", setup, _config(), log=None)
    assert not (tmp_path / "run").exists()


def test_what_a_method_needs_is_checked_before_training(tmp_path):
    train_dir = build_train(tmp_path / "train", n=6)
    labelled = [loo.QuerySpec("a red square", seed=1, label=0), loo.QuerySpec("a blue dot", seed=2, label=1)]
    labels = np.random.default_rng().integers(0, 2, 6)
    cases = [
        (("random-class",), {}, labelled, r"^labels: None, and random-class .* give LooSetup\(labels=\.\.\.\)"),
        (("random-class",), {"labels": labels[:5]}, labelled, r"^labels: shape \(5,\), but train_dir has 6 images"),
        (("random-class",), {"labels": labels[None]}, labelled, r"^labels: shape \(1, 6\)"),
        (("pixel", "random-class"), {"labels": labels}, [labelled[0], loo.QuerySpec("a dot", seed=3)],
         r"^queries: \[1\] have no label, .* QuerySpec\(prompt, seed, label=\.\.\.\)"),
        (("feature",), {"labels": labels}, labelled, r"^features: None, .* give LooSetup\(features=\.\.\.\)"),
    ]
    for methods, kw, queries, match in cases:
        with pytest.raises(ValueError, match=match):
            loo.run_loo(tmp_path / "run", loo.LooSetup(_never, train_dir, queries, **kw),
                        _config(methods=methods), log=None)
    assert not (tmp_path / "run").exists()


def test_a_train_fn_the_workers_cannot_import_is_refused_before_training(tmp_path):
    train_dir = build_train(tmp_path / "train", n=6)

    def nested(exclude, out_dir, coupled):
        _never(exclude, out_dir, coupled)

    for fn in (lambda e, d, c: _never(e, d, c), nested):
        with pytest.raises(ValueError, match=r"^train_fn: .* cannot be sent to the retraining workers .*define it "
                                             r"at a module's top level, importable by the spawned workers"):
            loo.run_loo(tmp_path / "run", loo.LooSetup(fn, train_dir, _specs()), _config(workers=2), log=None)
    assert not (tmp_path / "run").exists()


def _fit(exclude, out_dir, coupled, lr=1e-3):
    pass


def test_trainer_id_of_partials_holds_their_arguments():
    lr = float(np.random.default_rng().uniform(1e-4, 1e-2))
    a, b = functools.partial(_fit, lr=lr), functools.partial(_fit, lr=lr * 10)
    assert loo.trainer_id(a) == f"partial({__name__}._fit, lr={lr!r})"
    assert loo.trainer_id(a) != loo.trainer_id(b)
    assert loo.trainer_id(functools.partial(_fit, [1])) != loo.trainer_id(functools.partial(_fit, [2]))
    assert loo.trainer_id(functools.partial(a, coupled=True)) == f"partial({__name__}._fit, coupled=True, lr={lr!r})"


def fail_or_wait(exclude, out_dir, coupled):
    """Retrain 0 fails after a moment; the others would train for a minute. Each records its start and pid."""
    (Path(os.environ["LOO_TEST_MARKS"]) / f"{exclude[0]}").write_text(str(os.getpid()))
    if exclude == [0]:
        time.sleep(1)
        raise RuntimeError("boom in retrain 0")
    time.sleep(60)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the workers' state is read from /proc")
def test_a_failed_retrain_stops_the_others_at_once(tmp_path, monkeypatch):
    marks = tmp_path / "marks"
    marks.mkdir()
    monkeypatch.setenv("LOO_TEST_MARKS", str(marks))
    jobs = [RetrainJob((i,)) for i in range(6)]
    lines = []
    t = time.monotonic()
    try:
        with pytest.raises(RuntimeError, match="boom in retrain 0") as err:
            run_retrains(jobs, fail_or_wait, tmp_path / "retrains", [], QUICK, workers=2, log=lines.append)
        assert time.monotonic() - t < 45, "the failure waited for retrains in flight"
        if sys.version_info >= (3, 11):
            assert f"retrains/{jobs[0].key}" in " ".join(err.value.__notes__)
        assert any("failed: RuntimeError: boom in retrain 0" in line and jobs[0].key in line for line in lines)
        started = {int(p.name): int(p.read_text()) for p in marks.iterdir()}
        assert 0 in started and 5 not in started  # the queue was cancelled
        deadline = time.monotonic() + 20
        while any(_alive(pid) for pid in started.values()) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(pid) for pid in started.values()), "a retrain went on after the run failed"
        assert not [p for p in (tmp_path / "retrains").iterdir() if not p.name.startswith(".")]
    finally:
        for p in marks.iterdir():
            if _alive(pid := int(p.read_text())):
                os.kill(pid, signal.SIGKILL)


def test_a_failed_retrain_is_named_when_run_in_process(tmp_path):
    jobs = [RetrainJob((int(np.random.default_rng().integers(100)),))]
    lines = []

    def fails(exclude, out_dir, coupled):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom") as err:
        run_retrains(jobs, fails, tmp_path, [], QUICK, workers=1, log=lines.append)
    if sys.version_info >= (3, 11):
        assert err.value.__notes__ == [f"in the retrain that removes 1 images {list(jobs[0].exclude)} "
                                       f"(retrains/{jobs[0].key})"]
    assert lines[-1].endswith("failed: RuntimeError: boom")
