"""Which UNet weights are unlearned.

Presets follow the paper's ablation: ``kv`` (every cross-attention key/value
projection, the default), ``cross-attn`` (all of attn2), ``attn`` (attn1 and attn2),
``all`` (every weight). Anything else is taken as a regular expression on
parameter names.
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch

PRESETS = {
    "kv": r"(^|\.)attn2\.to_[kv]\.weight$",
    "cross-attn": r"(^|\.)attn2\.",
    "attn": r"(^|\.)attn[12]\.",
    "all": r".",
}


def select(unet: torch.nn.Module, weights: str = "kv") -> list[str]:
    """Names of the selected parameters, in the model's order."""
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
