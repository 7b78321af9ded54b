"""Squared per-sample gradients of a layer's weights from its inputs and output gradients.

One batched backward pass gives every layer its output gradients G; each sample's loss depends
only on its own rows, so G's rows for sample b are that sample's own. A layer's per-sample
weight gradient is then a function of (X_b, G_b) alone, and its square can be summed over the
batch without ever forming a gradient per sample:

- ``nn.Linear``: grad W_b = G_b^T X_b over the tokens (``kernels.fisher_accumulate``);
  grad bias_b = sum of G_b over the tokens.
- ``nn.Conv2d`` (one group, zero padding): a linear layer over the input's patches
  (``F.unfold``): the same kernel, with L = output positions and d_in = C_in * kh * kw.
- ``nn.GroupNorm`` / ``nn.LayerNorm``: y = x_hat * w + b, so grad w_b = sum of G_b * x_hat_b and
  grad b_b = sum of G_b over the positions the affine parameters are shared by; x_hat is
  recomputed from the captured input.

A layer that runs several times in one forward pass has, per sample, the sum of each call's
gradient: the calls' terms joined along the positions. Any other kind of layer needs a backward
pass per sample.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import kernels

# A convolution's unfolded inputs held at once (Stable Diffusion's first layers unfold to 24 MB a sample in bf16).
PATCH_BYTES = 256 * 2 ** 20

KINDS = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm)
# Older diffusers wrap its layers in these; their forward adds an optional LoRA branch to the layer's own
# output, which leaves the layer's weight gradient G^T X.
_LORA_WRAPPERS = {"LoRACompatibleLinear": torch.nn.Linear, "LoRACompatibleConv": torch.nn.Conv2d}


def layer_kind(module: torch.nn.Module) -> type | None:
    """The layer kind whose rule applies: one of KINDS for that class, a subclass that keeps its forward, or
    a known wrapper; None for anything else (a rewritten forward may compute something else with the same
    parameters, e.g. a quantised one, and then only a backward pass per sample is right)."""
    cls = type(module)
    for kind in KINDS:
        if isinstance(module, kind) and (cls.forward is kind.forward or (
                cls.__module__.startswith("diffusers.") and _LORA_WRAPPERS.get(cls.__name__) is kind)):
            return kind
    return None


def supported(module: torch.nn.Module) -> bool:
    """Whether :func:`accumulate` knows this layer's per-sample gradients."""
    kind = layer_kind(module)
    if kind is torch.nn.Linear:
        return True
    if kind is torch.nn.Conv2d:
        return module.groups == 1 and module.padding_mode == "zeros" and not isinstance(module.padding, str)
    if kind is torch.nn.GroupNorm:
        return module.affine
    if kind is torch.nn.LayerNorm:
        return module.elementwise_affine
    return False


def gradient_terms(module: torch.nn.Module, x: torch.Tensor, g: torch.Tensor, n_rows: int
                   ) -> dict[str, tuple[torch.Tensor | None, torch.Tensor]]:
    """{"weight", "bias": (X, G)}: each sample's gradient of that parameter, in one of two forms.

    With X [B, L, d_in] it is G_b^T X_b (G [B, L, d_out]): the parameter as a [d_out, d_in] matrix
    (a convolution's weight flattened after its first dim). With X None it is the sum of G_b
    [B, L, numel] over its L positions: the parameter flattened. Only the layer's own parameters
    appear (a layer without bias gives no "bias").
    """
    kind = layer_kind(module)
    out: dict[str, tuple[torch.Tensor | None, torch.Tensor]] = {}
    if kind is torch.nn.Linear:
        g3 = g.reshape(n_rows, -1, g.shape[-1])
        out["weight"] = (x.reshape(n_rows, -1, x.shape[-1]), g3)
    elif kind is torch.nn.Conv2d:
        g3 = g.flatten(2).transpose(1, 2)  # [B, positions, C_out]
        patches = F.unfold(x.to(g.dtype), module.kernel_size, dilation=module.dilation, padding=module.padding,
                           stride=module.stride)
        out["weight"] = (patches.transpose(1, 2), g3)  # [B, positions, C_in * kh * kw]
    elif kind is torch.nn.GroupNorm:
        x_hat = F.group_norm(x.float(), module.num_groups, eps=module.eps).flatten(2).transpose(1, 2)
        g3 = g.float().flatten(2).transpose(1, 2)  # [B, positions, C]: the affine parameters are per channel
        out["weight"] = (None, g3 * x_hat)
    elif kind is torch.nn.LayerNorm:
        shape = tuple(module.normalized_shape)
        x_hat = F.layer_norm(x.float(), shape, eps=module.eps).reshape(n_rows, -1, math.prod(shape))
        g3 = g.float().reshape(n_rows, -1, math.prod(shape))  # the parameters are shared by the leading dims
        out["weight"] = (None, g3 * x_hat)
    else:
        raise ValueError(f"module: {type(module).__name__} has no per-sample rule here (see supported())")
    if getattr(module, "bias", None) is not None:
        out["bias"] = (None, g3)
    return out


def rows_per_slice(module: torch.nn.Module, calls: list[tuple[torch.Tensor, torch.Tensor]], n_rows: int,
                   itemsize: int) -> int:
    """How many of `n_rows` samples' terms to make at a time: for a convolution's weight, as many as keep
    the unfolded patches of all `calls` under PATCH_BYTES at `itemsize` bytes an element (at least one);
    for any other layer, all of them (its terms are no larger than its input and output)."""
    if layer_kind(module) is not torch.nn.Conv2d:
        return n_rows
    # The patches are kh * kw times the input.
    per_row = sum(g[0, 0].numel() * x.shape[1] for x, g in calls) * \
        module.kernel_size[0] * module.kernel_size[1] * itemsize
    return max(1, min(n_rows, PATCH_BYTES // max(1, per_row)))


def accumulate(module: torch.nn.Module, calls: list[tuple[torch.Tensor, torch.Tensor]], sums: dict[str, torch.Tensor],
               n_rows: int, *, backend: str = "auto") -> None:
    """sums[kind] += sum over the batch of each sample's squared gradient of ``module.<kind>``, in place.

    `calls` holds, for each time the layer ran in the forward pass, its input and the gradient
    w.r.t. its output, for `n_rows` samples; a sample's gradient is the sum over the calls, so the
    calls' terms are joined along the positions. `sums` holds float64 tensors shaped like the
    parameters, for the kinds ("weight", "bias") wanted.
    """
    step = rows_per_slice(module, calls, n_rows, calls[0][1].element_size()) if "weight" in sums else n_rows
    for lo in range(0, n_rows, step):
        rows = min(step, n_rows - lo)
        # (Sliced only when needed: a linear layer's input may be [B * L, d] rather than [B, L, d].)
        terms = [gradient_terms(module, x[lo:lo + rows], g[lo:lo + rows], rows) if step < n_rows else
                 gradient_terms(module, x, g, n_rows) for x, g in calls]
        for kind, total in sums.items():
            xs = [t[kind][0] for t in terms]
            gs = torch.cat([t[kind][1] for t in terms], 1) if len(terms) > 1 else terms[0][kind][1]
            if xs[0] is not None:
                xs = torch.cat(xs, 1) if len(xs) > 1 else xs[0]
                # check=False: a synchronisation per layer and batch otherwise; a non-finite Fisher is
                # refused where it is used (the unlearning step checks it).
                kernels.fisher_accumulate(total.view(total.shape[0], -1), xs, gs, backend=backend, check=False)
            else:
                total += gs.double().sum(1).square().sum(0).reshape(total.shape)
