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

Any other layer (or a layer that runs twice in one forward pass) needs a backward pass per sample.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import kernels

# A convolution's unfolded inputs held at once (Stable Diffusion's first layers unfold to 24 MB a sample in bf16).
PATCH_BYTES = 256 * 2 ** 20

KINDS = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm)
# Older diffusers wrap its layers in these; their forward adds an optional LoRA branch to the layer's own
# output, which leaves the layer's weight gradient G^T X.
_LORA_WRAPPERS = {"LoRACompatibleLinear": torch.nn.Linear, "LoRACompatibleConv": torch.nn.Conv2d}


def _kind(module: torch.nn.Module) -> type | None:
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
    kind = _kind(module)
    if kind is torch.nn.Linear:
        return True
    if kind is torch.nn.Conv2d:
        return module.groups == 1 and module.padding_mode == "zeros" and not isinstance(module.padding, str)
    if kind is torch.nn.GroupNorm:
        return module.affine
    if kind is torch.nn.LayerNorm:
        return module.elementwise_affine
    return False


def accumulate(module: torch.nn.Module, x: torch.Tensor, g: torch.Tensor, sums: dict[str, torch.Tensor],
               n_rows: int, *, backend: str = "auto") -> None:
    """sums[kind] += sum over the batch of each sample's squared gradient of ``module.<kind>``, in place.

    `x` is the layer's input and `g` the gradient w.r.t. its output, for `n_rows` samples; `sums`
    holds float64 tensors shaped like the parameters, for the kinds ("weight", "bias") wanted.
    """
    kind = _kind(module)
    if kind is torch.nn.Linear:
        x3, g3 = x.reshape(n_rows, -1, x.shape[-1]), g.reshape(n_rows, -1, g.shape[-1])
        if "weight" in sums:
            # check=False: a synchronisation per layer and batch otherwise; a non-finite Fisher is
            # refused where it is used (the unlearning step checks it).
            kernels.fisher_accumulate(sums["weight"], x3, g3, backend=backend, check=False)
        if "bias" in sums:
            sums["bias"] += g3.double().sum(1).square().sum(0)
    elif kind is torch.nn.Conv2d:
        g3 = g.flatten(2).transpose(1, 2)  # [B, positions, C_out]
        if "weight" in sums:
            # The patches are kh * kw times the input: a few samples at a time keep them under PATCH_BYTES.
            per_row = g3.shape[1] * x.shape[1] * module.kernel_size[0] * module.kernel_size[1] * g.element_size()
            step = max(1, PATCH_BYTES // max(1, per_row))
            for lo in range(0, n_rows, step):
                patches = F.unfold(x[lo:lo + step].to(g.dtype), module.kernel_size, dilation=module.dilation,
                                   padding=module.padding, stride=module.stride)
                kernels.fisher_accumulate(sums["weight"].view(sums["weight"].shape[0], -1),
                                          patches.transpose(1, 2), g3[lo:lo + step], backend=backend, check=False)
        if "bias" in sums:
            sums["bias"] += g3.double().sum(1).square().sum(0)
    else:
        if kind is torch.nn.GroupNorm:
            x_hat = F.group_norm(x.float(), module.num_groups, eps=module.eps)
            # [B, C, positions]: the affine parameters are per channel (dim 1).
            x_hat, g3 = x_hat.flatten(2), g.float().flatten(2)
            reduce = (2,)
        else:  # LayerNorm: parameters shaped like the last dims, shared by the leading ones
            shape = tuple(module.normalized_shape)
            x_hat = F.layer_norm(x.float(), shape, eps=module.eps).reshape(n_rows, -1, *shape)
            g3 = g.float().reshape(n_rows, -1, *shape)
            reduce = (1,)
        if "weight" in sums:
            sums["weight"] += (g3 * x_hat).sum(reduce).double().square().sum(0).reshape(sums["weight"].shape)
        if "bias" in sums:
            sums["bias"] += g3.sum(reduce).double().square().sum(0).reshape(sums["bias"].shape)
