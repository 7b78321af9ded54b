"""The ``mixed`` sweep precision: bfloat16 autocast except the UNet's output end, kept in float32.

A score is the small rise of a loss (0.1-1 % of it), about the size of bfloat16's rounding step.
Measured on the digits model (benchmarks/RESULTS.md), the rounding that blurs the scores is
that of the decoder's last layers: with the last up block and the output head in float32 and
everything before them in bfloat16, the scores agree with float32's nearly as well as float32
itself (top-100 overlap 0.94, where plain bfloat16 gives 0.79), while the encoder, the middle
and the other decoder blocks keep bfloat16's speed. On CUDA the float32 part runs on TF32
tensor cores (float32 activations, 10-bit products), which kept the same agreement where it
was emulated on the CPU.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch


def _float32(value: Any) -> Any:
    """Floating tensors (also inside tuples, lists and dicts, e.g. a block's skip connections) as float32."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_float32(v) for v in value)
    if isinstance(value, dict):
        return {k: _float32(v) for k, v in value.items()}
    return value


def tail_modules(unet: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules run in float32: the last up block, the output norm and the output convolution."""
    missing = [name for name in ("up_blocks", "conv_out") if getattr(unet, name, None) is None]
    if missing or not len(unet.up_blocks):
        raise ValueError(f"precision: 'mixed' needs a UNet with up_blocks and conv_out (a diffusers "
                         f"UNet2DConditionModel); {type(unet).__name__} lacks {missing or ['up_blocks']}; "
                         "use fp32, bf16 or fp16")
    return [m for m in (unet.up_blocks[-1], getattr(unet, "conv_norm_out", None), unet.conv_out) if m is not None]


class Float32Tail:
    """Installs float32 forwards on a UNet's output end, for the duration of a sweep's calls.

    Each module's float32 forward is made once, so that torch.compile sees the same function at
    every call (no recompilation) and the installed calls cost a dictionary write.
    """

    def __init__(self, unet: torch.nn.Module):
        self.modules = tail_modules(unet)
        self.device_type = next(unet.parameters()).device.type
        self._forwards = [self._wrap(m) for m in self.modules]

    def _wrap(self, module: torch.nn.Module):
        forward, device_type = module.forward, self.device_type

        def float32_forward(*args, **kwargs):
            with torch.autocast(device_type, enabled=False):
                return forward(*_float32(args), **{k: _float32(v) for k, v in kwargs.items()})

        return float32_forward

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        saved = [m.__dict__.get("forward") for m in self.modules]
        try:
            for m, f in zip(self.modules, self._forwards):
                m.forward = f
            yield
        finally:
            for m, old in zip(self.modules, saved):
                if old is None:
                    m.__dict__.pop("forward", None)
                else:
                    m.forward = old
