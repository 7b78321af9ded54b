"""Unlearning a query: Newton steps of gradient ascent preconditioned by the Fisher.

    theta <- theta + (alpha / N) * (F + lambda)^-1 * grad L(query, theta)

on the selected weights only, the gradient averaged over many (noise, timestep)
draws of the query with its own prompt. Damping lambda is off by default (the paper);
``damping=c`` uses c * mean(F) per layer. ``method="sgd"`` drops the Fisher (the
paper's ablation): theta <- theta + alpha * grad.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields, replace

import torch

from ..kernels.validate import MAX_SEED
from . import params
from .memory import naming_the_batch
from .model import DiffusionModel
from .train_loss import row_losses

QUERY_STREAM = 0x51554552  # keeps the query's draws apart from the plan's and the Fisher's


@dataclass(frozen=True)
class UnlearnConfig:
    """How a query is forgotten.

    steps: Newton steps; alpha: step size; draws: (noise, timestep) draws per step;
    micro_batch: draws per backward pass, each micro-batch with distinct random timesteps;
    damping: lambda = damping * mean(F) per layer (0 = none, as the paper);
    n_train: N in alpha / N, the number of images the model was trained on (None: the size of the
    training set being scored; for a model pretrained on a larger set than the one scored, give that
    set's size); method: "newton" or "sgd".
    """

    steps: int = 1
    alpha: float = 0.01
    draws: int = 50_000
    micro_batch: int = 80
    damping: float = 0.0
    n_train: int | None = None
    method: str = "newton"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "draws", "micro_batch", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or not (
                    0 <= v < MAX_SEED if name == "seed" else v >= 1):
                raise ValueError(f"{name}: {v!r} must be "
                                 f"{'an integer >= 0 and < 2**64' if name == 'seed' else 'a positive integer'}")
            # numpy integers as Python ints: to_dict() goes into JSON records, which take no numpy scalars.
            object.__setattr__(self, name, int(v))
        for name in ("alpha", "damping"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"{name}: {v!r} must be a number, not {type(v).__name__}")
        if self.n_train is not None:
            if not isinstance(self.n_train, numbers.Integral) or isinstance(self.n_train, bool) or self.n_train < 1:
                raise ValueError(f"n_train: {self.n_train!r} must be a positive integer (or None: the training "
                                 "set's size)")
            object.__setattr__(self, "n_train", int(self.n_train))
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise ValueError(f"alpha: {self.alpha!r} must be a finite number > 0")
        if not (self.damping >= 0 and math.isfinite(self.damping)):
            raise ValueError(f"damping: {self.damping!r} must be a finite number >= 0 (a multiple of the mean Fisher)")
        if self.method not in ("newton", "sgd"):
            raise ValueError(f"method: {self.method!r} is not 'newton' or 'sgd'")

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS = {
    # The paper's MSCOCO setting: one step, alpha 0.01, 50,000 draws in micro-batches of 80 timesteps.
    "mscoco": UnlearnConfig(steps=1, alpha=0.01, draws=50_000, micro_batch=80),
    # The paper's customized-model (Stable Diffusion) setting: 100 steps, alpha 0.1, 160 draws each, in
    # backward passes of 16 distinct timesteps as published (80 rows of a Stable Diffusion backward pass would
    # not fit on most GPUs). Its published code takes N = 400,000,000 (LAION-400M, what the model was
    # pretrained on) rather than the scored pool's size; give that as n_train for such a model.
    "custom": UnlearnConfig(steps=100, alpha=0.1, draws=160, micro_batch=16),
}


def preset(name: str, **overrides) -> UnlearnConfig:
    if name not in PRESETS:
        raise ValueError(f"preset: {name!r} is not one of {list(PRESETS)}")
    settings = [f.name for f in fields(UnlearnConfig)]
    for key in overrides:
        if key not in settings:
            raise ValueError(f"{key}: not a setting of UnlearnConfig; use one of {settings}")
    return replace(PRESETS[name], **overrides)


def _timesteps(seed: int, step: int, micro: int, count: int, num_train_timesteps: int) -> torch.Tensor:
    """`count` distinct random timesteps for one micro-batch (repeats only when count > T)."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + step * 65_537 + micro) % 2 ** 63)
    reps = -(-count // num_train_timesteps)
    return torch.cat([torch.randperm(num_train_timesteps, generator=g) for _ in range(reps)])[:count]


def query_gradient(model: DiffusionModel, names: list[str], x0: torch.Tensor, ctx: torch.Tensor,
                   config: UnlearnConfig, step: int = 0, mask: torch.Tensor | None = None,
                   backend: str = "auto", bar=None) -> dict[str, torch.Tensor]:
    """Mean gradient of the query's loss over `config.draws` draws, at the current weights."""
    ps = dict(model.unet.named_parameters())
    selected = [ps[n] for n in names]
    grads = {n: torch.zeros(ps[n].shape, dtype=torch.float64, device=model.device) for n in names}
    dev = model.device
    for p in selected:
        p.requires_grad_(True)
    try:
        for micro, lo in enumerate(range(0, config.draws, config.micro_batch)):
            count = min(config.micro_batch, config.draws - lo)
            ts = _timesteps(config.seed, step, micro, count, model.num_train_timesteps).to(dev)
            draw = torch.arange(step * config.draws + lo, step * config.draws + lo + count, device=dev)
            losses = row_losses(model, x0[None].expand(count, *x0.shape), ctx[None].expand(count, *ctx.shape), ts,
                                config.seed ^ QUERY_STREAM, torch.zeros(count, dtype=torch.int64, device=dev),
                                draw, None if mask is None else mask[None], backend)
            gs = torch.autograd.grad(losses.sum(), selected)
            for n, g in zip(names, gs):
                grads[n] += g.double()
            if bar is not None:
                bar.update(count)
    finally:
        for p in selected:
            p.requires_grad_(False)
    return {n: g / config.draws for n, g in grads.items()}


def check_fisher(fisher: dict[str, torch.Tensor], unet: torch.nn.Module, names: list[str], damping: float) -> None:
    ps = dict(unet.named_parameters())
    missing = [n for n in names if n not in fisher]
    if missing:
        raise ValueError(f"fisher: has no entry for {missing[:3]}{'...' if len(missing) > 3 else ''}; it was "
                         "computed for other weights or another model — compute it for this model and preset")
    for n in names:
        if tuple(fisher[n].shape) != tuple(ps[n].shape):
            raise ValueError(f"fisher: {n} has shape {tuple(fisher[n].shape)}, the model's weight "
                             f"{tuple(ps[n].shape)}; it belongs to another model: compute the Fisher for this "
                             "model (forgetscore fisher)")
        if not bool(torch.isfinite(fisher[n]).all()) or bool((fisher[n] < 0).any()):
            raise ValueError(f"fisher: {n} holds negative or non-finite values; recompute it")
        zeros = int((fisher[n] == 0).sum())
        if zeros == fisher[n].numel():
            raise ValueError(f"fisher: {n} is all zeros, so damping (a multiple of its mean) cannot help; "
                             "use more Fisher samples or leave this weight out of --weights")
        if zeros and damping == 0:
            raise ValueError(f"fisher: {n} has {zeros} zero entries and damping is 0, so the Newton step divides "
                             "by zero; use more Fisher samples or pass damping > 0 (e.g. 0.1)")


def unlearn(model: DiffusionModel, names: list[str], fisher: dict[str, torch.Tensor] | None, x0: torch.Tensor,
            ctx: torch.Tensor, config: UnlearnConfig, n_train: int, mask: torch.Tensor | None = None,
            backend: str = "auto", progress: bool = False) -> dict[str, torch.Tensor]:
    """The unlearned values of the selected weights; the model itself is left unchanged."""
    from tqdm.auto import tqdm

    if config.n_train is None and (isinstance(n_train, bool) or not isinstance(n_train, int) or n_train < 1):
        raise ValueError(f"n_train: {n_train!r} must be a positive integer (the number of images the model was "
                         "trained on: N of the step alpha / N)")
    if tuple(x0.shape) != tuple(model.input_shape):
        raise ValueError(f"x0: shape {tuple(x0.shape)} is not the UNet's input {tuple(model.input_shape)}; pass the "
                         "query as the UNet takes it (Attributor.query_inputs)")
    width = getattr(getattr(model.unet, "config", None), "cross_attention_dim", None)
    if ctx.dim() != 2 or (isinstance(width, int) and ctx.shape[-1] != width):
        raise ValueError(f"ctx: shape {tuple(ctx.shape)} is not one prompt's text states [tokens, "
                         f"{width if isinstance(width, int) else 'dim'}]; pass model.encode_text([prompt])[0]")
    if mask is not None:
        try:
            fits = torch.broadcast_shapes(mask.shape, x0.shape) == x0.shape
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(f"mask: shape {tuple(mask.shape)} does not broadcast to the query's {tuple(x0.shape)}; "
                             "use Attributor.region_mask")
    if not bool(torch.isfinite(x0).all()):
        raise ValueError("query: holds NaN or inf; pass a finite image or latent")
    if config.method == "newton":
        if fisher is None:
            raise ValueError("fisher: the Newton step needs the Fisher; compute it first or use method='sgd'")
        check_fisher(fisher, model.unet, names, config.damping)
    n = config.n_train or n_train
    ps = dict(model.unet.named_parameters())
    x0, ctx = x0.to(model.device), ctx.to(model.device)
    mask = None if mask is None else mask.to(model.device)
    current = params.get(model.unet, names)
    original = params.get(model.unet, names)
    bar = tqdm(total=config.steps * config.draws, desc="unlearn", unit="draw", disable=not progress)
    try:
        for step in range(config.steps):
            with torch.no_grad():
                for nm in names:
                    ps[nm].copy_(current[nm])
            with naming_the_batch("micro_batch", min(config.micro_batch, config.draws), "draws", "the unlearning step",
                                  " (another size draws other timesteps, and so gives other scores)"):
                g = query_gradient(model, names, x0, ctx, config, step, mask, backend, bar)
            for nm in names:
                if config.method == "sgd":
                    update = config.alpha * g[nm]
                else:
                    f = fisher[nm].to(model.device, torch.float64)
                    lam = config.damping * float(f.mean())
                    update = (config.alpha / n) * g[nm] / (f + lam)
                current[nm] = (current[nm].double() + update).to(ps[nm].dtype)
    finally:
        bar.close()
        with torch.no_grad():
            for nm in names:
                ps[nm].copy_(original[nm])
    return current
