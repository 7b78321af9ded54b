"""Cheap baselines: random scores and similarity in pixel, caption or feature space.

They need no gradients, so they mark the floor any attribution method must clear:
a method that cannot beat ``PixelSimilarity`` or ``CaptionSimilarity`` on a benchmark
is finding look-alikes, not the images the model learned the query from.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..attribution.model import DiffusionModel
from .base import EvalContext, Query


def cosine(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> np.ndarray:
    """float64 [len(a), len(b)] cosine similarities of flattened rows (a zero row scores 0, not NaN)."""
    a, b = _rows(a), _rows(b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"features: queries have {a.shape[1]} values each, training images {b.shape[1]}; "
                         "embed both with the same function")
    a = a / a.norm(dim=1, keepdim=True).clamp_min(1e-300)
    b = b / b.norm(dim=1, keepdim=True).clamp_min(1e-300)
    return (a @ b.T).numpy()


def _rows(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    t = x.detach().cpu() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    return t.double().reshape(t.shape[0], -1)


def _check_queries(queries: Sequence[Query]) -> None:
    if len(queries) == 0:
        raise ValueError("queries: empty; pass at least one Query")


@dataclass
class RandomScores:
    """I.i.d. uniform scores: the chance level of every benchmark.

    Each query draws from its own generator keyed on (seed, ctx.seed, query index), so a
    query's scores do not depend on which other queries are scored with it.
    """

    seed: int = 0
    name: str = "random"

    def scores(self, ctx: EvalContext, queries: Sequence[Query]) -> np.ndarray:
        _check_queries(queries)
        n = ctx.n_train
        return np.stack([np.random.default_rng([self.seed, ctx.seed, j]).random(n) for j in range(len(queries))])


@dataclass
class RandomSameClass:
    """Random scores among the query's class, ranked above every other image.

    The strongest label-only baseline: on class-conditional data a method must beat
    knowing the class. Class images score in [1, 2), the rest in [0, 1).
    """

    seed: int = 0
    name: str = "random-class"

    def scores(self, ctx: EvalContext, queries: Sequence[Query]) -> np.ndarray:
        _check_queries(queries)
        if ctx.labels is None:
            raise ValueError("ctx.labels: None; random-same-class needs the class of every training image "
                             "(EvalContext(labels=...))")
        labels = np.asarray(ctx.labels)
        if labels.shape != (ctx.n_train,):
            raise ValueError(f"ctx.labels: shape {labels.shape}, expected ({ctx.n_train},), one label per "
                             "training image")
        missing = [j for j, q in enumerate(queries) if q.label is None]
        if missing:
            raise ValueError(f"queries: {missing[:5]} have label None; give each Query the class its prompt "
                             "names (Query(label=...))")
        base = RandomScores(self.seed).scores(ctx, queries)
        same = labels[None, :] == np.array([q.label for q in queries])[:, None]
        return base + same


@dataclass
class PixelSimilarity:
    """Cosine similarity of raw pixels: finds near-copies, nothing subtler."""

    name: str = "pixel"

    def scores(self, ctx: EvalContext, queries: Sequence[Query]) -> np.ndarray:
        _check_queries(queries)
        return cosine(ctx.query_pixels(queries), ctx.train_pixels())


def pooled_text(model: DiffusionModel, prompts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """float64 [len(prompts), D]: the model's text-encoder states averaged over the real (non-padding) tokens.

    Padding tokens are excluded because ``encode_text`` pads every prompt to the
    tokenizer's full length, and averaging over padding would pull all short prompts together.
    """
    tok = model.tokenizer
    out = []
    for lo in range(0, len(prompts), batch_size):
        chunk = list(prompts[lo:lo + batch_size])
        hidden = model.encode_text(chunk).double().cpu()
        # The same tokenization as encode_text, for its attention mask.
        mask = tok(chunk, padding="max_length", truncation=True, max_length=model.max_length,
                   return_tensors="pt").attention_mask.double()
        out.append((hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1))
    return torch.cat(out) if out else torch.zeros(0, 0, dtype=torch.float64)


@dataclass
class CaptionSimilarity:
    """Similarity of the query's prompt to each image's captions, in the model's own text space.

    An image scores the mean cosine over its captions (not the max), so images with many
    captions are not favoured for having more chances to match.
    """

    batch_size: int = 256
    name: str = "caption"

    def scores(self, ctx: EvalContext, queries: Sequence[Query]) -> np.ndarray:
        _check_queries(queries)
        model = ctx.attributor.model
        captions = ctx.attributor.train.captions
        flat = [c for caps in captions for c in caps]
        owner = np.repeat(np.arange(len(captions)), [len(c) for c in captions])
        sims = cosine(pooled_text(model, [q.prompt for q in queries], self.batch_size),
                      pooled_text(model, flat, self.batch_size))
        sums = np.zeros((len(queries), len(captions)))
        np.add.at(sums.T, owner, sims.T)
        return sums / np.bincount(owner, minlength=len(captions))


@dataclass
class FeatureSimilarity:
    """Cosine similarity of image embeddings (``ctx.features``, standing in for DINO/CLIP)."""

    batch_size: int = 256
    name: str = "feature"

    def scores(self, ctx: EvalContext, queries: Sequence[Query]) -> np.ndarray:
        _check_queries(queries)
        if ctx.features is None:
            raise ValueError("ctx.features: None; feature similarity needs an image embedding "
                             "(EvalContext(features=...))")
        pixels = ctx.train_pixels()
        train = np.concatenate([np.asarray(ctx.features(pixels[lo:lo + self.batch_size]))
                                for lo in range(0, len(pixels), self.batch_size)])
        return cosine(np.asarray(ctx.features(ctx.query_pixels(queries))), train)
