"""Which UNet weights are unlearned.

Presets follow the paper's ablation: ``kv`` (every cross-attention key/value
projection, the default; their biases too where a model has them, as the published
code's name match takes them), ``cross-attn`` (all of attn2), ``attn`` (attn1 and attn2),
``all`` (every weight). Anything else is taken as a regular expression on
parameter names.
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch

PRESETS = {
    "kv": r"(^|\.)attn2\.to_[kv]\.(weight|bias)$",
    "cross-attn": r"(^|\.)attn2\.",
    "attn": r"(^|\.)attn[12]\.",
    "all": r".",
}


def select(unet: torch.nn.Module, weights: str = "kv") -> list[str]:
    """Names of the selected parameters, in the model's order."""
    if not isinstance(weights, str):
        raise ValueError(f"weights: expected one string, a preset {list(PRESETS)} or a regular expression, got "
                         f"{type(weights).__name__}; for several patterns join them with '|'")
    pattern = PRESETS.get(weights, weights)
    try:
        rx = re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"weights: {weights!r} is neither a preset {list(PRESETS)} nor a valid regular "
                         f"expression ({exc})") from None
    names = [n for n, _ in unet.named_parameters() if rx.search(n)]
    if not names:
        raise ValueError(f"weights: {weights!r} selects no parameter of this UNet; use one of {list(PRESETS)} "
                         "or a pattern matching its parameter names")
    return names


def get(unet: torch.nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    params = dict(unet.named_parameters())
    return {n: params[n].detach().clone() for n in names}


def check_values(unet: torch.nn.Module, values: dict[str, torch.Tensor] | None, argument: str) -> None:
    """That `values` names weights of `unet`, each with the weight's shape (None or {}: nothing to check)."""
    if not values:
        return
    if not isinstance(values, dict):
        raise ValueError(f"{argument}: expected a dict {{weight name: tensor}} (or None), got {type(values).__name__}")
    params = dict(unet.named_parameters())
    for n, v in values.items():
        if n not in params:
            raise ValueError(f"{argument}: the UNet has no weight named {n!r}; use the names of "
                             "unet.named_parameters() (e.g. those Attributor.names lists)")
        if not isinstance(v, torch.Tensor) or tuple(v.shape) != tuple(params[n].shape):
            got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"{argument}: {n} is {got}, the weight is {tuple(params[n].shape)}; give a tensor "
                             "of the weight's shape")


@contextmanager
def swapped(unet: torch.nn.Module, values: dict[str, torch.Tensor] | None) -> Iterator[None]:
    """Temporarily load `values` into the named parameters (None: leave the model as it is)."""
    if not values:
        yield
        return
    params = dict(unet.named_parameters())
    saved = {n: params[n].detach().clone() for n in values}
    try:
        with torch.no_grad():
            for n, v in values.items():
                params[n].copy_(v)
        yield
    finally:
        with torch.no_grad():
            for n, v in saved.items():
                params[n].copy_(v)
