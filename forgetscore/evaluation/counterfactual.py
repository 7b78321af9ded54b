"""What a retrain did to a query: the rise of its loss and how far its regeneration moved.

* ``query_losses``: each query's diffusion loss with its own prompt on a fine timestep
  grid (the paper: stride 5) and fixed noise keyed on (seed, query index, draw), so the
  original and every retrained model see exactly the same draws; ΔL is the difference.
* ``regenerate``: the picture made from the same prompt and initial noise; ΔG compares
  it with the original model's picture (mean squared error in pixels and the cosine
  similarity of image features).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..attribution.generate import generate
from ..attribution.model import DiffusionModel
from ..attribution.train_loss import row_losses
from .base import FeatureFn, Query

DELTA_STREAM = 0x44454C54  # keeps these draws apart from the scoring plan's and the unlearning's


@torch.no_grad()
def query_losses(model: DiffusionModel, queries: Sequence[Query], *, stride: int = 5, draws: int = 2,
                 seed: int = 0, batch_size: int = 512) -> np.ndarray:
    """Mean loss of each query [Q] (float64) over timesteps 0, stride, ... and `draws` noises each."""
    T = model.num_train_timesteps
    ts = torch.arange(0, T, stride).repeat_interleave(draws)
    out = np.empty(len(queries))
    for qi, q in enumerate(queries):
        x0 = q.image.to(model.device).float()
        ctx = model.encode_text([q.prompt])[0]
        total = 0.0
        for lo in range(0, len(ts), batch_size):
            t = ts[lo:lo + batch_size].to(model.device)
            n = len(t)
            losses = row_losses(model, x0[None].expand(n, *x0.shape), ctx[None].expand(n, *ctx.shape), t,
                                seed ^ DELTA_STREAM, torch.full((n,), qi, dtype=torch.int64, device=model.device),
                                torch.arange(lo, lo + n, device=model.device))
            total += float(losses.double().sum())
        out[qi] = total / len(ts)
    return out


def regenerate(model: DiffusionModel, queries: Sequence[Query], *, steps: int, guidance_scale: float,
               weights: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Pixels [Q, C, H, W] made from each query's prompt and seed."""
    x = generate(model, [q.prompt for q in queries], [q.seed for q in queries], steps=steps,
                 guidance_scale=guidance_scale, weights=weights)
    return model.decode(x).float().cpu()


def pixel_mse(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Per-image mean squared error [B] of pixels in [-1, 1]."""
    return (a.double() - b.double()).square().flatten(1).mean(1).numpy()


def feature_similarity(a: torch.Tensor, b: torch.Tensor, features: FeatureFn) -> np.ndarray:
    """Per-image cosine similarity [B] of the images' features."""
    fa, fb = (np.asarray(features(x), dtype=np.float64) for x in (a, b))
    den = np.linalg.norm(fa, axis=1) * np.linalg.norm(fb, axis=1)
    return (fa * fb).sum(1) / np.maximum(den, 1e-12)
