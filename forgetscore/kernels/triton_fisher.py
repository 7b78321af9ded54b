"""Diagonal empirical Fisher of a linear layer without per-sample gradients.

``fisher[o, i] += sum_b (sum_l G[b, l, o] * X[b, l, i])**2``.  Each program owns
one (BLOCK_O x BLOCK_I) tile of ``fisher``; for every sample it forms that
tile of ``G_b^T X_b`` with ``tl.dot`` over L in BLOCK_L chunks, squares it and
adds it to a float32 register tile.  Per-sample gradients only ever exist as
that one register tile.

Batch split: d_out x d_in often gives fewer tiles than the GPU has SMs (768 x
128 is six 128 x 128 tiles), so the batch is also spread over a second grid
axis.  Each batch slice writes its tile sum to an fp32 workspace
[slices, d_out, d_in] which torch then sums into ``fisher``.  We chose that
over atomics: the result does not depend on scheduling, fp64 ``fisher`` needs
no fp64 atomics, and the workspace traffic is small next to reading X and G.
With a single slice the kernel adds into ``fisher`` itself.

Configs are picked by heuristics, not autotuning: autotuning would have to
replay a kernel that updates ``fisher`` in place.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_jit import INTERPRETED, jit, multiprocessor_count

# Target programs per SM before the batch is split further.
_PROGRAMS_PER_SM = 2
# Fewest samples a batch slice should have; fewer makes the workspace
# reduction cost more than the parallelism buys.
_MIN_SAMPLES_PER_SLICE = 4


@jit
def _fisher_kernel(fisher_ptr, work_ptr, x_ptr, g_ptr, B, L, D_IN, D_OUT, samples_per_slice,
                   BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_L: tl.constexpr,
                   UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr, DIRECT: tl.constexpr,
                   GROUP_O: tl.constexpr):
    pid = tl.program_id(0)
    slice_id = tl.program_id(1)
    # Grouped tile order: programs running together share rows of G and
    # columns of X in L2.
    tiles_o = (D_OUT + BLOCK_O - 1) // BLOCK_O
    tiles_i = (D_IN + BLOCK_I - 1) // BLOCK_I
    per_group = GROUP_O * tiles_i
    group = pid // per_group
    first_o = group * GROUP_O
    group_rows = tl.minimum(tiles_o - first_o, GROUP_O)
    tile_o = first_o + (pid % per_group) % group_rows
    tile_i = (pid % per_group) // group_rows

    offs_o = tile_o * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_i = tile_i * BLOCK_I + tl.arange(0, BLOCK_I)
    in_o = offs_o < D_OUT
    in_i = offs_i < D_IN
    arange_l = tl.arange(0, BLOCK_L)

    # int64 sample index: b * L * D can pass 2**31 for big batches.
    b_start = slice_id.to(tl.int64) * samples_per_slice
    b_end = tl.minimum(b_start + samples_per_slice, B)
    total = tl.full([BLOCK_O, BLOCK_I], 0.0, tl.float32)
    for b in range(b_start, b_end):
        x_row = x_ptr + b * L * D_IN
        g_row = g_ptr + b * L * D_OUT
        grad = tl.full([BLOCK_O, BLOCK_I], 0.0, tl.float32)
        for l0 in range(0, L, BLOCK_L):
            offs_l = l0 + arange_l
            in_l = offs_l < L
            # G chunk is loaded [BLOCK_L, BLOCK_O] (contiguous along o) and
            # transposed in registers/shared memory for the dot.
            g = tl.load(g_row + offs_l[:, None] * D_OUT + offs_o[None, :],
                        mask=in_l[:, None] & in_o[None, :], other=0.0)
            x = tl.load(x_row + offs_l[:, None] * D_IN + offs_i[None, :],
                        mask=in_l[:, None] & in_i[None, :], other=0.0)
            if UPCAST:
                g = g.to(tl.float32)
                x = x.to(tl.float32)
            grad = tl.dot(tl.trans(g), x, grad, input_precision=INPUT_PRECISION)
        total += grad * grad

    tile = offs_o[:, None] * D_IN + offs_i[None, :]
    inside = in_o[:, None] & in_i[None, :]
    if DIRECT:
        old = tl.load(fisher_ptr + tile, mask=inside, other=0.0)
        tl.store(fisher_ptr + tile, old + total.to(fisher_ptr.dtype.element_ty), mask=inside)
    else:
        tl.store(work_ptr + slice_id.to(tl.int64) * D_OUT * D_IN + tile, total, mask=inside)


def _block_l(L: int) -> int:
    """Largest L chunk (16, 32 or 64) that pads L by at most 1/8."""
    for block in (64, 32):
        padded = triton.cdiv(L, block) * block
        if padded - L <= L // 8:
            return block
    return 16


def _config(dtype: torch.dtype, L: int) -> dict:
    if INTERPRETED:
        # The interpreter's dot is only right on fp32 operands; blocks stay
        # modest since every program is simulated in NumPy.
        return dict(BLOCK_O=32, BLOCK_I=32, BLOCK_L=max(16, min(64, triton.next_power_of_2(L))),
                    UPCAST=True, INPUT_PRECISION="ieee", num_warps=1, num_stages=1)
    if dtype == torch.float32:
        # "ieee": exact fp32 products (no tf32 rounding); runs on FMA units.
        return dict(BLOCK_O=64, BLOCK_I=64, BLOCK_L=_block_l(L), UPCAST=False, INPUT_PRECISION="ieee",
                    num_warps=4, num_stages=3)
    # fp16/bf16 operands go straight to tensor cores with fp32 accumulation.
    # Two 128 x 128 fp32 tiles (per-sample grad and running sum) take 128
    # registers per thread at 8 warps.
    return dict(BLOCK_O=128, BLOCK_I=128, BLOCK_L=_block_l(L), UPCAST=False, INPUT_PRECISION="ieee",
                num_warps=8, num_stages=3)


def _fisher_accumulate(fisher: torch.Tensor, inputs: torch.Tensor, grad_outputs: torch.Tensor,
                       samples_per_slice: int | None = None) -> None:
    B, L, d_in = inputs.shape
    d_out = grad_outputs.shape[2]
    if B == 0 or L == 0 or d_in == 0 or d_out == 0:
        return
    cfg = _config(inputs.dtype, L)
    tiles = triton.cdiv(d_out, cfg["BLOCK_O"]) * triton.cdiv(d_in, cfg["BLOCK_I"])
    if samples_per_slice is None:
        wanted = _PROGRAMS_PER_SM * multiprocessor_count(fisher.device)
        slices = min(triton.cdiv(wanted, tiles), triton.cdiv(B, _MIN_SAMPLES_PER_SLICE))
        samples_per_slice = triton.cdiv(B, max(slices, 1))
    slices = triton.cdiv(B, samples_per_slice)
    direct = slices == 1
    work = fisher if direct else torch.empty((slices, d_out, d_in), dtype=torch.float32,
                                              device=fisher.device)
    _fisher_kernel[(tiles, slices)](
        fisher, work, inputs, grad_outputs, B, L, d_in, d_out, samples_per_slice,
        DIRECT=direct, GROUP_O=8, **cfg,
    )
    if not direct:
        fisher += work.sum(dim=0, dtype=fisher.dtype)


def fisher_accumulate(fisher: torch.Tensor, inputs: torch.Tensor, grad_outputs: torch.Tensor) -> None:
    _fisher_accumulate(fisher, inputs, grad_outputs)
