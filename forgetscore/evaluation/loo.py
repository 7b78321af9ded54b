"""Leave-K-out: remove each method's top-K images, retrain, and measure what the query lost.

The paper's gold standard, for any model the engine supports given a training function.
For every method, query and K the top-K training images are removed and the model is
retrained from scratch with the original recipe and seed; ΔL (the query's loss rise)
and ΔG (how far its regeneration moved) compare the retrain with the original model.

Random removals are drawn per K, independently of the query, and shared by all queries:
they are the noise floor every method is compared with.  Every stage is cached in the
output directory (scores per method, each retrain and its measurements), so an
interrupted run picks up where it stopped.  The directory records the training function, the
training folder's identity, the protocol (coupled or not) and the scoring plan (trainer.json): a
run with another one refuses the folder rather than reusing or overwriting what is there.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import pickle
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
from .base import EvalContext, FeatureFn, Query, say, top_k
from .counterfactual import feature_similarity, pixel_mse
from .metrics import mean_se
from .retrain import MeasureSettings, RetrainJob, TrainFn, run_retrains, trained_model
from .store import cached_scores, differences, scoring_chunk_size

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
        try:
            ks = None if isinstance(self.ks, (str, bytes)) else tuple(self.ks)
        except TypeError:  # one number, not a sequence
            ks = None
        if ks is None or len(ks) == 0 or any(not _is_int(k) or k < 1 for k in ks):
            raise ValueError(f"ks: {self.ks!r}: give a sequence of integer Ks >= 1, e.g. (9, 18, 54)")
        # A tuple of Python ints: the frozen config stays hashable and its results stay JSON.
        object.__setattr__(self, "ks", tuple(int(k) for k in ks))
        try:
            methods = None if isinstance(self.methods, str) else tuple(self.methods)
        except TypeError:
            methods = None
        if not methods or any(not isinstance(m, str) for m in methods):
            raise ValueError(f"methods: {self.methods!r}: give a sequence of method names, e.g. ('unlearning',)")
        object.__setattr__(self, "methods", methods)
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"methods: unknown {unknown}; choose from {', '.join(METHODS)}")
        for name, values in (("ks", self.ks), ("methods", self.methods)):
            repeated = sorted({v for v in values if list(values).count(v) > 1}, key=str)
            if repeated:  # each would be a second, identical column of the table
                raise ValueError(f"{name}: {repeated[0]!r} is given twice; give each once")
        for name, low, why in (("random_sets", 1, "the noise floor needs random removals"),
                               ("workers", 1, "the retrains run that many at a time"),
                               ("seed", 0, "it draws the random removals")):
            value = getattr(self, name)
            if not _is_int(value) or value < low:
                raise ValueError(f"{name}: {value!r} must be an int >= {low} ({why})")
            object.__setattr__(self, name, int(value))
        for name in ("coupled", "effectiveness"):
            value = getattr(self, name)
            if not isinstance(value, (bool, np.bool_)):
                raise ValueError(f"{name}: {value!r} must be True or False")
            object.__setattr__(self, name, bool(value))
        if not isinstance(self.plan, ScoringPlan):
            raise ValueError(f"plan: a {type(self.plan).__name__}, not a ScoringPlan; pass e.g. "
                             f"ScoringPlan.with_stride({DEFAULT_PLAN_STRIDE}, flips=False)")
        if not isinstance(self.measure, MeasureSettings):
            raise ValueError(f"measure: a {type(self.measure).__name__}, not a MeasureSettings; pass e.g. "
                             "MeasureSettings(gen_steps=25)")

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

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError(f"prompt: {self.prompt!r}: give QuerySpec the query's text, a non-empty string")
        if not _is_int(self.seed) or not 0 <= self.seed < 2 ** 64:
            raise ValueError(f"seed: {self.seed!r}: give QuerySpec an int seed in [0, 2**64) (it draws the "
                             "query's starting noise)")
        if self.label is not None and not _is_int(self.label):
            raise ValueError(f"label: {self.label!r}: give QuerySpec the class as an int, or None")
        # Python ints: the specs are keys of the query cache (JSON).
        object.__setattr__(self, "seed", int(self.seed))
        object.__setattr__(self, "label", None if self.label is None else int(self.label))


@dataclass
class LooSetup:
    """The model's world: how to retrain it, its training folder, the queries, labels, features."""

    train_fn: TrainFn
    train_dir: Path
    queries: list[QuerySpec]
    labels: np.ndarray | None = None
    features: FeatureFn | None = None

    def __post_init__(self) -> None:
        self._check()

    def _check(self) -> None:
        """The checks that need no training folder (run_loo repeats them: the setup may have changed)."""
        if not callable(self.train_fn):
            raise ValueError(f"train_fn: {self.train_fn!r} is not callable; pass the function that trains the "
                             "model, train_fn(exclude_ids, out_dir, coupled)")
        try:
            queries = None if isinstance(self.queries, (str, QuerySpec)) else list(self.queries)
        except TypeError:
            queries = None
        if not queries:
            raise ValueError(f"queries: {self.queries!r}: give a list of at least one QuerySpec")
        for i, q in enumerate(queries):
            if not isinstance(q, QuerySpec):
                # A Query's picture would be dropped: the queries are generated with the original model.
                raise ValueError(f"queries: item {i} is a {type(q).__name__}, not a QuerySpec; give "
                                 "QuerySpec(prompt, seed, label): each query is generated with the original model")
        self.queries = queries
        if self.features is not None and not callable(self.features):
            raise ValueError(f"features: {self.features!r} is not callable; pass a function from pixels "
                             "[B, C, H, W] to features [B, D], or None")


def _is_int(v: object) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


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
    """What names a training procedure across runs: a dataclass's repr (a recipe's settings), a partial's
    function and arguments, else the function's or class's qualified name."""
    if dataclasses.is_dataclass(train_fn) and not isinstance(train_fn, type):
        return repr(train_fn)
    if isinstance(train_fn, functools.partial):
        args = [repr(a) for a in train_fn.args] + [f"{k}={v!r}" for k, v in sorted(train_fn.keywords.items())]
        return f"partial({', '.join([trainer_id(train_fn.func)] + args)})"
    target = train_fn if inspect.isroutine(train_fn) else type(train_fn)
    return f"{target.__module__}.{target.__qualname__}"


def _has_models(root: Path) -> bool:
    """Whether the retrains folder holds a model or a measurement (hidden names are unfinished attempts)."""
    return root.is_dir() and any(not p.name.startswith(".") for p in root.iterdir())


def _made_under(out: Path, made: dict) -> dict:
    """The protocol ("coupled") and plan of the run whose models are in `out`: as trainer.json records them, or
    for a folder of an earlier version, as its results.json does, or (the protocol) which original model is there."""
    found = {k: made[k] for k in ("coupled", "plan") if k in made}
    if len(found) < 2 and (out / "results.json").is_file():
        try:
            config = read_json(out / "results.json").get("config", {})
        except (OSError, ValueError, AttributeError):  # damaged: what it said is unknown
            config = {}
        found = {**{k: config[k] for k in ("coupled", "plan") if k in config}, **found}
    if "coupled" not in found:
        originals = [c for c in (True, False) if (out / "retrains" / RetrainJob((), c).key).is_dir()]
        if len(originals) == 1:
            found["coupled"] = originals[0]
    return found


def _plan_words(plan: dict) -> str:
    """How the command line gives `plan`, where it does (timesteps 0, S, 2S, ... without flips)."""
    ts = list(plan.get("timesteps", []))
    stride = ts[1] - ts[0] if len(ts) > 1 else None
    if stride and ts == list(range(0, ts[-1] + 1, stride)) and plan.get("flips") is False:
        return f"--plan-stride {stride}"
    return "its plan"


def _check_trainer(out: Path, trainer: str, data: TrainingSet, config: LooConfig) -> None:
    """That the models already in `out` were trained the way this run trains and on this training data (its
    retrains, the original model and the queries made from it are reused by key, and the key holds neither),
    under this protocol and scored under this plan. Recorded before anything trains; a record beside no model
    (its run trained nothing) binds nothing."""
    path = out / TRAINER_FILE
    data_id = data.identity()
    plan = json.loads(json.dumps(config.plan.to_dict()))
    if path.is_file() and _has_models(out / "retrains"):
        made = read_json(path)
        if made.get("trainer") != trainer:
            raise ValueError(f"out: {str(out)!r} holds models trained by {made.get('trainer')}, and this run trains "
                             f"with {trainer}; give another output folder, or the training recipe of that run")
        if made.get("train", data_id) != data_id:  # a record older than this check has no data id
            raise ValueError(f"train_dir: {str(data.root)!r} is not the training data the models in {str(out)!r} "
                             f"were trained on (recorded from {made.get('train_dir')!r}; its images or "
                             "metadata.jsonl changed since, or it is a copy that did not keep the files' times); "
                             "give another output folder, or put that training folder back as it was")
        # Refused, not kept side by side in subfolders: results.json, the table and the scores are the folder's
        # own, so a run of other settings stopped midway would leave a folder that mixes the two (and the
        # prepared data in out/cache belongs to one protocol's original model: each protocol trains its own).
        there = _made_under(out, made)
        if there.get("coupled", config.coupled) != config.coupled:
            words = {True: "coupled", False: "uncoupled"}
            fix = "without --uncoupled" if there["coupled"] else "with --uncoupled"
            raise ValueError(f"out: {str(out)!r} holds the models of a {words[there['coupled']]} run, and this run "
                             f"is {words[config.coupled]} (coupled: {there['coupled']} there, {config.coupled} "
                             "here); the prepared data, queries and scores there belong to that run's original "
                             "model, and each protocol trains its own; give another output folder (--out) for "
                             f"this run, or resume that one {fix}")
        if there.get("plan", plan) != plan:
            raise ValueError(f"out: {str(out)!r} holds a run scored under another plan "
                             f"({'; '.join(differences(there['plan'], plan))}); its scores, and the removals "
                             "retrained from them, were made under that plan; give another output folder (--out) "
                             f"for this plan, or resume that run with {_plan_words(there['plan'])}")
    write_json(path, {"trainer": trainer, "train": data_id, "train_dir": str(Path(data.root).resolve()),
                      "coupled": config.coupled, "plan": plan})


def _check_inputs(setup: LooSetup, config: LooConfig, n_train: int) -> None:
    """What the chosen methods need besides the model, checked before the original model is trained."""
    if "random-class" in config.methods:
        drop = "; or drop random-class from methods"
        if setup.labels is None:
            raise ValueError("labels: None, and random-class draws among the images of the query's class; give "
                             f"LooSetup(labels=...), the class of every training image (shape ({n_train},))" + drop)
        if np.shape(setup.labels) != (n_train,):
            raise ValueError(f"labels: shape {np.shape(setup.labels)}, but train_dir has {n_train} images; give "
                             f"LooSetup(labels=...) one class per training image (shape ({n_train},))" + drop)
        missing = [i for i, q in enumerate(setup.queries) if q.label is None]
        if missing:
            raise ValueError(f"queries: {missing[:5]} have no label, and random-class needs each query's class; "
                             "give QuerySpec(prompt, seed, label=...)" + drop)
    if "feature" in config.methods and setup.features is None:
        raise ValueError("features: None, and the feature method compares image embeddings; give "
                         "LooSetup(features=...), a function from pixels [B, C, H, W] in [-1, 1] to features "
                         "[B, D]; or drop feature from methods")
    if config.workers > 1:
        try:
            pickle.dumps(setup.train_fn)
        except Exception as exc:
            raise ValueError(f"train_fn: {trainer_id(setup.train_fn)} cannot be sent to the retraining workers "
                             f"({type(exc).__name__}: {exc}); define it at a module's top level, importable by the "
                             "spawned workers (not a lambda or a function inside a function), or pass "
                             "LooConfig(workers=1)") from None


def run_loo(out_dir: str | Path, setup: LooSetup, config: LooConfig, log: Log | None = say) -> dict:
    """The whole evaluation; writes results.json, table.md and delta_loss.png into `out_dir`."""
    from .report import write_loo_report

    if not isinstance(setup, LooSetup):
        raise ValueError(f"setup: a {type(setup).__name__}; pass a LooSetup(train_fn, train_dir, queries)")
    if not isinstance(config, LooConfig):
        raise ValueError(f"config: a {type(config).__name__}; pass a LooConfig(ks=..., methods=...)")
    # Everything is checked before anything trains.
    setup._check()
    data = TrainingSet.load(setup.train_dir)
    n_train = len(data)
    if max(config.ks) >= n_train:  # the removals need images left to train on
        raise ValueError(f"ks: {max(config.ks)} leaves nothing to train on; every K must be below the {n_train} "
                         "training images")
    _check_inputs(setup, config, n_train)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    trainer = trainer_id(setup.train_fn)
    _check_trainer(out, trainer, data, config)
    retrain_root = out / "retrains"
    # The original model is the retrain that removes nothing (under the same protocol).
    original_job = RetrainJob((), config.coupled)
    if log and not (retrain_root / original_job.key).is_dir():
        log("training the original model")
    original_dir = trained_model(setup.train_fn, original_job, retrain_root)
    attributor = Attributor.load(original_dir, setup.train_dir, plan=config.plan, cache_dir=out / "cache",
                                 progress=False)
    attributor.chunk_size = scoring_chunk_size(attributor)
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
