"""Leave-K-out: remove each method's top-K images, retrain, and measure what the query lost.

The paper's gold standard, for any model the engine supports given a training function.
For every method, query and K the top-K training images are removed and the model is
retrained from scratch with the original recipe and seed; ΔL (the query's loss rise)
and ΔG (how far its regeneration moved) compare the retrain with the original model.

Random removals are drawn per K, independently of the query, and shared by all queries:
they are the noise floor every method is compared with.  Every stage is cached in the
output directory (scores per method, each retrain and its measurements), so an
interrupted run picks up where it stopped.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import time

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..attribution.attributor import Attributor
from ..attribution.data import TrainingSet
from ..attribution.io import read_json, write_json
from ..attribution.plan import ScoringPlan
from .base import EvalContext, FeatureFn, Query, top_k
from .counterfactual import feature_similarity, pixel_mse
from .metrics import mean_se
from .retrain import MeasureSettings, RetrainJob, TrainFn, run_retrains
from .store import cached_scores

Log = Callable[[str], None]
# Five timesteps: the scoring time of the default run fits its hour.  The top-K then turns over
# noticeably with the plan's noise seed (benchmarks/RESULTS.md); the paper's MSCOCO plan is stride 50.
DEFAULT_PLAN_STRIDE = 200


@dataclass(frozen=True)
class LooConfig:
    ks: tuple[int, ...]
    methods: tuple[str, ...]
    random_sets: int = 3
    coupled: bool = True
    workers: int = 2
    seed: int = 0
    plan: ScoringPlan = field(default_factory=lambda: ScoringPlan.with_stride(DEFAULT_PLAN_STRIDE, flips=False))
    measure: MeasureSettings = field(default_factory=MeasureSettings)
    effectiveness: bool = True

    def __post_init__(self) -> None:
        from .methods import METHODS

        # Checked here, not when the run reaches them: that is after the original model is trained.
        if isinstance(self.ks, (str, int)) or not self.ks or any(
                isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in self.ks):
            raise ValueError(f"ks: {self.ks!r}: give a sequence of integer Ks >= 1, e.g. (9, 18, 54)")
        if isinstance(self.methods, str) or not self.methods:
            raise ValueError(f"methods: {self.methods!r}: give a sequence of method names, e.g. ('unlearning',)")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"methods: unknown {unknown}; choose from {', '.join(METHODS)}")
        for name, values in (("ks", self.ks), ("methods", self.methods)):
            repeated = sorted({v for v in values if list(values).count(v) > 1}, key=str)
            if repeated:  # each would be a second, identical column of the table
                raise ValueError(f"{name}: {repeated[0]!r} is given twice; give each once")
        if self.random_sets < 1:
            raise ValueError(f"random_sets: {self.random_sets} must be >= 1 (the noise floor needs random removals)")
        if self.workers < 1:
            raise ValueError(f"workers: {self.workers} must be >= 1")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["plan"] = self.plan.to_dict()
        return d


@dataclass(frozen=True)
class QuerySpec:
    """A query to generate with the original model: prompt, seed and (optionally) its class."""

    prompt: str
    seed: int = 0
    label: int | None = None


@dataclass
class LooSetup:
    """The model's world: how to retrain it, its training folder, the queries, labels, features."""

    train_fn: TrainFn
    train_dir: Path
    queries: list[QuerySpec]
    labels: np.ndarray | None = None
    features: FeatureFn | None = None


def random_set(n: int, k: int, seed: int, r: int) -> tuple[int, ...]:
    rng = np.random.default_rng([seed, k, r, 0x524E44])
    return tuple(sorted(int(i) for i in rng.choice(n, size=k, replace=False)))


def method_scores(ctx: EvalContext, queries: Sequence[Query], names: Sequence[str], root: Path,
                  log: Log | None) -> dict[str, np.ndarray]:
    """[Q, N] scores of each method (cached as root/<name>.npy, keyed on the method, model, data, queries)."""
    from .methods import build

    a = ctx.attributor
    common = {"unet_id": a.model.unet_id(), "encoders_id": a.model.encoders_id(), "train": a.train.identity(),
              "plan": a.plan.to_dict(), "seed": ctx.seed, "queries": [q.fingerprint() for q in queries]}
    out = {}
    for name in names:
        method = build(name)
        t = time.perf_counter()
        s, reused = cached_scores(root / f"{name}.npy", {"method": name, "settings": repr(method), **common},
                                  lambda m=method: m.scores(ctx, queries))
        if s.shape != (len(queries), ctx.n_train):
            raise RuntimeError(f"method {name} returned scores of shape {s.shape}")
        if log and not reused:
            log(f"scored with {name} ({time.perf_counter() - t:.0f} s)")
        out[name] = s
    return out


def removal_jobs(scores: dict[str, np.ndarray], config: LooConfig, n: int
                 ) -> dict[tuple[str, int, int], RetrainJob]:
    """{(method, K, query index or random draw): job}."""
    jobs = {}
    for k in config.ks:
        for r in range(config.random_sets):
            jobs[("random", k, r)] = RetrainJob(random_set(n, k, config.seed, r), config.coupled)
        for name, s in scores.items():
            if name == "random":
                continue
            for q in range(s.shape[0]):
                jobs[(name, k, q)] = RetrainJob(tuple(sorted(int(i) for i in top_k(s[q], k))), config.coupled)
    return jobs


def _mean_se(values: Sequence[float]) -> dict[str, float | None]:
    v = np.asarray(values, dtype=np.float64)
    # A diverged retrain's NaN/inf is shown as it is rather than stopping the whole table.
    mean, se = mean_se(v) if np.isfinite(v).all() else (float(v.mean()), None)
    return {"mean": mean, "se": se, "n": int(len(v))}


def aggregate(jobs: dict[tuple[str, int, int], RetrainJob], measured: dict[str, dict], original: dict,
              methods: Sequence[str], config: LooConfig, features: FeatureFn | None) -> dict:
    """Per method and K: ΔL, MSE, feature similarity (mean ± se over queries), plus diagnostics."""
    base_l = original["losses"].numpy()
    base_img = original["images"]
    q_count = len(base_l)
    out: dict = {}
    for name in methods:
        out[name] = {}
        for k in config.ks:
            dl, mse, sim, others = [], [], [], []
            for q in range(q_count):
                keys = ([jobs[("random", k, r)].key for r in range(config.random_sets)] if name == "random"
                        else [jobs[(name, k, q)].key])
                ms = [measured[key] for key in keys]
                dl.append(np.mean([m["losses"][q].item() - base_l[q] for m in ms]))
                mse.append(np.mean([pixel_mse(m["images"][q:q + 1], base_img[q:q + 1])[0] for m in ms]))
                if features is not None:
                    sim.append(np.mean([feature_similarity(m["images"][q:q + 1], base_img[q:q + 1], features)[0]
                                        for m in ms]))
                rest = [i for i in range(q_count) if i != q]
                if rest:
                    others.append(np.mean([m["losses"][i].item() - base_l[i] for m in ms for i in rest]))
            cell = {"delta_loss": _mean_se(dl), "regen_mse": _mean_se(mse),
                    "delta_loss_per_query": [float(x) for x in dl]}
            if sim:
                cell["regen_feature_similarity"] = _mean_se(sim)
            if others:
                cell["delta_loss_other_queries"] = _mean_se(others)
            if name == "random":
                every = [measured[jobs[("random", k, r)].key]["losses"][q].item() - base_l[q]
                         for r in range(config.random_sets) for q in range(q_count)]
                cell["noise_floor_std"] = float(np.std(every, ddof=1)) if len(every) > 1 else None  # undefined
            out[name][str(k)] = cell
    return out


def unlearning_effectiveness(attributor: Attributor, queries: Sequence[Query], base: torch.Tensor,
                             settings: MeasureSettings, config=None, log: Log | None = None) -> dict:
    """The paper's check: after unlearning a query, its regeneration moves; other prompts' barely do.

    `base`: the original model's regenerations [Q, C, H, W] (its measurement, made with `settings`).
    """
    from ..threads import torch_threads
    from .counterfactual import regenerate
    from .methods import DEFAULT_UNLEARN

    target, others = [], []
    for qi, q in enumerate(queries):
        if log:
            log(f"unlearning effectiveness: query {qi + 1}/{len(queries)}")
        weights = attributor.unlearn(q.image, q.prompt, config or DEFAULT_UNLEARN)
        with torch_threads(settings.threads):  # as the original's measurement, so only the weights differ
            moved = regenerate(attributor.model, queries, steps=settings.gen_steps,
                               guidance_scale=settings.guidance_scale, weights=weights)
        mse = pixel_mse(moved, base)
        target.append(float(mse[qi]))
        others.extend(float(m) for i, m in enumerate(mse) if i != qi)
    # With one query there are no other prompts: null, not the NaN mean of nothing (which is not JSON).
    return {"target_mse": _mean_se(target), "other_mse": _mean_se(others) if others else None}


TRAINER_FILE = "trainer.json"


def trainer_id(train_fn: TrainFn) -> str:
    """What names a training procedure across runs: a dataclass's repr (a recipe's settings), else the
    function's or class's qualified name."""
    if dataclasses.is_dataclass(train_fn) and not isinstance(train_fn, type):
        return repr(train_fn)
    target = train_fn if inspect.isfunction(train_fn) or inspect.ismethod(train_fn) else type(train_fn)
    return f"{target.__module__}.{target.__qualname__}"


def _check_trainer(out: Path, train_fn: TrainFn) -> str:
    """That the models already in `out` were trained the way this run trains (its retrains, the original model
    and the queries made from it are reused by key, and the key does not hold the recipe); recorded the first time."""
    trainer = trainer_id(train_fn)
    path = out / TRAINER_FILE
    if path.is_file():
        made_by = read_json(path).get("trainer")
        if made_by != trainer:
            raise ValueError(f"out: {str(out)!r} holds models trained by {made_by}, and this run trains with "
                             f"{trainer}; give another output folder, or the training recipe of that run")
    else:
        write_json(path, {"trainer": trainer})
    return trainer


def run_loo(out_dir: str | Path, setup: LooSetup, config: LooConfig, log: Log | None = print) -> dict:
    """The whole evaluation; writes results.json, table.md and delta_loss.png into `out_dir`."""
    from .report import write_loo_report

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not setup.queries:
        raise ValueError("queries: give at least one query prompt")
    n_train = len(TrainingSet.load(setup.train_dir))
    if max(config.ks) >= n_train:  # checked before any training: the removals need images left to train on
        raise ValueError(f"ks: {max(config.ks)} leaves nothing to train on; every K must be below the {n_train} "
                         "training images")
    trainer = _check_trainer(out, setup.train_fn)
    retrain_root = out / "retrains"
    # The original model is the retrain that removes nothing (under the same protocol).
    original_job = RetrainJob((), config.coupled)
    original_dir = retrain_root / original_job.key
    if not (original_dir / "unet").is_dir():
        if log:
            log("training the original model")
        setup.train_fn([], original_dir, config.coupled)
    attributor = Attributor.load(original_dir, setup.train_dir, plan=config.plan, cache_dir=out / "cache",
                                 progress=False)
    queries = make_queries(attributor.model, setup.queries, config.measure, out / "queries.pt")
    original = run_retrains([original_job], setup.train_fn, retrain_root, queries, config.measure, workers=1,
                            log=None)[original_job.key]
    ctx = EvalContext(attributor, labels=setup.labels, features=setup.features, seed=config.seed)
    scores = method_scores(ctx, queries, config.methods, out / "scores", log)
    jobs = removal_jobs(scores, config, ctx.n_train)
    # Largest K first: its effects are the largest, so a run stopped early has its most telling rows.
    ordered = sorted(jobs.values(), key=lambda j: -len(j.exclude))
    measured = run_retrains(ordered, setup.train_fn, retrain_root, queries, config.measure,
                            workers=config.workers, log=log)
    from .. import __version__

    results = {
        "version": __version__,
        "config": config.to_dict(),
        "trainer": trainer,
        "n_train": ctx.n_train,
        "queries": [{"prompt": q.prompt, "seed": q.seed, "label": q.label, "name": q.name} for q in queries],
        "original_query_loss": original["losses"].tolist(),
        "methods": aggregate(jobs, measured, original, ["random"] + [m for m in config.methods if m != "random"],
                             config, setup.features),
        "retrains": len({j.key for j in jobs.values()}),
        "retrain_seconds_mean": float(np.mean([m["train_seconds"] for m in measured.values()])),
    }
    if config.effectiveness:
        results["unlearning_effectiveness"] = unlearning_effectiveness(attributor, queries, original["images"],
                                                                       config.measure, log=log)
    write_json(out / "results.json", results)
    write_loo_report(out, results)
    return results


def make_queries(model, specs: Sequence[QuerySpec], settings: MeasureSettings, path: Path) -> list[Query]:
    """Generate the queries with the original model (cached in `path`).

    A query already in the cache (same prompt, seed, label, model and sampler settings) keeps
    its picture; only new ones are generated, so adding queries leaves the others' work valid.
    """
    import io

    from ..attribution.generate import generate
    from ..attribution.io import write_bytes

    want = [{"prompt": s.prompt, "seed": s.seed, "label": s.label} for s in specs]
    setting = {"steps": settings.gen_steps, "guidance_scale": settings.guidance_scale, "unet_id": model.unet_id()}
    have: dict[str, torch.Tensor] = {}
    if path.is_file():
        saved = torch.load(path, weights_only=False)
        if saved["settings"] == setting:
            have = {json.dumps(sp, sort_keys=True): img for sp, img in zip(saved["specs"], saved["images"])}
    keys = [json.dumps(sp, sort_keys=True) for sp in want]
    missing = [i for i, k in enumerate(keys) if k not in have]
    if missing:
        new = generate(model, [specs[i].prompt for i in missing], [specs[i].seed for i in missing],
                       steps=settings.gen_steps, guidance_scale=settings.guidance_scale).cpu()
        have.update({keys[i]: img for i, img in zip(missing, new)})
        buf = io.BytesIO()
        torch.save({"specs": [json.loads(k) for k in have], "settings": setting,
                    "images": torch.stack(list(have.values()))}, buf)
        write_bytes(path, buf.getvalue())
    return [Query(have[k], **spec, name=f"q{i}") for i, (k, spec) in enumerate(zip(keys, want))]
