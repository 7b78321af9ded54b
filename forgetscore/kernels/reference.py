"""Plain-PyTorch reference implementations of every kernel.

These are the semantics the Triton, C++ and CUDA kernels must reproduce.  They
favour clarity over speed and run on any device torch supports.

Counter-based noise (the scheme every backend implements bit for bit)
-------------------------------------------------------------------
Philox4x32-10 (Salmon et al., SC 2011), keyed by the 64-bit seed
``(seed & 0xffffffff, seed >> 32)``.  Element ``e`` of row ``b`` belongs to quad
``j = e // 4`` and takes lane ``e % 4`` of the block generated from the counter

    (j, draw_ids[b], sample_ids[b] & 0xffffffff, sample_ids[b] >> 32).

Lanes are turned into normals pairwise with Box-Muller: lanes (0, 1) give
``r0 * cos(theta1)`` and ``r0 * sin(theta1)``, lanes (2, 3) likewise, where
``r = sqrt(-2 log u)``, ``theta = 2*pi*u`` and ``u = ((x >> 8) + 0.5) * 2**-24``.
The uniform keeps the top 24 bits and is computed in float32 the same way by every
backend, so Box-Muller starts from the same float32 values everywhere. It is never 0;
above 0.5 the half step is rounded to even (float32 spacing there is 2**-24), so it can
be 1, which gives r = 0.
"""
from __future__ import annotations

import torch

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10
MASK32 = 0xFFFFFFFF
TWO_PI = 6.283185307179586
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # b holds values < 2**32 in int64; the 64-bit product would overflow int64,
    # so the constant is split into 16-bit halves.
    a_hi, a_lo = a >> 16, a & 0xFFFF
    t_lo = b * a_lo
    t_hi = b * a_hi
    hi = (t_hi + (t_lo >> 16)) >> 16
    lo = (((t_hi & 0xFFFF) << 16) + t_lo) & MASK32
    return hi, lo


def philox4x32(counter: tuple[torch.Tensor, ...], key: tuple[int, int]) -> list[torch.Tensor]:
    """Philox4x32-10 on int64 tensors holding uint32 values."""
    c0, c1, c2, c3 = (c & MASK32 for c in counter)
    k0, k1 = key[0] & MASK32, key[1] & MASK32
    for r in range(PHILOX_ROUNDS):
        if r:
            k0 = (k0 + PHILOX_W0) & MASK32
            k1 = (k1 + PHILOX_W1) & MASK32
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return [c0, c1, c2, c3]


def _seed_key(seed: int) -> tuple[int, int]:
    return seed & MASK32, (seed >> 32) & MASK32


def random_bits(seed: int, sample_ids: torch.Tensor, draw_ids: torch.Tensor, numel: int) -> torch.Tensor:
    """uint32 stream as int64 values in [0, 2**32): shape [B, numel]."""
    device = sample_ids.device
    quads = (numel + 3) // 4
    j = torch.arange(quads, device=device, dtype=torch.int64)[None, :]
    sid = sample_ids.to(torch.int64)[:, None]
    did = draw_ids.to(torch.int64)[:, None]
    counter = (j.expand(sid.shape[0], quads), did.expand(-1, quads),
               (sid & MASK32).expand(-1, quads), ((sid >> 32) & MASK32).expand(-1, quads))
    lanes = philox4x32(counter, _seed_key(seed))
    return torch.stack(lanes, dim=-1).reshape(sid.shape[0], quads * 4)[:, :numel]


bits = random_bits  # the name every backend uses for this function (BACKENDS.md)


def bits_to_uniform(bits: torch.Tensor) -> torch.Tensor:
    return ((bits >> 8).to(torch.float32) + 0.5) * (2.0 ** -24)


def normal(seed: int, sample_ids: torch.Tensor, draw_ids: torch.Tensor, numel: int) -> torch.Tensor:
    """Standard normals, float32 [B, numel]."""
    quads = (numel + 3) // 4
    u = bits_to_uniform(random_bits(seed, sample_ids, draw_ids, quads * 4)).view(-1, quads, 2, 2)
    radius = torch.sqrt(-2.0 * torch.log(u[..., 0]))
    theta = u[..., 1] * torch.tensor(TWO_PI, dtype=torch.float32)
    out = torch.stack((radius * torch.cos(theta), radius * torch.sin(theta)), dim=-1)
    return out.reshape(-1, quads * 4)[:, :numel]


def noise_coefficients(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (sqrt(abar_t), sqrt(1 - abar_t)) in float32, computed in float64 once.

    Every backend receives these same per-row float32 coefficients, so the
    arithmetic inside the kernels starts from identical values.
    """
    abar = alphas_cumprod.to(device=timesteps.device, dtype=torch.float64)[timesteps.long()]
    return abar.sqrt().to(torch.float32), (1.0 - abar).sqrt().to(torch.float32)


def add_noise(x0: torch.Tensor, coef_signal: torch.Tensor, coef_noise: torch.Tensor, seed: int,
              sample_ids: torch.Tensor, draw_ids: torch.Tensor) -> torch.Tensor:
    """x0 [B, D] -> x_t [B, D] in x0's dtype, arithmetic in float32."""
    eps = normal(seed, sample_ids, draw_ids, x0.shape[1])
    x_t = coef_signal[:, None] * x0.float() + coef_noise[:, None] * eps
    return x_t.to(x0.dtype)


def diffusion_target(x0: torch.Tensor, coef_signal: torch.Tensor, coef_noise: torch.Tensor, seed: int,
                     sample_ids: torch.Tensor, draw_ids: torch.Tensor, prediction_type: str) -> torch.Tensor:
    if prediction_type == "sample":
        return x0.float()
    eps = normal(seed, sample_ids, draw_ids, x0.shape[1])
    if prediction_type == "epsilon":
        return eps
    return coef_signal[:, None] * eps - coef_noise[:, None] * x0.float()


def diffusion_loss(model_output: torch.Tensor, x0: torch.Tensor, coef_signal: torch.Tensor,
                   coef_noise: torch.Tensor, seed: int, sample_ids: torch.Tensor, draw_ids: torch.Tensor,
                   prediction_type: str, mask: torch.Tensor | None) -> torch.Tensor:
    """Per-row mean squared error [B] in float32; mask is None or float32 [1 or B, D]."""
    target = diffusion_target(x0, coef_signal, coef_noise, seed, sample_ids, draw_ids, prediction_type)
    sq = (model_output.float() - target).square()
    if mask is None:
        return sq.sum(dim=1) / sq.shape[1]
    return (sq * mask).sum(dim=1) / mask.sum(dim=1)


def fisher_accumulate(fisher: torch.Tensor, inputs: torch.Tensor, grad_outputs: torch.Tensor) -> torch.Tensor:
    """fisher[d_out, d_in] += sum_b (G_b^T X_b)**2 with X [B, L, d_in], G [B, L, d_out].

    Materialises the per-sample gradients: this is the slow, obvious way.
    """
    # No graph, as in the fused kernels: inputs that require grad would otherwise attach one to `fisher`, an
    # accumulator that the next call would then refuse as requiring grad.
    with torch.no_grad():
        per_sample = torch.einsum("blo,bli->boi", grad_outputs.float(), inputs.float())
        fisher += per_sample.square().sum(dim=0).to(fisher.dtype)
    return fisher

