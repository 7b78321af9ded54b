"""The differentiable diffusion loss of a batch of rows, with noise from the counter-based generator.

Used wherever gradients are needed (the Fisher and the unlearning step). The noise is
the same stream the fused kernels regenerate, so a row's loss here equals
``kernels.diffusion_loss`` of the same (seed, sample id, draw id).
"""
from __future__ import annotations

import torch

from .. import kernels
from .model import DiffusionModel


def row_losses(model: DiffusionModel, x0: torch.Tensor, ctx: torch.Tensor, timesteps: torch.Tensor, seed: int,
               sample_ids: torch.Tensor, draw_ids: torch.Tensor, mask: torch.Tensor | None = None,
               backend: str = "auto") -> torch.Tensor:
    """Per-row mean squared error [B] (float32), differentiable w.r.t. the UNet's parameters."""
    acp = model.alphas_cumprod.to(x0.device)
    dtype = next(model.unet.parameters()).dtype
    x_t = kernels.add_noise(x0, timesteps, acp, seed, sample_ids, draw_ids, backend=backend)
    pred = model.unet(x_t.to(dtype), timesteps, encoder_hidden_states=ctx.to(dtype)).sample.float()
    eps = kernels.normal(seed, sample_ids, draw_ids, x0.shape[1:], device=x0.device, backend=backend)
    if model.prediction_type == "epsilon":
        target = eps
    else:
        a, b = kernels.reference.noise_coefficients(acp, timesteps)
        shape = (-1,) + (1,) * (x0.dim() - 1)
        target = a.view(shape) * eps - b.view(shape) * x0.float()
    sq = (pred - target).square()
    if mask is None:
        return sq.flatten(1).mean(1)
    m = torch.broadcast_to(mask.float(), sq.shape)
    return (m * sq).flatten(1).sum(1) / m.flatten(1).sum(1)
