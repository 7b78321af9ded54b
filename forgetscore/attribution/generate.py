"""Making query images from prompts: deterministic DDIM with classifier-free guidance.

The initial noise of image k comes from the counter-based generator keyed on
(seed, k), so a query is reproducible from its prompt, seed and settings on any
device or backend.
"""
from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

from .. import kernels
from ..kernels import validate
from .model import DiffusionModel

GENERATE_STREAM = 0x47454E45


@torch.inference_mode()
def generate(model: DiffusionModel, prompts: Sequence[str], seeds: Sequence[int] | int = 0, *, steps: int = 50,
             guidance_scale: float = 3.0, weights: dict[str, torch.Tensor] | None = None,
             batch_size: int = 64) -> torch.Tensor:
    """UNet-space samples [len(prompts), C, H, W] (decode with ``model.decode`` for pixels)."""
    from diffusers import DDIMScheduler

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("prompts: give at least one prompt")
    one_seed = isinstance(seeds, numbers.Integral) or (isinstance(seeds, torch.Tensor) and seeds.dim() == 0)
    seeds = [seeds] * len(prompts) if one_seed else list(seeds)
    if len(seeds) != len(prompts):
        raise ValueError(f"seeds: {len(seeds)} seeds for {len(prompts)} prompts; give one per prompt or one int")
    # Checked as given: mixed with the stream constant first, a bad seed would be reported as another number.
    seeds = [validate.seed(s) for s in seeds]
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"steps: {steps!r} must be an int >= 1")
    steps = int(steps)
    # A scheduler config that leaves clip_sample out is loaded with DDPM's default (True), which would clamp a
    # latent model's predicted latents to [-1, 1]; latents are not bounded so (Stable Diffusion's configs say
    # false). A pixel model's config keeps the default: pixels are bounded.
    unset = "clip_sample" in getattr(model.scheduler.config, "_use_default_values", ())
    sched = DDIMScheduler.from_config(model.scheduler.config,
                                      **({"clip_sample": False} if unset and model.vae is not None else {}))
    dtype = next(model.unet.parameters()).dtype
    outs = []
    with model.swapped(weights):
        for lo in range(0, len(prompts), batch_size):
            p, s = prompts[lo:lo + batch_size], seeds[lo:lo + batch_size]
            cond = model.encode_text(p)
            uncond = model.encode_text([""] * len(p))
            ctx = torch.cat([uncond, cond]).to(dtype)
            x = torch.stack([kernels.normal(seed ^ GENERATE_STREAM, [0], 0, model.input_shape)[0] for seed in s])
            x = x.to(model.device) * sched.init_noise_sigma
            sched.set_timesteps(steps, device=model.device)
            for t in sched.timesteps:
                inp = sched.scale_model_input(torch.cat([x, x]), t).to(dtype)
                out = model.unet(inp, t, encoder_hidden_states=ctx).sample.float()
                o_u, o_c = out.chunk(2)
                guided = o_u + guidance_scale * (o_c - o_u)
                x = sched.step(guided, t, x).prev_sample
            outs.append(x)
    return torch.cat(outs)
