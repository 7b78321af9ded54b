"""What every attribution method in the evaluation shares: queries, a context, one interface.

A method maps queries to one score per training image (higher = more responsible).
Our method, its ablations and every baseline implement the same ``scores`` call, so
the leave-K-out and customized-model benchmarks treat them alike.
"""
from __future__ import annotations

import hashlib
import json

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from ..attribution.attributor import Attributor

FeatureFn = Callable[[torch.Tensor], np.ndarray]
"""Pixels [B, C, H, W] in [-1, 1] -> features [B, D] (an image embedding)."""


def say(message: str) -> None:
    """The evaluation's progress lines, flushed one by one: printed into a file, stdout is block-buffered, and
    a run killed there (as an hour-long run may be) would lose the lines that say how far it got."""
    print(message, flush=True)


@dataclass(frozen=True)
class Query:
    """A generated picture and how it was made.

    image: UNet-space sample [C, H, W] (what ``attribution.generate`` returns);
    prompt / seed: what made it (the regeneration uses them); label: the class the
    prompt names, when the training set has classes (random-same-class uses it).
    """

    image: torch.Tensor
    prompt: str
    seed: int = 0
    label: int | None = None
    name: str = ""

    def fingerprint(self) -> str:
        """Changes when the picture, prompt, seed or label changes (cached results are keyed on it)."""
        h = hashlib.sha256(json.dumps([self.prompt, self.seed, self.label]).encode())
        h.update(str(tuple(self.image.shape)).encode())
        h.update(self.image.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return h.hexdigest()[:16]


@dataclass
class EvalContext:
    """Everything a method may look at besides the queries.

    attributor: the engine on the model and training set (its plan, cache, Fisher);
    labels: class of every training image [N] or None; features: an image embedding
    (stands in for DINO/CLIP features) or None; seed: for methods that draw at random.
    """

    attributor: Attributor
    labels: np.ndarray | None = None
    features: FeatureFn | None = None
    seed: int = 0
    _pixels: torch.Tensor | None = field(default=None, repr=False)

    @property
    def n_train(self) -> int:
        return len(self.attributor.train)

    def train_pixels(self) -> torch.Tensor:
        """All training images as pixels [N, C, H, W] in [-1, 1] (loaded once)."""
        if self._pixels is None:
            a = self.attributor
            shape = a.model.image_shape
            self._pixels = torch.stack([a.train.load_pixels(i, shape, a.resize) for i in range(len(a.train))])
        return self._pixels

    def query_pixels(self, queries: Sequence[Query]) -> torch.Tensor:
        """The queries as pixels [Q, C, H, W] in [-1, 1]."""
        model = self.attributor.model
        return model.decode(torch.stack([q.image for q in queries]).to(model.device)).float().cpu()


class Method(Protocol):
    """An attribution method: ``scores(ctx, queries)`` -> float64 [len(queries), N]."""

    name: str

    def scores(self, ctx: EvalContext, queries: Sequence[Query]) -> np.ndarray: ...


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest scores, best first (ties broken by the lower index)."""
    scores = np.asarray(scores, dtype=np.float64)
    if not 0 < k <= scores.shape[-1]:
        raise ValueError(f"k: {k} must be in [1, {scores.shape[-1]}]")
    order = np.lexsort((np.arange(scores.shape[-1]), -scores))
    return order[:k]
