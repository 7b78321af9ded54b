"""Per-row diffusion loss with the target regenerated in registers.

The noise eps is recomputed from its Philox counter instead of being read, so
the kernel streams only ``model_output`` (plus ``x0`` and the mask when the
prediction type or the caller needs them).

Work split: one program per (row, chunk of D).  With many rows a chunk is the
whole row and the program writes the finished loss.  With few rows (fewer than
a few programs per SM) each row is cut into chunks so that the GPU stays
busy; each program then writes partial sums of ``m * (o - y)**2`` and ``m`` to
a small [B, chunks] buffer that torch reduces afterwards.  That second step
keeps the result deterministic, unlike atomics.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_jit import jit, multiprocessor_count, pick, vector_sum
from .triton_noise import quads_per_block, seed_key_args
from .triton_philox import as_uint32, interleave4, row_normal_quads

_PREDICTION_CODES = {"epsilon": 0, "v_prediction": 1, "sample": 2}
# Programs per SM wanted before rows are split into chunks.
_PROGRAMS_PER_SM = 8


@jit(do_not_specialize=["k0", "k1"])
def _loss_kernel(out_ptr, num_ptr, den_ptr, model_output_ptr, x0_ptr, mask_ptr,
                 coef_signal_ptr, coef_noise_ptr, sample_ids_ptr, draw_ids_ptr,
                 k0, k1, D, mask_row_stride, chunks_per_row, blocks_per_chunk, blocks_per_row,
                 PREDICTION: tl.constexpr, HAS_MASK: tl.constexpr, WHOLE_ROW: tl.constexpr,
                 BLOCK_Q: tl.constexpr):
    BLOCK: tl.constexpr = 4 * BLOCK_Q
    pid = tl.program_id(0)
    row = pid // chunks_per_row
    chunk = pid % chunks_per_row
    base = row.to(tl.int64) * D
    mask_base = row.to(tl.int64) * mask_row_stride
    if PREDICTION != 2:
        key0 = as_uint32(k0)
        key1 = as_uint32(k1)
        sample_id = tl.load(sample_ids_ptr + row)
        draw_id = tl.load(draw_ids_ptr + row)
    if PREDICTION == 1:
        a = tl.load(coef_signal_ptr + row)
        s = tl.load(coef_noise_ptr + row)

    acc = tl.full([BLOCK], 0.0, tl.float32)
    if HAS_MASK:
        weight_acc = tl.full([BLOCK], 0.0, tl.float32)
    blk_start = chunk * blocks_per_chunk
    blk_end = tl.minimum(blk_start + blocks_per_chunk, blocks_per_row)
    for blk in range(blk_start, blk_end):
        offs = blk * BLOCK + tl.arange(0, BLOCK)
        inside = offs < D
        o = tl.load(model_output_ptr + base + offs, mask=inside, other=0.0).to(tl.float32)
        if PREDICTION == 2:
            y = tl.load(x0_ptr + base + offs, mask=inside, other=0.0).to(tl.float32)
        else:
            quad = (blk * BLOCK_Q + tl.arange(0, BLOCK_Q)).to(tl.uint32)
            n0, n1, n2, n3 = row_normal_quads(quad, key0, key1, draw_id, sample_id)
            eps = interleave4(n0, n1, n2, n3)
            if PREDICTION == 0:
                y = eps
            else:
                x = tl.load(x0_ptr + base + offs, mask=inside, other=0.0).to(tl.float32)
                y = a * eps - s * x
        # The tail of the last block has eps != 0 where o was padded with 0.
        diff = tl.where(inside, o - y, 0.0)
        if HAS_MASK:
            w = tl.load(mask_ptr + mask_base + offs, mask=inside, other=0.0)
            acc += w * (diff * diff)
            weight_acc += w
        else:
            acc += diff * diff

    num = vector_sum(acc)
    if HAS_MASK:
        den = vector_sum(weight_acc)
    else:
        den = D * 1.0
    if WHOLE_ROW:
        tl.store(out_ptr + row, num / den)
    else:
        tl.store(num_ptr + pid, num)
        tl.store(den_ptr + pid, den)


def _split(rows: int, blocks_per_row: int, device: torch.device) -> int:
    """Blocks per chunk: whole rows unless rows alone cannot fill the GPU."""
    wanted = _PROGRAMS_PER_SM * multiprocessor_count(device)
    chunks = max(1, min(blocks_per_row, triton.cdiv(wanted, max(rows, 1))))
    return triton.cdiv(blocks_per_row, chunks)


def _diffusion_loss(model_output, x0, coef_signal, coef_noise, seed, sample_ids, draw_ids,
                    prediction_type, mask, block_q=None, blocks_per_chunk=None):
    rows, D = model_output.shape
    device = model_output.device
    if rows == 0:
        return torch.empty(0, dtype=torch.float32, device=device)
    if D == 0:
        # 0 / 0, as the reference gives.
        return torch.full((rows,), float("nan"), dtype=torch.float32, device=device)
    prediction = _PREDICTION_CODES[prediction_type]
    block_q = block_q or quads_per_block(D)
    blocks_per_row = triton.cdiv(triton.cdiv(D, 4), block_q)
    blocks_per_chunk = min(blocks_per_chunk or _split(rows, blocks_per_row, device), blocks_per_row)
    chunks = triton.cdiv(blocks_per_row, blocks_per_chunk)
    whole_row = chunks == 1

    out = torch.empty(rows, dtype=torch.float32, device=device)
    if whole_row:
        num = den = out
    else:
        num = torch.empty((rows, chunks), dtype=torch.float32, device=device)
        den = torch.empty_like(num)
    has_mask = mask is not None
    mask_arg = mask if has_mask else out
    mask_row_stride = (0 if mask.shape[0] == 1 else mask.stride(0)) if has_mask else 0
    k0, k1 = seed_key_args(seed)
    _loss_kernel[(rows * chunks,)](
        out, num, den, model_output, x0, mask_arg, coef_signal, coef_noise, sample_ids, draw_ids,
        k0, k1, D, mask_row_stride, chunks, blocks_per_chunk, blocks_per_row,
        PREDICTION=prediction, HAS_MASK=has_mask, WHOLE_ROW=whole_row, BLOCK_Q=block_q,
        num_warps=pick(1, 4),
        enable_fp_fusion=False,  # targets and squares rounded as the reference and the CUDA kernel round them
    )
    if whole_row:
        return out
    if has_mask:
        return num.sum(dim=1) / den.sum(dim=1)
    return num.sum(dim=1) / D


def diffusion_loss(model_output: torch.Tensor, x0: torch.Tensor, coef_signal: torch.Tensor,
                   coef_noise: torch.Tensor, seed: int, sample_ids: torch.Tensor, draw_ids: torch.Tensor,
                   prediction_type: str, mask: torch.Tensor | None) -> torch.Tensor:
    return _diffusion_loss(model_output, x0, coef_signal, coef_noise, seed, sample_ids, draw_ids,
                           prediction_type, mask)
