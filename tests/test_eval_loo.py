"""The leave-K-out machinery: removal sets, retrain bookkeeping and caching, aggregation, the CLI."""
from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from conftest import fresh_seed
from tiny import build_model, build_train

from forgetscore.evaluation import base, loo
from forgetscore.evaluation.retrain import MeasureSettings, RetrainJob
from forgetscore.threads import torch_threads


def test_top_k_order_and_ties():
    s = np.array([0.5, 2.0, 2.0, -1.0, 3.0])
    assert base.top_k(s, 3).tolist() == [4, 1, 2]  # tie 1/2 broken by the lower index
    rng = np.random.default_rng()
    x = rng.normal(size=50)
    assert base.top_k(x, 7).tolist() == np.argsort(-x, kind="stable")[:7].tolist()
    with pytest.raises(ValueError, match="k:"):
        base.top_k(s, 0)
    with pytest.raises(ValueError, match="k:"):
        base.top_k(s, 6)


def test_removal_jobs_share_random_sets_and_dedupe():
    rng = np.random.default_rng()
    n, q = 40, 3
    scores = {"pixel": rng.normal(size=(q, n)), "caption": rng.normal(size=(q, n))}
    scores["caption"][1] = scores["pixel"][1]  # the same ranking for query 1: one retrain
    # The reverse ranking for query 0: disjoint top-k sets (two independent draws share their top 2 once in 780).
    scores["caption"][0] = -scores["pixel"][0]
    cfg = loo.LooConfig(ks=(2, 5), methods=("pixel", "caption", "random"), random_sets=2)
    jobs = loo.removal_jobs(scores, cfg, n)
    for k in cfg.ks:
        for qi in range(q):
            want = sorted(np.argsort(-scores["pixel"][qi], kind="stable")[:k].tolist())
            assert list(jobs[("pixel", k, qi)].exclude) == want
        assert jobs[("pixel", k, 1)].key == jobs[("caption", k, 1)].key
        assert jobs[("pixel", k, 0)].key != jobs[("caption", k, 0)].key
        sets = [jobs[("random", k, r)].exclude for r in range(2)]
        assert all(len(set(s)) == k and max(s) < n for s in sets) and sets[0] != sets[1]
    assert ("random", 2, 2) not in jobs  # random sets are per K, not per query
    # the same seed draws the same random sets; another seed other ones
    again = loo.removal_jobs(scores, cfg, n)
    assert again[("random", 5, 1)].key == jobs[("random", 5, 1)].key
    other = loo.removal_jobs(scores, loo.LooConfig(ks=(5,), methods=("pixel",), seed=1), n)
    assert other[("random", 5, 0)].key != jobs[("random", 5, 0)].key
    # the protocol is part of the identity
    assert RetrainJob((1, 2), True).key != RetrainJob((1, 2), False).key
    assert RetrainJob((2, 1), True).key == RetrainJob((1, 2), True).key


def test_aggregate_against_hand_formulas():
    rng = np.random.default_rng()
    q, k = 4, 3
    cfg = loo.LooConfig(ks=(k,), methods=("pixel",), random_sets=2)
    scores = {"pixel": rng.normal(size=(q, 20))}
    jobs = loo.removal_jobs(scores, cfg, 20)
    original = {"losses": torch.tensor(rng.random(q)), "images": torch.rand(q, 1, 4, 4) * 2 - 1}
    measured = {j.key: {"losses": original["losses"] + torch.tensor(rng.normal(size=q) * 1e-3),
                        "images": torch.rand(q, 1, 4, 4) * 2 - 1} for j in jobs.values()}
    feat = lambda x: x.flatten(1).numpy() + 2.0  # noqa: E731
    res = loo.aggregate(jobs, measured, original, ["random", "pixel"], cfg, feat)
    base_l = original["losses"].numpy()
    dl = [measured[jobs[("pixel", k, i)].key]["losses"][i].item() - base_l[i] for i in range(q)]
    cell = res["pixel"][str(k)]
    assert cell["delta_loss"]["mean"] == pytest.approx(np.mean(dl), rel=1e-12)
    assert cell["delta_loss"]["se"] == pytest.approx(np.std(dl, ddof=1) / np.sqrt(q), rel=1e-12)
    img = measured[jobs[("pixel", k, 2)].key]["images"][2].double()
    mse2 = float((img - original["images"][2].double()).square().mean())
    assert cell["regen_mse"]["mean"] == pytest.approx(
        np.mean([float((measured[jobs[("pixel", k, i)].key]["images"][i].double()
                        - original["images"][i].double()).square().mean()) for i in range(q)]), rel=1e-9)
    assert mse2 > 0
    a, b = feat(img[None].float())[0], feat(original["images"][2:3])[0]
    want_sim = a @ b / np.linalg.norm(a) / np.linalg.norm(b)
    sims = cell["delta_loss_per_query"]
    assert len(sims) == q
    others = [np.mean([measured[jobs[("pixel", k, i)].key]["losses"][j].item() - base_l[j] for j in range(q) if j != i])
              for i in range(q)]
    assert cell["delta_loss_other_queries"]["mean"] == pytest.approx(np.mean(others), rel=1e-12)
    rnd = [np.mean([measured[jobs[("random", k, r)].key]["losses"][i].item() - base_l[i] for r in range(2)])
           for i in range(q)]
    assert res["random"][str(k)]["delta_loss"]["mean"] == pytest.approx(np.mean(rnd), rel=1e-12)
    every = [measured[jobs[("random", k, r)].key]["losses"][i].item() - base_l[i] for r in range(2) for i in range(q)]
    assert res["random"][str(k)]["noise_floor_std"] == pytest.approx(np.std(every, ddof=1), rel=1e-12)
    from forgetscore.evaluation.counterfactual import feature_similarity
    assert feature_similarity(img[None].float(), original["images"][2:3], feat)[0] == pytest.approx(want_sim)


class FakeTrainer:
    """'Retrains' the tiny model by moving one bias by an amount set by the removed ids; counts calls."""

    def __init__(self, src, log):
        self.src, self.log = src, log

    def __call__(self, exclude, out_dir, coupled=True):
        from forgetscore.attribution.io import write_dir

        with open(self.log, "a") as f:
            f.write(json.dumps(sorted(int(i) for i in exclude)) + "\n")

        def fill(tmp):
            shutil.copytree(self.src, tmp, dirs_exist_ok=True)
            from diffusers import UNet2DConditionModel
            unet = UNet2DConditionModel.from_pretrained(tmp / "unet")
            with torch.no_grad():
                unet.conv_out.bias += 1e-2 * sum((i + 1) ** 0.5 for i in exclude)
            unet.save_pretrained(tmp / "unet")
        write_dir(out_dir, fill)


def test_run_loo_end_to_end_and_resume(tmp_path):
    model_dir = build_model(tmp_path / "model")
    train_dir = build_train(tmp_path / "train", n=12)
    calls = tmp_path / "calls.jsonl"
    setup = loo.LooSetup(FakeTrainer(model_dir, calls), train_dir,
                         [loo.QuerySpec("a red square", seed=1), loo.QuerySpec("a big blue circle", seed=2)],
                         features=lambda x: x.flatten(1).numpy())
    cfg = loo.LooConfig(ks=(2, 4), methods=("pixel", "random"), random_sets=2, workers=1,
                        measure=MeasureSettings(loss_stride=100, loss_draws=1, gen_steps=3),
                        effectiveness=False)
    out = tmp_path / "run"
    res = loo.run_loo(out, setup, cfg, log=None)
    trained = [json.loads(line) for line in calls.read_text().splitlines()]
    jobs = loo.removal_jobs({"pixel": np.load(out / "scores" / "pixel.npy")}, cfg, 12)
    assert len(trained) == 1 + len({j.key for j in jobs.values()}) == res["retrains"] + 1
    assert trained[0] == []
    assert sorted(map(tuple, trained[1:])) == sorted({j.exclude for j in jobs.values()})
    # ΔL is the retrained query loss minus the original's, under the same draws
    from forgetscore.attribution.model import DiffusionModel
    from forgetscore.evaluation.counterfactual import query_losses
    from forgetscore.evaluation.retrain import load_measurement
    qs = loo.make_queries(DiffusionModel.load(out / "retrains" / RetrainJob(()).key), setup.queries, cfg.measure,
                          out / "queries.pt")
    j = jobs[("pixel", 4, 1)]
    with torch_threads(1):  # measurements run on one thread; bits depend on the count
        lo = query_losses(DiffusionModel.load(out / "retrains" / RetrainJob(()).key), qs, stride=100, draws=1)
        lr = query_losses(DiffusionModel.load(out / "retrains" / j.key), qs, stride=100, draws=1)
    assert load_measurement(out / "retrains", j)["losses"].numpy() == pytest.approx(lr, rel=1e-12)
    assert res["methods"]["pixel"]["4"]["delta_loss_per_query"][1] == pytest.approx(lr[1] - lo[1], rel=1e-9,
                                                                                     abs=1e-15)
    for name in ("results.json", "table.md", "delta_loss.png"):
        assert (out / name).is_file()
    assert "| pixel |" in (out / "table.md").read_text()
    # a second run redoes nothing
    again = loo.run_loo(out, setup, cfg, log=None)
    assert len(calls.read_text().splitlines()) == len(trained)
    assert again["methods"] == res["methods"]
    # losing one measurement redoes only that retrain's measurement (the model is on disk)
    (out / "retrains" / f"{j.key}.pt").unlink()
    loo.run_loo(out, setup, cfg, log=None)
    assert len(calls.read_text().splitlines()) == len(trained)
    assert (out / "retrains" / f"{j.key}.pt").is_file()


def test_more_queries_reuse_retrains_and_pictures(tmp_path):
    """Adding a query to a finished run: old pictures kept, no removal trained twice, all re-measured."""
    model_dir = build_model(tmp_path / "model")
    train_dir = build_train(tmp_path / "train", n=12)
    calls = tmp_path / "calls.jsonl"
    specs = [loo.QuerySpec("a red square", seed=1), loo.QuerySpec("a big blue circle", seed=2)]
    cfg = loo.LooConfig(ks=(3,), methods=("pixel", "random"), random_sets=2, workers=1,
                        measure=MeasureSettings(loss_stride=100, loss_draws=1, gen_steps=3), effectiveness=False)
    out = tmp_path / "run"
    small = loo.run_loo(out, loo.LooSetup(FakeTrainer(model_dir, calls), train_dir, specs), cfg, log=None)
    before = torch.load(out / "queries.pt", weights_only=False)["images"].clone()
    big = loo.run_loo(out, loo.LooSetup(FakeTrainer(model_dir, calls), train_dir,
                                        specs + [loo.QuerySpec("a small green square", seed=3)]), cfg, log=None)
    trained = [tuple(json.loads(line)) for line in calls.read_text().splitlines()]
    assert len(trained) == len(set(trained))  # nothing trained twice (the original included)
    saved = torch.load(out / "queries.pt", weights_only=False)
    assert torch.equal(saved["images"][:2], before)
    assert len(big["queries"]) == 3
    for key in ("random", "pixel"):
        got = big["methods"][key]["3"]["delta_loss_per_query"]
        assert got[:2] == pytest.approx(small["methods"][key]["3"]["delta_loss_per_query"], rel=1e-9, abs=1e-15)
    from forgetscore.evaluation.retrain import load_measurement
    for f in (out / "retrains").glob("*.pt"):
        m = torch.load(f, weights_only=False)
        assert len(m["losses"]) == 3 and len(m["queries"]) == 3
    # a measurement of other queries is not returned for these
    qs = [base.Query(torch.zeros(1, 4, 4), "x")]
    assert load_measurement(out / "retrains", RetrainJob(()), qs) is None
    assert load_measurement(out / "retrains", RetrainJob(())) is not None
    # nor one made with other measurement settings
    assert load_measurement(out / "retrains", RetrainJob(()), settings=cfg.measure) is not None
    assert load_measurement(out / "retrains", RetrainJob(()), settings=replace(cfg.measure, loss_draws=2)) is None


def test_query_fingerprint_and_cached_scores(tmp_path):
    from forgetscore.evaluation.store import cached_scores

    img = torch.randn(1, 4, 4)
    q = base.Query(img, "a red square", seed=1, label=2)
    assert q.fingerprint() == base.Query(img.clone(), "a red square", seed=1, label=2, name="other").fingerprint()
    changed = img.clone()
    changed[0, 0, 0] += 1e-6
    for other in (base.Query(changed, "a red square", 1, 2), base.Query(img, "a red circle", 1, 2),
                  base.Query(img, "a red square", 2, 2), base.Query(img, "a red square", 1, 3)):
        assert other.fingerprint() != q.fingerprint()
    calls = []

    def compute():
        calls.append(1)
        return np.random.default_rng().normal(size=(2, 5))

    a, reused = cached_scores(tmp_path / "m.npy", {"method": "m", "queries": ["x"]}, compute)
    assert not reused
    b, reused = cached_scores(tmp_path / "m.npy", {"method": "m", "queries": ["x"]}, compute)
    assert reused and np.array_equal(a, b) and len(calls) == 1
    c, reused = cached_scores(tmp_path / "m.npy", {"method": "m", "queries": ["x", "y"]}, compute)
    assert not reused and len(calls) == 2 and not np.array_equal(a, c)


def test_config_errors():
    with pytest.raises(ValueError, match="ks:"):
        loo.LooConfig(ks=(), methods=("pixel",))
    with pytest.raises(ValueError, match="random_sets:"):
        loo.LooConfig(ks=(1,), methods=("pixel",), random_sets=0)
    with pytest.raises(ValueError, match="method:"):
        from forgetscore.evaluation.methods import build
        build("nope")
    # Names and repeats are checked as the config is made, before the run trains anything.
    for kw, match in (({"methods": ("pixel", "unlearnng")}, r"methods: unknown \['unlearnng'\]; choose from "),
                      ({"methods": "pixel"}, r"methods: 'pixel': give a sequence of method names"),
                      ({"methods": ("pixel", "pixel")}, r"methods: 'pixel' is given twice"),
                      ({"ks": (9, 18, 9)}, r"ks: 9 is given twice"),
                      ({"ks": 9}, r"ks: 9: give a sequence of integer Ks"),
                      ({"ks": (9.5,)}, r"ks: \(9.5,\): give a sequence of integer Ks")):
        with pytest.raises(ValueError, match=match):
            loo.LooConfig(**{"ks": (1,), "methods": ("pixel",), **kw})
    cfg = loo.LooConfig(ks=(np.int64(3),), methods=["pixel", "random"])
    assert cfg.ks == (3,) and type(cfg.ks[0]) is int and cfg.methods == ("pixel", "random")


def test_cli_evaluate_loo_smoke(tmp_path, capsys):
    from forgetscore import cli

    out = tmp_path / "run"
    args = ["evaluate", "loo", "--out", str(out), "--recipe", "smoke", "--queries", "2", "--ks", "3",
            "--methods", "pixel,random-class", "--random-sets", "1", "--workers", "1", "--plan-stride", "250"]
    assert cli.main(args) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["plan"]["timesteps"] == [0, 250, 500, 750]
    assert res["version"] == __import__("forgetscore").__version__
    assert set(res["methods"]) == {"random", "pixel", "random-class"}
    assert [q["label"] for q in res["queries"]] == [7, 1]
    assert res["config"]["coupled"] is True and res["retrains"] == 5
    assert "| pixel |" in capsys.readouterr().out
    assert cli.main(["evaluate", "loo", "--out", str(out), "--methods", "nope"]) == 2
    assert "--methods" in capsys.readouterr().err
    assert cli.main(["evaluate", "loo", "--out", str(out), "--plan-stride", "0"]) == 2
    assert "--plan-stride" in capsys.readouterr().err


def test_cli_evaluate_custom_refuses_unknown_methods(tmp_path, capsys):
    from forgetscore import cli

    assert cli.main(["evaluate", "custom", "--out", str(tmp_path / "c"), "--methods", "nope"]) == 2
    assert "nope" in capsys.readouterr().err
    assert not (tmp_path / "c" / "results.json").exists()


def test_unlearning_effectiveness_separates_target_and_others(tmp_path):
    from forgetscore.attribution import Attributor, ScoringPlan, UnlearnConfig
    from forgetscore.evaluation.counterfactual import regenerate

    att = Attributor.load(build_model(tmp_path / "model"), build_train(tmp_path / "train", n=6),
                          plan=ScoringPlan(timesteps=(100, 700), flips=False), cache_dir=tmp_path / "cache",
                          progress=False)
    g = torch.Generator().manual_seed(fresh_seed("query"))
    qs = [base.Query(torch.rand(1, 8, 8, generator=g) * 2 - 1, p, seed=i)
          for i, p in enumerate(["a red square", "a big blue dot", "a small green line"])]
    settings = MeasureSettings(gen_steps=3)
    cfg = UnlearnConfig(draws=8, micro_batch=4, damping=0.1, alpha=1.0)
    with torch_threads(1):
        orig = regenerate(att.model, qs, steps=3, guidance_scale=settings.guidance_scale)
    res = loo.unlearning_effectiveness(att, qs, orig, settings, cfg)
    target, others = [], []
    for qi, q in enumerate(qs):  # by hand: regenerate everything under query qi's unlearned weights
        w = att.unlearn(q.image, q.prompt, cfg)
        with torch_threads(1):
            moved = regenerate(att.model, qs, steps=3, guidance_scale=settings.guidance_scale, weights=w)
        err = (moved.double() - orig.double()).square().flatten(1).mean(1)
        target.append(float(err[qi]))
        others += [float(e) for i, e in enumerate(err) if i != qi]
    assert res["target_mse"]["mean"] == pytest.approx(np.mean(target), rel=1e-9)
    assert res["other_mse"]["mean"] == pytest.approx(np.mean(others), rel=1e-9)
    assert res["target_mse"]["n"] == 3 and res["other_mse"]["n"] == 6
    assert res["target_mse"]["mean"] > 0


def test_a_folder_of_models_trained_another_way_is_refused(tmp_path):
    """Retrains are reused by their removed ids: models of another recipe must not be taken for this one's."""
    from forgetscore.digits.evaluation import DigitsTrainer

    model_dir = build_model(tmp_path / "model")
    train_dir = build_train(tmp_path / "train", n=12)
    calls = tmp_path / "calls.jsonl"
    specs = [loo.QuerySpec("a red square", seed=1)]
    cfg = loo.LooConfig(ks=(3,), methods=("pixel",), random_sets=1, workers=1,
                        measure=MeasureSettings(loss_stride=100, loss_draws=1, gen_steps=3), effectiveness=False)
    out = tmp_path / "run"
    res = loo.run_loo(out, loo.LooSetup(FakeTrainer(model_dir, calls), train_dir, specs), cfg, log=None)
    assert res["trainer"] == f"{__name__}.FakeTrainer" == loo.trainer_id(FakeTrainer(model_dir, calls))
    trained = calls.read_text()
    with pytest.raises(ValueError, match=r"^out: .* holds models trained by .*FakeTrainer, and this run trains with "
                                         r"DigitsTrainer\(recipe='smoke'\); give another output folder"):
        loo.run_loo(out, loo.LooSetup(DigitsTrainer("smoke"), train_dir, specs), cfg, log=None)
    assert calls.read_text() == trained
    assert loo.trainer_id(DigitsTrainer("smoke")) != loo.trainer_id(DigitsTrainer("default"))


def _small_run(queries: int):
    """A leave-3-out run's jobs over 20 images, pixel scores and one random set, with made-up measurements."""
    rng = np.random.default_rng()
    cfg = loo.LooConfig(ks=(3,), methods=("pixel",), random_sets=1)
    jobs = loo.removal_jobs({"pixel": rng.normal(size=(queries, 20))}, cfg, 20)
    original = {"losses": torch.tensor(rng.random(queries)), "images": torch.rand(queries, 1, 4, 4) * 2 - 1}
    measured = {j.key: {"losses": original["losses"] + 1e-3, "images": torch.rand(queries, 1, 4, 4) * 2 - 1}
                for j in jobs.values()}
    return cfg, jobs, measured, original


def test_one_query_and_one_random_set_give_valid_json_and_a_table():
    """Undefined figures (the noise floor of one removal, other prompts of one query) are null and shown as —."""
    from forgetscore.evaluation.report import loo_table

    cfg, jobs, measured, original = _small_run(queries=1)
    methods = loo.aggregate(jobs, measured, original, ["random", "pixel"], cfg, None)
    assert methods["random"]["3"]["noise_floor_std"] is None
    assert "delta_loss_other_queries" not in methods["pixel"]["3"]
    results = {"config": cfg.to_dict(), "n_train": 20, "queries": [{"prompt": "p"}], "methods": methods,
               "unlearning_effectiveness": {"target_mse": {"mean": 0.1, "se": None, "n": 1}, "other_mse": None}}
    json.dumps(results, allow_nan=False)  # strict JSON: no NaN anywhere
    table = loo_table(results)
    assert "| *noise floor (std of random removals)* | — |" in table and "other prompts —." in table
    # One query: its ΔL has no standard error (not one of 0).
    assert methods["pixel"]["3"]["delta_loss"]["se"] is None
    assert " ± —" in table and "± 0.00" not in table


def test_a_diverged_retrain_shows_as_nan_without_stopping_the_table():
    cfg, jobs, measured, original = _small_run(queries=3)
    bad = jobs[("pixel", 3, 1)].key
    measured[bad] = {**measured[bad], "losses": torch.tensor([0.1, float("nan"), 0.2], dtype=torch.float64)}
    cell = loo.aggregate(jobs, measured, original, ["random", "pixel"], cfg, None)["pixel"]["3"]
    assert np.isnan(cell["delta_loss"]["mean"]) and cell["delta_loss"]["se"] is None and cell["delta_loss"]["n"] == 3
    # The finite figures keep their standard errors (ddof=1 over the three queries).
    mse = cell["regen_mse"]
    assert mse["se"] is not None and mse["se"] > 0


WORKER_SCRIPT = """
import os, sys, time
from forgetscore.evaluation.retrain import worker_pool

def job(path):
    with open(path + ".tmp", "w") as fh:
        fh.write(str(os.getpid()))
    os.replace(path + ".tmp", path)
    time.sleep(120)

if __name__ == "__main__":
    pool = worker_pool(1)
    pool.submit(job, sys.argv[1])
    time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")  # a zombie has ended; only its parent's reaping is left


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the workers end with their parent on Linux")
def test_retraining_workers_end_when_the_run_is_killed(tmp_path):
    import signal
    import subprocess
    import time

    (tmp_path / "run.py").write_text(WORKER_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(tmp_path / "run.py"), str(tmp_path / "pid")], cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "pid").is_file():
            assert proc.poll() is None and time.monotonic() < deadline, "the worker never started its job"
            time.sleep(0.2)
        worker = int((tmp_path / "pid").read_text())
        assert _alive(worker)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 30
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(worker), "the worker went on after its run was killed"
    finally:
        proc.kill()
        if (tmp_path / "pid").is_file() and _alive(worker := int((tmp_path / "pid").read_text())):
            os.kill(worker, signal.SIGKILL)
