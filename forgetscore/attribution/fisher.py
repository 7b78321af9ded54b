"""The diagonal Fisher of the training loss over the selected weights.

F = mean over S samples of the squared per-sample gradient, each sample an image,
one random caption of it, one random timestep and fresh noise. For linear layers
(every preset but ``all``) the per-sample gradients are never formed: hooks capture
each layer's inputs X and output gradients G, and ``kernels.fisher_accumulate`` adds
sum_b (G_b^T X_b)^2. Other parameters (convolutions, norms under ``all``) fall back to
one backward pass per sample. Accumulated in float64.
"""
from __future__ import annotations

import torch

from .. import kernels
from .data import PreparedData
from .model import DiffusionModel
from .train_loss import row_losses

FISHER_STREAM = 0x46495348  # separates the Fisher's random draws from the scoring plan's


def sample_draws(seed: int, start: int, count: int, data: PreparedData, num_train_timesteps: int,
                 flips: bool) -> dict[str, torch.Tensor]:
    """Sample s -> (image, caption, timestep, flip), keyed on (seed, s): the same whatever the batching."""
    bits = kernels.random_bits(seed ^ FISHER_STREAM, torch.arange(start, start + count), 0, 4)
    image = bits[:, 0] % data.n
    offsets = torch.as_tensor(data.caption_offsets)
    n_caps = offsets[image + 1] - offsets[image]
    return {"image": image, "caption": bits[:, 1] % n_caps, "timestep": bits[:, 2] % num_train_timesteps,
            "version": (bits[:, 3] & 1) if flips else torch.zeros(count, dtype=torch.int64),
            "sample_id": torch.arange(start, start + count)}


class _Capture:
    """Forward hooks that keep each linear layer's input and output for one backward pass."""

    def __init__(self, modules: dict[str, torch.nn.Linear]):
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in modules.items()]

    def _hook(self, name: str):
        def hook(module, args, output):
            self.inputs[name] = args[0].detach()
            self.outputs[name] = output
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def compute_fisher(model: DiffusionModel, data: PreparedData, names: list[str], *, samples: int, seed: int = 0,
                   batch_size: int = 64, flips: bool = True, captions: str = "all", backend: str = "auto",
                   progress: bool = True) -> dict[str, torch.Tensor]:
    """{parameter name: float64 Fisher diagonal (parameter's shape)} from `samples` samples."""
    from tqdm.auto import tqdm

    if samples < 1:
        raise ValueError(f"samples: {samples} must be >= 1")
    unet = model.unet
    all_params = dict(unet.named_parameters())
    modules = dict(unet.named_modules())
    linear, bias_of, other = {}, {}, []
    for n in names:
        owner, _, kind = n.rpartition(".")
        mod = modules.get(owner)
        if isinstance(mod, torch.nn.Linear) and kind == "weight":
            linear[owner] = mod
        elif isinstance(mod, torch.nn.Linear) and kind == "bias":
            linear[owner] = mod
            bias_of[owner] = n
        else:
            other.append(n)
    fisher = {n: torch.zeros(all_params[n].shape, dtype=torch.float64, device=model.device) for n in names}
    selected = [all_params[n] for n in names]
    for p in selected:
        p.requires_grad_(True)
    try:
        with tqdm(total=samples, desc="fisher", unit="sample", disable=not progress) as bar:
            for start in range(0, samples, batch_size):
                count = min(batch_size, samples - start)
                d = sample_draws(seed, start, count, data, model.num_train_timesteps, flips)
                x0 = data.inputs(d["image"].numpy())[torch.arange(count), d["version"]].to(model.device)
                text, counts = data.text(d["image"].numpy(), "all")
                first = torch.cumsum(torch.as_tensor([0] + counts[:-1]), 0)
                cap = d["caption"] if captions == "all" else torch.zeros_like(d["caption"])
                ctx = text[first + cap].to(model.device)
                args = (x0, ctx, d["timestep"].to(model.device), seed ^ FISHER_STREAM,
                        d["sample_id"].to(model.device), torch.ones(count, dtype=torch.int64, device=model.device))
                if linear:
                    cap_hooks = _Capture(linear)
                    try:
                        losses = row_losses(model, *args, backend=backend)
                    finally:
                        cap_hooks.close()
                    owners = list(cap_hooks.outputs)
                    # Each row's loss depends only on its own sample, so the gradient of the sum w.r.t. a layer's
                    # output rows is each sample's own output gradient.
                    grads = torch.autograd.grad(losses.sum(), [cap_hooks.outputs[o] for o in owners],
                                                retain_graph=bool(other))
                    for o, g in zip(owners, grads):
                        x = cap_hooks.inputs[o]
                        x3 = x.reshape(count, -1, x.shape[-1])
                        g3 = g.reshape(count, -1, g.shape[-1])
                        wname = f"{o}.weight"
                        if wname in fisher:
                            kernels.fisher_accumulate(fisher[wname], x3, g3, backend=backend)
                        if o in bias_of:
                            fisher[bias_of[o]] += g3.double().sum(1).square().sum(0)
                    del cap_hooks
                if other:
                    extra = [all_params[n] for n in other]
                    if not linear:
                        losses = row_losses(model, *args, backend=backend)
                    for b in range(count):
                        gs = torch.autograd.grad(losses[b], extra, retain_graph=b < count - 1)
                        for n, g in zip(other, gs):
                            fisher[n] += g.double().square()
                bar.update(count)
    finally:
        for p in selected:
            p.requires_grad_(False)
    return {n: f / samples for n, f in fisher.items()}
