"""The customized-model benchmark: attribute what a model learned from a few exemplars.

After "Evaluating Data Attribution for Text-to-Image Models" (Wang et al., ICCV 2023), at the
digits model's scale.  A model is fine-tuned Custom-Diffusion style on a few exemplars of a
concept its training set lacks (:mod:`forgetscore.digits.concepts`), queries are generated
with the new token, every method attributes each query over the pool = training set +
exemplars, and the exemplars are the ground truth: Recall@10 and average precision
(:mod:`.metrics`), mean +- standard error over the queries of each concept kind. The
fine-tuning itself is :func:`.customize.customize`.

``run_custom``: the benchmark, resumable
----------------------------------------
Every expensive product lives in ``out_dir`` (per concept: the customized model, the pool
folder, the queries, each method's scores, the fidelity check) or in the engine's cache
(``$FORGETSCORE_CACHE``: prepared data, Fisher, before-losses), each written atomically and
reused when its settings match, so an interrupted run redoes no finished step.  A folder holds one
run's settings (``settings.json``): a run with others is refused, as it would overwrite the
products of the first while results.json still described it (``--methods`` may differ).

Settings, and what they rest on (digits model, 2 CPU cores shared with other jobs)
---------------------------------------------------------------------------------
* Customization: 800 Adam steps, lr 1e-2 for K/V and 1e-1 for the new row, 8 exemplar draws
  plus 8 training images per step (~22 s per concept on one thread).  Whether the concept was
  learned is measured per concept (``fidelity`` in results.json): is a query's nearest pool
  image (in pixels) an exemplar, against the same prompt and seed without the token.  At 200
  steps and lr 1e-3 the asterisk was barely learned (2 of 8 samples); at these settings, in
  the default run, 2 of 3 queries (asterisk, triangle) and 3 of 3 (letter-h and the three
  styles), against 0 of 3 without the token -- except the asterisk, whose bare control prompt
  "a" has picked the glyph up too (2 of 3).  The stippled ``dotted`` style is not learned at
  all (0 of 8 after 800 steps; its loss stays at 0.4 where the others reach 0.2: the model
  cannot draw a checkerboard), so the default set uses ``boxed`` instead.
* Scoring plan: timesteps 0, 200, ..., 800, each image's first caption, no flips (the digits
  model is not trained with flips).  All five captions cost 25 s per scored variant against
  4.3 s, and a concept scores about twenty variants; exemplars have one caption anyway.
* Fisher: five epochs of the pool (the paper; 9,010 samples) for every weight preset. ``all``
  (convolutions and norms too) runs at 457 samples/s on one thread against the K/V preset's
  1,099 (it took a backward pass per sample before: 46 samples/s).
* Unlearning: the one-step default of ``methods`` (alpha 0.01, 5,000 draws) against the paper's
  customized-model preset (100 steps, alpha 0.1, 160 draws, then in two backward passes of 80; the
  preset now takes the published ten passes of 16), on the same 18 queries (asterisk,
  triangle, letter-h, segment, underlined, dotted; 3 queries each), mAP object / style:
  ``unlearning`` 0.733 / 0.580 one step, 1.000 / 0.649 preset; ``unlearning-attn`` 1.000 / 0.850
  one step, 0.066 / 0.014 preset (100 Newton steps of alpha 0.1 over every attention weight
  wreck the model).  The default is the one-step configuration, the only one under which every
  variant works, and cheaper; the preset is ``CustomSettings(unlearn=asdict(PRESETS["custom"]))``.
* One torch thread: with two on two busy cores the Fisher was 60x slower (OpenMP spinning).

A caveat the numbers carry: the exemplars are the only pool images whose captions contain the
new token, so the text alone points at them (caption similarity scores high), and every
method that reads captions -- unlearning does, through each pool image's loss under its
captions -- profits from it.  This follows the benchmark's definition (exemplar captions =
fine-tuning captions), the default.  ``CustomSettings(pool_captions="plain")`` (``--pool-captions
plain``) removes the leak: the exemplars enter the pool with their fine-tuning captions minus the
token ("a <new1> handwritten three" -> "a handwritten three"), while the model is still
customized, and queried, with the token; only what the pool says about the exemplars changes.
"""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch

from ..attribution.attributor import Attributor
from ..attribution.data import TrainingSet
from ..attribution.io import read_json, write_bytes, write_dir, write_json
from ..attribution.model import SUBFOLDERS, DiffusionModel
from ..attribution.plan import ScoringPlan
from ..attribution.unlearning import UnlearnConfig
from .base import EvalContext, FeatureFn, Query, say
from .customize import CUSTOMIZATION_FILE, customize
from .store import cached_scores, differences, scoring_chunk_size
from ..threads import torch_threads
from .metrics import average_precision, clustered_mean_se, mean_se, recall_at_k

Log = Callable[[str], None]
NEEDS_LABELS = ("random-class",)  # methods that need the class of every training image
RECALL_K = 10
POOL_CAPTIONS = ("fine-tuning", "plain")  # what the exemplars' pool captions are (CustomSettings.pool_captions)


# ============================================================================================
# the pool
# ============================================================================================
def without_token(text: str, token: str) -> str:
    """`text` with every occurrence of `token` removed and whitespace collapsed ("a <new1> three" -> "a three")."""
    return " ".join(text.replace(token, " ").split())


def _check_pool_captions(how: str) -> None:
    if how not in POOL_CAPTIONS:
        raise ValueError(f"pool_captions: {how!r} is not one of {list(POOL_CAPTIONS)}")


def exemplar_pool_captions(captions: Sequence[str], how: str, token: str) -> list[str]:
    """The exemplars' captions in the pool: their fine-tuning `captions`, or with `how="plain"` without `token`."""
    _check_pool_captions(how)
    return list(captions) if how == "fine-tuning" else [without_token(c, token) for c in captions]


def write_pool(out_dir: str | Path, train_dir: str | Path, exemplars: torch.Tensor,
               captions: Sequence[str | Sequence[str]], *, prefix: str = "exemplar",
               extra: dict | None = None) -> Path:
    """The pool folder: every training image and line of metadata, then the exemplars (atomic).

    Training images are copied with their modification times (the folder's identity, hence the
    engine's caches, is then the same each time it is rebuilt); exemplars are appended as
    ``{prefix}-000.png ...`` with `captions` (the benchmark gives :func:`exemplar_pool_captions`)
    and ``"exemplar": true`` (plus `extra`), so they take pool indices ``len(train) ...
    len(train) + n - 1``.
    """
    from PIL import Image

    train = TrainingSet.load(train_dir)
    caps = [[c] if isinstance(c, str) else list(c) for c in captions]
    if exemplars.dim() != 4 or len(caps) != len(exemplars) or not all(caps):
        raise ValueError(f"exemplars/captions: need [n, C, H, W] pixels and n non-empty captions, got "
                         f"{tuple(exemplars.shape)} and {len(caps)}")
    names = [f"{prefix}-{i:03d}.png" for i in range(len(exemplars))]
    clash = set(names) & set(train.file_names)
    if clash:
        raise ValueError(f"prefix: {prefix!r} gives names already in the training folder ({sorted(clash)[:3]}); "
                         "choose another prefix")
    pixels = ((exemplars.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()

    def fill(tmp: Path) -> None:
        lines = (Path(train_dir) / "metadata.jsonl").read_text().splitlines()
        for name in train.file_names:
            shutil.copy2(Path(train_dir) / name, tmp / name)
        for name, arr, cs in zip(names, pixels, caps):
            Image.fromarray(arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0)).save(tmp / name)
            lines.append(json.dumps({"file_name": name, "text": cs, "exemplar": True, **(extra or {})}))
        (tmp / "metadata.jsonl").write_text("\n".join(line for line in lines if line.strip()) + "\n")

    return write_dir(Path(out_dir), fill)


# ============================================================================================
# run_custom
# ============================================================================================
@dataclass(frozen=True)
class CustomSettings:
    """Every knob of a benchmark run (stored in results.json; cached products are keyed on them).

    Customization (``custom_*``, ``reg_per_step``), the scoring plan (``plan_*``), the Fisher
    sizes and the unlearning configuration (``unlearn``: overrides of ``methods.DEFAULT_UNLEARN``,
    from which every unlearning variant is derived, e.g. ``asdict(unlearning.PRESETS["custom"])``)
    are this benchmark's choices at the digits' scale; the module docstring says what was measured.
    ``pool_captions``: the exemplars' captions in the pool, "fine-tuning" (the benchmark's
    definition) or "plain" (the same without the token: the caveat in the module docstring).
    """

    concepts: tuple[str, ...]
    n_exemplars: int = 5
    queries_per_concept: int = 3
    query_seed: int = 1000
    gen_steps: int = 25
    guidance_scale: float = 1.5
    custom_steps: int = 800
    custom_lr: float = 1e-2
    custom_embedding_lr: float = 1e-1
    custom_batch: int = 8
    reg_per_step: int = 8
    custom_seed: int = 0
    exemplar_seed: int = 0
    plan_stride: int = 200
    plan_captions: str = "first"
    fisher_samples: int | None = None  # None: five epochs of the pool (the paper)
    threads: int | None = 1  # torch threads for the run (None: leave as is)
    unlearn: dict | None = None  # overrides of the base unlearning config (see above)
    batch_size: int = 1024
    pool_captions: str = "fine-tuning"  # one of POOL_CAPTIONS

    def to_dict(self) -> dict:
        d = asdict(self)
        d["concepts"] = list(self.concepts)
        return d

    def plan(self) -> ScoringPlan:
        return ScoringPlan.with_stride(self.plan_stride, captions=self.plan_captions, flips=False)


DEFAULT_SETTINGS = CustomSettings(concepts=("asterisk", "triangle", "letter-h", "segment", "underlined", "boxed"))
QUICK_SETTINGS = CustomSettings(concepts=("letter-h", "boxed"), queries_per_concept=2, custom_steps=300,
                                plan_stride=250, plan_captions="first", fisher_samples=1000,
                                unlearn={"draws": 1000})


class _Attributor(Attributor):
    """The engine with this benchmark's Fisher size as the default for every caller."""

    fisher_default: int | None = None

    def fisher(self, samples: int | None = None, **kw) -> dict[str, torch.Tensor]:
        return super().fisher(samples or self.fisher_default, **kw)


def default_methods() -> tuple[str, ...]:
    """Every method of :data:`methods.METHODS` that does without class labels."""
    from .methods import METHODS

    return tuple(m for m in METHODS if m not in NEEDS_LABELS)


def unlearn_base(settings: CustomSettings) -> UnlearnConfig:
    """The unlearning configuration of the run: ``methods.DEFAULT_UNLEARN`` with the settings' overrides."""
    from .methods import DEFAULT_UNLEARN

    return replace(DEFAULT_UNLEARN, **(settings.unlearn or {}))


def _configure(name: str, settings: CustomSettings):
    """`build(name)` adjusted to the benchmark's unlearning configuration.

    With overrides, every unlearning variant is re-derived from the overridden base by the rule
    of ``methods.py`` (``-10steps``: ten times the steps, a tenth of alpha and of the draws;
    ``-sgd``: the same config with method "sgd"), so the ablations keep their meaning.
    ``influence`` always takes its query gradient from the same draws as the unlearning
    (the base's draws times its steps, same seed): it is meant as the infinitesimal limit of
    *this* unlearning step (its own default is 50,000 draws, ten times the cost).
    """
    from .methods import Unlearning, build

    method = build(name)
    base = unlearn_base(settings)
    if isinstance(method, Unlearning) and settings.unlearn:
        if name == "unlearning-10steps":
            draws = max(1, base.draws // 10)
            cfg = replace(base, steps=base.steps * 10, alpha=base.alpha / 10, draws=draws,
                          micro_batch=min(base.micro_batch, draws))
        else:
            cfg = replace(base, method=method.config.method)
        method = replace(method, config=cfg)
    if name == "influence":
        method = replace(method, config=replace(method.config, draws=base.draws * base.steps,
                                                micro_batch=base.micro_batch, seed=base.seed, method="newton"))
    return method


def _method_weights(method) -> str:
    from .methods import Unlearning

    return method.weights if isinstance(method, Unlearning) else "kv"


def make_queries(model: DiffusionModel, prompts: Sequence[str], seeds: Sequence[int], settings: CustomSettings,
                 path: Path) -> list[Query]:
    """Generate (or load from `path`, if made with the same prompts, seeds, settings and model) the queries."""
    from ..attribution.generate import generate

    want = {"prompts": list(prompts), "seeds": list(seeds), "steps": settings.gen_steps,
            "guidance_scale": settings.guidance_scale, "unet_id": model.unet_id(), "encoders_id": model.encoders_id()}
    images = None
    if path.is_file():
        saved = torch.load(path, weights_only=False)
        if saved["spec"] == want:
            images = saved["images"]
    if images is None:
        images = generate(model, list(prompts), list(seeds), steps=settings.gen_steps,
                          guidance_scale=settings.guidance_scale).cpu()
        buf = io.BytesIO()
        torch.save({"spec": want, "images": images}, buf)
        write_bytes(path, buf.getvalue())
    return [Query(img, p, s, None, f"q{i}") for i, (img, p, s) in enumerate(zip(images, prompts, seeds))]


def concept_fidelity(model: DiffusionModel, queries: Sequence[Query], token: str, exemplars: torch.Tensor,
                     train_pixels: torch.Tensor, features: FeatureFn | None, settings: CustomSettings) -> dict:
    """Did the model learn the concept?  The queries (with the token) against the same prompts without it.

    For each sample: is its nearest neighbour in the pool (training images + exemplars) an
    exemplar, in pixels and in image features; and its mean distance to the exemplars.  The
    control regenerates each query's prompt with the token removed, from the same seed.
    """
    from ..attribution.generate import generate

    control_prompts = [" ".join(w for w in q.prompt.split() if w != token) for q in queries]
    with_token = model.decode(torch.stack([q.image for q in queries]).to(model.device)).float().cpu()
    without = model.decode(generate(model, control_prompts, [q.seed for q in queries], steps=settings.gen_steps,
                                    guidance_scale=settings.guidance_scale)).float().cpu()
    pool = torch.cat([train_pixels, exemplars.float()])
    is_ex = np.arange(len(pool)) >= len(train_pixels)

    def measure(x: torch.Tensor) -> dict:
        d_pix = torch.cdist(x.flatten(1).double(), pool.flatten(1).double()).numpy()
        out = {"nn_is_exemplar_pixel": float(is_ex[d_pix.argmin(1)].mean()),
               "mean_pixel_dist_to_exemplars": float(d_pix[:, is_ex].mean()),
               "mean_pixel_dist_to_train": float(d_pix[:, ~is_ex].mean())}
        if features is not None:
            fp, fx = np.asarray(features(pool), dtype=np.float64), np.asarray(features(x), dtype=np.float64)
            d_f = np.linalg.norm(fx[:, None] - fp[None], axis=-1)
            out["nn_is_exemplar_feature"] = float(is_ex[d_f.argmin(1)].mean())
        return out

    return {"with_token": measure(with_token), "without_token": measure(without), "control_prompts": control_prompts}


@dataclass
class ConceptRun:
    """What a concept's run produced: per method the scores [Q, N] of its queries."""

    name: str
    kind: str
    n_train: int
    positives: np.ndarray
    prompts: list[str]
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    fidelity: dict = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def model_digest(model_dir: str | Path) -> str:
    """A hash of a model's component folders (names and bytes): what a customization is keyed on.

    Content, not the path: the same model elsewhere (another cache root) reuses the customized
    models, and weights rewritten in place are not mistaken for the old ones.  Only what
    ``DiffusionModel.load`` reads counts, so records kept beside the model (the demo's accuracy
    check, training notes) do not make it a different model.
    """
    h = hashlib.sha256()
    root = Path(model_dir)
    parts = [root / name for name in (*SUBFOLDERS, "vae") if (root / name).is_dir()]
    for path in sorted(p for part in parts for p in part.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()[:16]


def run_concept(out_dir: Path, concept_name: str, settings: CustomSettings, methods: Sequence[str], *,
                model_dir: Path, train_dir: Path, log: Log, features: FeatureFn | None = None,
                base_id: str | None = None) -> ConceptRun:
    """One concept: customize, pool, queries, fidelity, every method's scores (each step cached).

    base_id: :func:`model_digest` of `model_dir` (computed here if not given).
    """
    from ..digits.concepts import TOKEN, get_concept

    concept = get_concept(concept_name)
    root = out_dir / "concepts" / concept.name
    root.mkdir(parents=True, exist_ok=True)
    exemplars = concept.exemplars(settings.n_exemplars, settings.exemplar_seed)
    captions = concept.captions(settings.n_exemplars, settings.exemplar_seed, TOKEN)
    seconds: dict[str, float] = {}

    t = time.perf_counter()
    ex_hash = hashlib.sha256(exemplars.numpy().tobytes()).hexdigest()[:16]
    custom_key = {"concept": concept.name, "exemplars": ex_hash, "captions": captions, "init_word": concept.init_word,
                  "steps": settings.custom_steps, "lr": settings.custom_lr, "embedding_lr": settings.custom_embedding_lr,
                  "batch_size": settings.custom_batch, "reg_per_step": settings.reg_per_step,
                  "seed": settings.custom_seed, "base": base_id or model_digest(model_dir)}
    model_out = root / "model"
    key_path = root / "model.key.json"
    if not (model_out / CUSTOMIZATION_FILE).is_file() or not key_path.is_file() or read_json(key_path) != custom_key:
        log(f"[{concept.name}] customizing ({settings.custom_steps} steps)")
        customize(model_dir, exemplars, captions, model_out, token=TOKEN, init_word=concept.init_word,
                  steps=settings.custom_steps, lr=settings.custom_lr, embedding_lr=settings.custom_embedding_lr,
                  batch_size=settings.custom_batch, reg_dir=train_dir if settings.reg_per_step else None,
                  reg_per_step=settings.reg_per_step, seed=settings.custom_seed, log=log)
        write_json(key_path, custom_key)
    seconds["customize"] = time.perf_counter() - t

    pool_dir = root / "pool"
    pool_key_path = root / "pool.key.json"
    pool_caps = exemplar_pool_captions(captions, settings.pool_captions, TOKEN)
    # Keyed on the captions written, so a fine-tuning-caption pool keeps the key it always had.  Everything
    # downstream of the pool (the engine's cache, every scores key) is keyed on its identity, which hashes
    # its metadata: a rewrite with other captions recomputes them, while model, queries and fidelity stay.
    pool_key = {"train": str(train_dir), "train_id": TrainingSet.load(train_dir).identity(),
                "captions": pool_caps, "exemplars": ex_hash}
    if not (pool_dir / "metadata.jsonl").is_file() or not pool_key_path.is_file() or \
            read_json(pool_key_path) != pool_key:
        write_pool(pool_dir, train_dir, exemplars, pool_caps, extra={"concept": concept.name})
        write_json(pool_key_path, pool_key)

    plan = settings.plan()
    model = DiffusionModel.load(model_out)
    train = TrainingSet.load(pool_dir)
    n_train = len(train) - settings.n_exemplars
    positives = np.arange(n_train, len(train))
    attributors: dict[str, _Attributor] = {}

    def attributor(weights: str) -> _Attributor:
        if weights not in attributors:
            a = _Attributor(model, train, plan=plan, weights=weights, batch_size=settings.batch_size, progress=False)
            a.fisher_default = settings.fisher_samples
            a.chunk_size = scoring_chunk_size(a)
            attributors[weights] = a
        return attributors[weights]

    prompts = concept.query_prompts(settings.queries_per_concept, TOKEN)
    seeds = [settings.query_seed + i for i in range(len(prompts))]
    t = time.perf_counter()
    queries = make_queries(model, prompts, seeds, settings, root / "queries.pt")
    seconds["queries"] = time.perf_counter() - t

    if features is None:
        from ..digits.classifier import get_classifier

        features = get_classifier(model.image_shape[-1]).features
    base_ctx = EvalContext(attributor("kv"), labels=None, features=features, seed=0)
    fid_path = root / "fidelity.json"
    fid_key = {"unet_id": model.unet_id(), "prompts": prompts, "seeds": seeds,
               "steps": settings.gen_steps, "guidance_scale": settings.guidance_scale}
    if fid_path.is_file() and read_json(fid_path).get("key") == fid_key:
        fidelity = read_json(fid_path)["fidelity"]
    else:
        t = time.perf_counter()
        fidelity = concept_fidelity(model, queries, TOKEN, exemplars, base_ctx.train_pixels()[:n_train],
                                    features, settings)
        write_json(fid_path, {"key": fid_key, "fidelity": fidelity})
        seconds["fidelity"] = time.perf_counter() - t
    w, wo = fidelity["with_token"], fidelity["without_token"]
    log(f"[{concept.name}] learned? nearest pool image is an exemplar for {w['nn_is_exemplar_pixel']:.0%} of "
        f"samples with the token vs {wo['nn_is_exemplar_pixel']:.0%} without (pixels); mean distance to the "
        f"exemplars {w['mean_pixel_dist_to_exemplars']:.2f} vs {wo['mean_pixel_dist_to_exemplars']:.2f}")

    run = ConceptRun(concept.name, concept.kind, n_train, positives, prompts, fidelity=fidelity, seconds=seconds)
    (root / "scores").mkdir(exist_ok=True)
    for name in methods:
        method = _configure(name, settings)
        weights = _method_weights(method)
        ctx = EvalContext(attributor(weights), labels=None, features=features, seed=0,
                          _pixels=base_ctx._pixels)
        key = {"method": name, "settings": repr(method), "unet_id": model.unet_id(),
               "encoders_id": model.encoders_id(), "pool": train.identity(), "plan": plan.to_dict(),
               "fisher_samples": settings.fisher_samples, "queries": fid_key}
        t = time.perf_counter()
        s, reused = cached_scores(root / "scores" / f"{name}.npy", key,
                                   lambda m=method, c=ctx: m.scores(c, queries))
        if s.shape != (len(queries), len(train)):
            raise ValueError(f"method {name}: returned scores of shape {s.shape}, expected "
                             f"({len(queries)}, {len(train)})")
        run.scores[name] = s
        run.seconds[name] = time.perf_counter() - t
        ap = average_precision(s, positives)
        log(f"[{concept.name}] {name:<22} mAP {ap.mean():.3f}  R@10 {recall_at_k(s, positives, RECALL_K).mean():.3f}"
            f"  {'(cached)' if reused else f'{run.seconds[name]:.0f} s'}")
    return run


def aggregate(runs: Sequence[ConceptRun], methods: Sequence[str]) -> dict:
    """Per method and concept kind: Recall@10 and AP over all queries of that kind, mean +- se.

    The error counts concepts, not queries, as the independent draws (clustered over concepts;
    the plain per-query error, which understates it, is kept as ``se_queries``); a kind with a
    single concept can only give the per-query error (``se_over`` says which).
    """
    out: dict = {}
    for name in methods:
        out[name] = {}
        for kind in ("object", "style"):
            mine = [r for r in runs if r.kind == kind and name in r.scores]
            if not mine:
                continue
            rec = np.concatenate([recall_at_k(r.scores[name], r.positives, RECALL_K) for r in mine])
            ap = np.concatenate([average_precision(r.scores[name], r.positives) for r in mine])
            concept = np.concatenate([np.full(len(r.scores[name]), i) for i, r in enumerate(mine)])
            cell: dict = {"n_queries": len(ap), "n_concepts": len(mine),
                          "se_over": "concepts" if len(mine) > 1 else "queries"}
            for metric, v in (("recall@10", rec), ("map", ap)):
                m, se = clustered_mean_se(v, concept) if len(mine) > 1 else mean_se(v)
                cell[metric] = {"mean": m, "se": se, "se_queries": mean_se(v)[1]}
            out[name][kind] = cell
    return out


def _cell(d: dict | None, key: str) -> str:
    if d is None:
        return "—"
    se = d[key]["se"]
    return f"{d[key]['mean']:.3f} ± {'—' if se is None else f'{se:.3f}'}"


def _se_words(agg: dict) -> str:
    over = {c.get("se_over", "queries") for cells in agg.values() for c in cells.values()}  # older: queries
    if over == {"concepts"}:
        return "standard error over concepts (a concept's queries share its model, so they are not independent)"
    if over == {"queries"}:
        return "standard error over queries"
    return "standard error over concepts, or over queries where a kind has one concept"


def table_markdown(results: dict) -> str:
    """Rows = methods; columns Recall@10 and mAP for object-like and style-like concepts ("mean ± se")."""
    agg = results["aggregate"]
    n = {k: next((c[k]["n_queries"] for c in agg.values() if k in c), 0) for k in ("object", "style")}
    how = results["settings"].get("pool_captions", "fine-tuning")  # results written before the setting existed
    captioned = {"fine-tuning": "as in fine-tuning, token included",
                 "plain": "as in fine-tuning minus the token"}.get(how, f"with {how} captions")
    head = (f"Customized-model benchmark: {results['n_concepts']['object']} object-like concept(s), "
            f"{n['object']} queries; {results['n_concepts']['style']} style-like, {n['style']} queries; pool = "
            f"{results['n_train']} training images + {results['settings']['n_exemplars']} exemplars per concept, "
            f"captioned in the pool {captioned} (pool_captions: {how}; mean over queries ± {_se_words(agg)}; "
            "higher is better)")
    lines = [head, "",
             "| method | object R@10 | object mAP | style R@10 | style mAP |", "|---|---|---|---|---|"]
    for name, cells in agg.items():
        lines.append(f"| {name} | {_cell(cells.get('object'), 'recall@10')} | {_cell(cells.get('object'), 'map')} | "
                     f"{_cell(cells.get('style'), 'recall@10')} | {_cell(cells.get('style'), 'map')} |")
    return "\n".join(lines) + "\n"


def scatter_png(results: dict, path: Path) -> None:
    """Per method: x = object-like mAP, y = style-like mAP, with standard-error bars (atomic)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    for name, cells in results["aggregate"].items():
        if "object" not in cells or "style" not in cells:
            continue
        o, s = cells["object"]["map"], cells["style"]["map"]
        unlearning = name.startswith("unlearning")
        ax.errorbar(o["mean"], s["mean"], xerr=o["se"], yerr=s["se"], fmt="o" if unlearning else "s",
                    color="tab:red" if unlearning else "tab:blue", capsize=2, alpha=0.85)
        ax.annotate(name, (o["mean"], s["mean"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("object-like mAP")
    ax.set_ylabel("style-like mAP")
    ax.set_title("Customized-model benchmark (mean ± se over queries)")
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    write_bytes(path, buf.getvalue())


def run_custom(out_dir: str | Path, *, methods: Sequence[str] | None = None, quick: bool = False,
               concepts: Sequence[str] | None = None, queries_per_concept: int | None = None,
               pool_captions: str | None = None, settings: CustomSettings | None = None,
               model_dir: str | Path | None = None, train_dir: str | Path | None = None,
               features: FeatureFn | None = None, log: Log | None = say) -> dict:
    """Run the benchmark into `out_dir`; returns (and writes) results.json's content.

    methods: names of :data:`methods.METHODS` (default: all but those needing class labels);
    quick: the few-minute version (:data:`QUICK_SETTINGS`); concepts / queries_per_concept /
    pool_captions override the settings'.  model_dir / train_dir: the base model and its
    training folder (default: the cached digits model and folder, built on first use); features:
    the image embedding of the feature baseline and the fidelity check (default: the digit
    classifier's).
    """
    from .methods import METHODS

    log = log or (lambda s: None)
    started = time.perf_counter()
    settings = settings or (QUICK_SETTINGS if quick else DEFAULT_SETTINGS)
    if concepts is not None:
        settings = replace(settings, concepts=tuple(concepts))
    if queries_per_concept is not None:
        settings = replace(settings, queries_per_concept=int(queries_per_concept))
    if pool_captions is not None:
        settings = replace(settings, pool_captions=pool_captions)
    if not settings.concepts:
        raise ValueError("concepts: empty; give at least one concept name")
    if settings.queries_per_concept < 1:
        raise ValueError(f"queries_per_concept: {settings.queries_per_concept} must be >= 1")
    _check_pool_captions(settings.pool_captions)
    from ..digits.concepts import get_concept

    for c in settings.concepts:
        get_concept(c)  # unknown names fail before any work
    methods = tuple(methods) if methods is not None else default_methods()
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"methods: {unknown or 'none given'}; choose from {list(METHODS)}")
    needs = [m for m in methods if m in NEEDS_LABELS]
    if needs:
        raise ValueError(f"methods: {needs} need class labels, which the pool's exemplars do not have; leave them out")
    out = Path(out_dir)
    record = _check_settings(out, settings)
    model_dir, train_dir = _base(model_dir, train_dir, log)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / SETTINGS_FILE).is_file() or read_json(out / SETTINGS_FILE) != record:
        write_json(out / SETTINGS_FILE, record)
    base_id = model_digest(model_dir)
    with torch_threads(settings.threads):
        runs = [run_concept(out, c, settings, methods, model_dir=model_dir, train_dir=train_dir, log=log,
                            features=features, base_id=base_id) for c in settings.concepts]
    from .. import __version__

    results = {"version": __version__, "settings": settings.to_dict(), "methods": list(methods),
               "base_model": str(model_dir),
               "train_dir": str(train_dir), "n_train": runs[0].n_train,
               "n_concepts": {k: sum(r.kind == k for r in runs) for k in ("object", "style")},
               "aggregate": aggregate(runs, methods),
               "concepts": {r.name: {"kind": r.kind, "prompts": r.prompts, "fidelity": r.fidelity,
                                     "seconds": {k: round(v, 1) for k, v in r.seconds.items()},
                                     "per_method": {m: {"ap": average_precision(s, r.positives).tolist(),
                                                        "recall@10": recall_at_k(s, r.positives, RECALL_K).tolist()}
                                                    for m, s in r.scores.items()}}
                            for r in runs},
               "wall_seconds": round(time.perf_counter() - started, 1)}
    write_json(out / "results.json", results)
    write_bytes(out / "table.md", table_markdown(results).encode())
    scatter_png(results, out / "scatter.png")
    log(table_markdown(results))
    return results




SETTINGS_FILE = "settings.json"
# Each concept has its own folder, so a run may do fewer or more of them than the one before.
_PER_CONCEPT = ("concepts",)


def _check_settings(out: Path, settings: CustomSettings) -> dict:
    """That a run already in `out` was made with these settings (but its concepts); returns the record to keep.

    Refused, as leave-K-out refuses another protocol or plan, rather than kept side by side in a subfolder per
    setting: results.json, table.md and benchmarks/custom_style.py read each concept's pool and scores where
    they are, and would still describe one setting. The record is settings.json, or for a folder of an earlier
    version, results.json's settings (a setting it lacks had its default then)."""
    here = {k: v for k, v in json.loads(json.dumps(settings.to_dict())).items() if k not in _PER_CONCEPT}
    concepts = out / "concepts"
    made = (concepts.is_dir() and any(not p.name.startswith(".") for p in concepts.iterdir())) or \
        (out / "results.json").is_file()
    if not made:
        return here
    if (out / SETTINGS_FILE).is_file():
        there = read_json(out / SETTINGS_FILE)
    elif (out / "results.json").is_file():
        defaults = {f.name: f.default for f in fields(CustomSettings) if f.default is not MISSING}
        there = {**json.loads(json.dumps(defaults)), **read_json(out / "results.json").get("settings", {})}
    else:  # a run of an earlier version, stopped before its results: what it used is unknown
        return here
    diff = differences(there, here)
    if diff:
        options = [f"--pool-captions {there['pool_captions']}"] if there.get("pool_captions") != \
            here["pool_captions"] else []
        other = [k for k in here if there.get(k) != here[k] and k != "pool_captions"]
        for flag, preset in (("--quick", QUICK_SETTINGS), ("without --quick", DEFAULT_SETTINGS)):
            if other and all(there.get(k) == preset.to_dict()[k] for k in other):
                options.append(flag)
        how = f" ({', '.join(options)})" if options else ""
        raise ValueError(f"out: {str(out)!r} holds a run made with other settings ({'; '.join(diff)}); its "
                         "customized models, pools, queries and scores were made under them, and this run would "
                         "overwrite them while results.json still described that run; give another output folder "
                         f"(--out), or that run's settings{how}")
    return here


def _base(model_dir: str | Path | None, train_dir: str | Path | None, log: Log) -> tuple[Path, Path]:
    """The base model and training folder: given, or the cached digits ones."""
    if model_dir is not None and train_dir is not None:
        return Path(model_dir), Path(train_dir)
    if (model_dir is None) != (train_dir is None):
        raise ValueError("model_dir/train_dir: give both (a model and the folder it was trained on) or neither")
    from ..cache import cache_root
    from ..digits.data import write_image_folder
    from ..digits.train import ensure_model

    model = ensure_model(log=log)
    train = cache_root() / "digits-train"
    if not (train / "metadata.jsonl").is_file():
        write_image_folder(train, overwrite=True)
    return model, train
