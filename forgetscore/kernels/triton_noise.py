"""Counter-based noise: raw Philox bits, standard normals and fused ``add_noise``.

One program covers ``BLOCK_Q`` quads (``4 * BLOCK_Q`` elements) of one row and
runs Philox once per quad.  ``add_noise`` draws eps in registers and never
writes it to memory.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_jit import cast_to, jit, pick
from .triton_philox import as_uint32, interleave4, row_normal_quads, row_quads

_MODE_BITS = 0
_MODE_NORMAL = 1
_MODE_ADD_NOISE = 2


@jit(do_not_specialize=["k0", "k1"])
def _noise_kernel(out_ptr, x0_ptr, coef_signal_ptr, coef_noise_ptr, sample_ids_ptr, draw_ids_ptr,
                  k0, k1, numel, blocks_per_row,
                  MODE: tl.constexpr, BLOCK_Q: tl.constexpr):
    pid = tl.program_id(0)
    row = pid // blocks_per_row
    blk = pid % blocks_per_row
    sample_id = tl.load(sample_ids_ptr + row)
    draw_id = tl.load(draw_ids_ptr + row)
    quad = (blk * BLOCK_Q + tl.arange(0, BLOCK_Q)).to(tl.uint32)
    offs = blk * (4 * BLOCK_Q) + tl.arange(0, 4 * BLOCK_Q)
    mask = offs < numel
    # int64 row base: B * numel may exceed 2**31.
    base = row.to(tl.int64) * numel
    if MODE == 0:
        x0, x1, x2, x3 = row_quads(quad, as_uint32(k0), as_uint32(k1), draw_id, sample_id)
        # uint32 -> int64 zero-extends, giving values in [0, 2**32).
        tl.store(out_ptr + base + offs, interleave4(x0, x1, x2, x3).to(tl.int64), mask=mask)
    else:
        n0, n1, n2, n3 = row_normal_quads(quad, as_uint32(k0), as_uint32(k1), draw_id, sample_id)
        eps = interleave4(n0, n1, n2, n3)
        if MODE == 1:
            tl.store(out_ptr + base + offs, eps, mask=mask)
        else:
            a = tl.load(coef_signal_ptr + row)
            s = tl.load(coef_noise_ptr + row)
            x = tl.load(x0_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
            x_t = a * x + s * eps
            tl.store(out_ptr + base + offs, cast_to(x_t, out_ptr.dtype.element_ty), mask=mask)


def _key_arg(half: int) -> int:
    # Kernel scalars are typed from their value; passing both key halves as
    # int32 (two's complement) keeps one signature for every seed, and the
    # kernel bitcasts them back to uint32.
    return half - (1 << 32) if half >= (1 << 31) else half


def seed_key_args(seed: int) -> tuple[int, int]:
    seed = int(seed)
    return _key_arg(seed & 0xFFFFFFFF), _key_arg((seed >> 32) & 0xFFFFFFFF)


def quads_per_block(numel: int) -> int:
    quads = max((numel + 3) // 4, 1)
    # Interpreted: big blocks, since each program costs Python overhead.
    # Compiled: 1024 elements per program with 4 warps, 8 per thread.
    cap = pick(1024, 256)
    return max(8, min(cap, triton.next_power_of_2(quads)))


def _launch(mode: int, out: torch.Tensor, x0, coef_signal, coef_noise, seed: int,
            sample_ids: torch.Tensor, draw_ids: torch.Tensor, numel: int) -> torch.Tensor:
    rows = sample_ids.shape[0]
    if rows == 0 or numel == 0:
        return out
    block_q = quads_per_block(numel)
    blocks_per_row = triton.cdiv(triton.cdiv(numel, 4), block_q)
    k0, k1 = seed_key_args(seed)
    # Modes that do not read these pointers still need some tensor in the slot.
    x0 = out if x0 is None else x0
    coef_signal = sample_ids if coef_signal is None else coef_signal
    coef_noise = sample_ids if coef_noise is None else coef_noise
    _noise_kernel[(rows * blocks_per_row,)](
        out, x0, coef_signal, coef_noise, sample_ids, draw_ids, k0, k1, numel, blocks_per_row,
        MODE=mode, BLOCK_Q=block_q, num_warps=pick(1, 4),
        # a * x0 + s * eps rounded twice, as the reference and the CUDA kernel do: the same x_t on every backend.
        enable_fp_fusion=False,
    )
    return out


def bits(seed: int, sample_ids: torch.Tensor, draw_ids: torch.Tensor, numel: int) -> torch.Tensor:
    out = torch.empty((sample_ids.shape[0], numel), dtype=torch.int64, device=sample_ids.device)
    return _launch(_MODE_BITS, out, None, None, None, seed, sample_ids, draw_ids, numel)


def normal(seed: int, sample_ids: torch.Tensor, draw_ids: torch.Tensor, numel: int) -> torch.Tensor:
    out = torch.empty((sample_ids.shape[0], numel), dtype=torch.float32, device=sample_ids.device)
    return _launch(_MODE_NORMAL, out, None, None, None, seed, sample_ids, draw_ids, numel)


def add_noise(x0: torch.Tensor, coef_signal: torch.Tensor, coef_noise: torch.Tensor, seed: int,
              sample_ids: torch.Tensor, draw_ids: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(x0)
    return _launch(_MODE_ADD_NOISE, out, x0, coef_signal, coef_noise, seed, sample_ids, draw_ids,
                   x0.shape[1])
