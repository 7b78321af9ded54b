"""Our method, its ablations and the baselines, by name.

``build(name)`` returns an object with ``scores(ctx, queries)``; ``METHODS`` lists the
names.  The unlearning variants differ only in which weights move and how:

* ``unlearning``: the method (K/V weights, one Newton step, the Fisher);
* ``unlearning-sgd``: the paper's ablation without the Fisher, a plain gradient-ascent
  step.  Its length is set to the Newton step's (per query), so the ablation
  changes the direction only, not how far the model moves;
* ``unlearning-{attn,cross-attn,all}``: other weight presets;
* ``unlearning-10steps``: ten Newton steps of a tenth of the size and of the draws.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from ..attribution.attributor import Attributor
from ..attribution.unlearning import UnlearnConfig, query_gradient
from .base import EvalContext, Query

DEFAULT_UNLEARN = UnlearnConfig(steps=1, alpha=0.01, draws=5000, micro_batch=100)


@dataclass
class Unlearning:
    """Attribution by unlearning through the engine (``Attributor.attribute_many``)."""

    name: str = "unlearning"
    weights: str = "kv"
    config: UnlearnConfig = field(default_factory=lambda: DEFAULT_UNLEARN)
    match_newton_length: bool = False  # for method="sgd": step length of the Newton step

    def attributor(self, ctx: EvalContext) -> Attributor:
        a = ctx.attributor
        if self.weights == a.weights:
            return a
        return Attributor(a.model, a.train, plan=a.plan, weights=self.weights, cache_dir=a.cache_dir,
                          batch_size=a.batch_size, backend=a.backend, progress=a.progress, resize=a.resize,
                          chunk_size=a.chunk_size, precision=a.precision)

    def scores(self, ctx: EvalContext, queries: Sequence[Query]) -> np.ndarray:
        a = self.attributor(ctx)
        pairs = [(q.image, q.prompt) for q in queries]
        if self.config.method == "sgd" and self.match_newton_length:
            variants = [self._sgd_as_long_as_newton(a, q) for q in queries]
            return a.score_variants(variants)
        results = a.attribute_many(pairs, config=self.config, k=1)
        return np.stack([r.scores for r in results]).astype(np.float64)

    def _sgd_as_long_as_newton(self, a: Attributor, q: Query) -> dict[str, torch.Tensor]:
        if self.config.steps != 1:
            raise ValueError("config: matching the Newton step's length needs steps=1")
        fisher = a.fisher()
        x0 = a.query_inputs(q.image)
        ctx = a.model.encode_text([q.prompt])[0]
        grad = query_gradient(a.model, a.names, x0, ctx, self.config, backend=a.backend)
        n_train = self.config.n_train or len(a.train)
        step_sq = grad_sq = 0.0
        for n in a.names:  # the Newton step (alpha / N) g / (F + lambda) of the same gradient, as unlearn() takes it
            f = fisher[n].to(grad[n].device, torch.float64)
            newton = (self.config.alpha / n_train) * grad[n] / (f + self.config.damping * float(f.mean()))
            step_sq += float(newton.square().sum())
            grad_sq += float(grad[n].square().sum())
        scale = (step_sq / grad_sq) ** 0.5 if grad_sq > 0 else 0.0
        ps = dict(a.model.unet.named_parameters())
        return {n: (ps[n].double() + scale * grad[n]).to(ps[n].dtype) for n in a.names}


def _unlearning(name: str) -> Unlearning:
    cfg = DEFAULT_UNLEARN
    variants = {
        "unlearning": Unlearning(),
        "unlearning-sgd": Unlearning("unlearning-sgd", config=replace(cfg, method="sgd"), match_newton_length=True),
        "unlearning-attn": Unlearning("unlearning-attn", weights="attn"),
        "unlearning-cross-attn": Unlearning("unlearning-cross-attn", weights="cross-attn"),
        "unlearning-all": Unlearning("unlearning-all", weights="all"),
        "unlearning-10steps": Unlearning("unlearning-10steps",
                                         config=replace(cfg, steps=10, alpha=cfg.alpha / 10, draws=cfg.draws // 10)),
    }
    return variants[name]


def _baseline(name: str):
    from . import baselines, gradients

    return {
        "random": baselines.RandomScores,
        "random-class": baselines.RandomSameClass,
        "pixel": baselines.PixelSimilarity,
        "caption": baselines.CaptionSimilarity,
        "feature": baselines.FeatureSimilarity,
        "dtrak": gradients.DTrak,
        # the limit of our own step: the same query draws as `unlearning`
        "influence": lambda: gradients.FirstOrderInfluence(config=DEFAULT_UNLEARN),
    }[name]()


UNLEARNING = ("unlearning", "unlearning-sgd", "unlearning-attn", "unlearning-cross-attn", "unlearning-all",
              "unlearning-10steps")
BASELINES = ("random", "random-class", "pixel", "caption", "feature", "dtrak", "influence")
METHODS = UNLEARNING + BASELINES


def build(name: str):
    """The method called ``name`` (one of :data:`METHODS`), with its default settings."""
    if name in UNLEARNING:
        return _unlearning(name)
    if name in BASELINES:
        m = _baseline(name)
        m.name = name
        return m
    raise ValueError(f"method: {name!r} is not one of {list(METHODS)}")
