#!/usr/bin/env python
"""Time forgetscore's kernels against the way a user would write the same thing in eager PyTorch.

Two comparisons, side by side in one run:

1. Noising + loss.  The eager way::

       eps = torch.randn_like(x0, generator=gen)          # gen re-seeded per batch
       x_t = scheduler.add_noise(x0, eps, t)              # diffusers DDPMScheduler
       ...                                                # model(x_t) -> out (a fixed stand-in here)
       loss = F.mse_loss(out, eps, reduction="none").mean(dim=(1, 2, 3))

   versus ``kernels.add_noise`` + ``kernels.diffusion_loss`` (which regenerate eps from
   (seed, sample id, draw id) instead of keeping it), with backend="auto" and each
   available backend, plus ``torch.compile`` of the eager way where it compiles.

2. Fisher accumulation for a linear layer.  The naive materialising way::

       fisher += torch.einsum("blo,bli->boi", G, X).square().sum(0)

   versus ``kernels.fisher_accumulate`` per backend, with the extra memory each needs.

On CUDA it also measures the device's copy bandwidth and matmul rate and reports the
kernels as a fraction of them.  Every time is the median over several repeats after
warm-up; see benchmarks/README.md for what each column means.

    python benchmarks/bench_kernels.py --device cpu [--quick] [--json out.json]
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

# _common first: importing it puts the checkout ahead of any installed forgetscore.
from _common import (Results, choice_list, fmt_bytes, int_list, int_range, json_path, make_sync, positive_float,
                     run_meta, table, timing_device)

from forgetscore import kernels  # noqa: E402
from forgetscore.kernels import dispatch, reference, validate  # noqa: E402

SEED = 1234
LATENTS = {"4x16x16": (4, 16, 16), "4x64x64": (4, 64, 64)}
BATCHES = (64, 512, 2048, 8000)
# (model, layer, d_in, d_out, L, B): the cross-attention K/V projections of the two
# text-conditioned models the attribution runs on.
FISHER_SHAPES = (
    ("MSCOCO", "K/V", 1024, 128, 77, 64),
    ("MSCOCO", "K/V", 1024, 128, 77, 256),
    ("MSCOCO", "K/V", 1024, 256, 77, 64),
    ("MSCOCO", "K/V", 1024, 256, 77, 256),
    ("SD", "K/V", 768, 320, 77, 64),
    ("SD", "K/V", 768, 640, 77, 64),
    ("SD", "K/V", 768, 1280, 77, 64),
)
# The plain-PyTorch reference backend emulates Philox with int64 tensor ops: tens of
# temporaries per element.  Above this many noise elements it is skipped.
REFERENCE_MAX_NUMEL = {"cpu": 1 << 17, "cuda": 1 << 25}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}
# What fisher_accumulate takes for X and G (float64 is an accumulator dtype only).
FISHER_INPUT_DTYPES = tuple(name for name, dt in DTYPES.items() if dt in validate.FLOAT_DTYPES)


# --------------------------------------------------------------------------- timing

class Skip(Exception):
    """A measurement that was not taken; the message says why."""


def _warm_up(fn: Callable[[], Any], sync: Callable[[], None]) -> tuple[float, float]:
    """Seconds of a first call (compilation, first-touch costs included) and of a second one."""
    t0 = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    fn()
    sync()
    return first, max(time.perf_counter() - t0, 1e-7)


def measure(fn: Callable[[], Any], sync: Callable[[], None], *, repeats: int, block_s: float,
            max_s: float) -> dict[str, float]:
    """Median seconds per call of fn after two warm-up calls.

    Calls are grouped in blocks of at least `block_s` seconds (so that microsecond
    kernels are not lost in timer and launch noise), with at most `repeats` and at
    least 3 blocks, fewer when a call is so slow that `max_s` would be exceeded.
    """
    first, one = _warm_up(fn, sync)
    inner = max(1, min(10_000, int(block_s / one)))
    n = max(3, min(repeats, int(max_s / (one * inner))))
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        sync()
        samples.append((time.perf_counter() - t0) / inner)
    return {"median_s": statistics.median(samples), "min_s": min(samples), "max_s": max(samples),
            "blocks": n, "calls_per_block": inner, "first_call_s": first}


def measure_group(fns: dict[str, Callable[[], Any]], sync: Callable[[], None], *, repeats: int, block_s: float,
                  max_s: float) -> dict[str, dict | str]:
    """Like :func:`measure` for several functions, interleaved: round k times one block of each.

    Interleaving gives every function the same share of whatever else the machine is
    doing, so the ratios between them stay meaningful on a shared machine.  A function
    that raises gets "n/a (...)" instead of a timing.
    """
    out: dict[str, dict | str] = {}
    plan: dict[str, tuple[int, float]] = {}
    for name, fn in fns.items():
        try:
            first, one = _warm_up(fn, sync)
        except Exception as exc:  # noqa: BLE001
            first_line = (str(exc).splitlines() or [""])[0][:120]
            out[name] = f"n/a ({type(exc).__name__}: {first_line})"
            continue
        inner = max(1, min(10_000, int(block_s / one)))
        plan[name] = (inner, first)
    if not plan:
        return out
    round_s = 0.0  # one round, timed once more: this also decides the number of rounds
    for name, (inner, _) in plan.items():
        t0 = time.perf_counter()
        for _ in range(inner):
            fns[name]()
        sync()
        round_s += time.perf_counter() - t0
    n = max(3, min(repeats, int(max_s * len(plan) / max(round_s, 1e-9))))
    samples: dict[str, list[float]] = {name: [] for name in plan}
    for _ in range(n):
        for name, (inner, _) in plan.items():
            fn = fns[name]
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            sync()
            samples[name].append((time.perf_counter() - t0) / inner)
    for name, (inner, first) in plan.items():
        xs = samples[name]
        out[name] = {"median_s": statistics.median(xs), "min_s": min(xs), "max_s": max(xs),
                     "blocks": n, "calls_per_block": inner, "first_call_s": first}
    return out


class Runner:
    def __init__(self, args: argparse.Namespace, device: torch.device):
        self.args = args
        self.device = device
        self.sync = make_sync(device)
        self.start = time.perf_counter()
        if args.quick:
            self.repeats, self.block_s, self.max_s = 5, 0.02, 1.5
        else:
            self.repeats, self.block_s, self.max_s = 9, 0.05, 4.0

    def over_budget(self) -> bool:
        return self.args.budget_s > 0 and time.perf_counter() - self.start > self.args.budget_s

    def time(self, fn: Callable[[], Any]) -> dict[str, float]:
        return measure(fn, self.sync, repeats=self.repeats, block_s=self.block_s, max_s=self.max_s)

    def time_group(self, fns: dict[str, Callable[[], Any]]) -> dict[str, dict | str]:
        return measure_group(fns, self.sync, repeats=self.repeats, block_s=self.block_s, max_s=self.max_s)


# --------------------------------------------------------------------------- the eager way

def make_scheduler():
    """A Stable-Diffusion-style DDPMScheduler, or an equivalent stand-in without diffusers."""
    kw = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012)
    try:
        from diffusers import DDPMScheduler
    except Exception as exc:  # noqa: BLE001 - e.g. no diffusers on the GPU machine
        return InlineDDPM(**kw), f"inline DDPM add_noise (diffusers unavailable: {type(exc).__name__})"
    import diffusers
    return DDPMScheduler(beta_schedule="scaled_linear", **kw), f"diffusers {diffusers.__version__} DDPMScheduler"


class InlineDDPM:
    """Same forward process as DDPMScheduler(beta_schedule="scaled_linear").add_noise."""

    def __init__(self, num_train_timesteps: int, beta_start: float, beta_end: float):
        betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=torch.float32) ** 2
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        acp = self.alphas_cumprod.to(device=x0.device, dtype=x0.dtype)[t]
        shape = (-1,) + (1,) * (x0.dim() - 1)
        return acp.sqrt().view(shape) * x0 + (1 - acp).sqrt().view(shape) * noise


def _randn_like_takes_generator() -> bool:
    try:
        torch.randn_like(torch.empty(1), generator=torch.Generator().manual_seed(0))
    except TypeError:
        return False
    return True


RANDN_LIKE_GENERATOR = _randn_like_takes_generator()


def eager_fns(scheduler, gen: torch.Generator):
    def noise(x0: torch.Tensor, t: torch.Tensor):
        gen.manual_seed(SEED)  # one generator, re-seeded per batch
        if RANDN_LIKE_GENERATOR:
            eps = torch.randn_like(x0, generator=gen)
        else:
            eps = torch.randn(x0.shape, generator=gen, dtype=x0.dtype, device=x0.device)
        return scheduler.add_noise(x0, eps, t), eps

    def loss(out: torch.Tensor, eps: torch.Tensor):
        return F.mse_loss(out, eps, reduction="none").mean(dim=tuple(range(1, out.dim())))

    return noise, loss


# --------------------------------------------------------------------------- noising + loss

def kernel_backends(device: torch.device) -> list[tuple[str, str]]:
    """[(label, backend)] to time: auto, then each available backend that runs compiled here."""
    rows = []
    auto_mod = dispatch.resolve("auto", device)
    auto_name = next((b for b in dispatch.BACKENDS if dispatch._module(b) is auto_mod), "?")
    rows.append((f"kernels auto (={auto_name})", "auto"))
    for s in kernels.status():
        if not s.available or device.type not in s.devices:
            continue
        if s.name == "triton" and device.type == "cpu":
            continue  # the interpreter: exact but orders of magnitude slower than eager
        rows.append((f"kernels {s.name}", s.name))
    return rows


def skipped_backends(device: torch.device) -> list[str]:
    out = []
    for s in kernels.status():
        if s.name == "triton" and s.available and device.type == "cpu":
            out.append("triton: interpreted on CPU (test-only, far slower than eager), not timed")
        elif not s.available:
            out.append(f"{s.name}: {s.detail}")
    return out


def noise_shapes(r: Runner) -> list[tuple[str, tuple[int, ...], int]]:
    batches = [b for b in BATCHES if not r.args.quick or b <= 512]
    if r.args.batches:
        batches = list(r.args.batches)
    return [(lname, shape, B) for lname, shape in LATENTS.items() for B in batches]


def bench_noise_loss(r: Runner, emit: Callable[[str, dict], None], scheduler, sched_desc: str,
                     compile_pass: bool = False) -> None:
    """Time every method per shape; with compile_pass, only torch.compile of the eager way.

    The compiled variant runs as a separate, last pass: compiling costs tens of seconds
    per shape family, and with a time budget the other rows should not wait for it.
    """
    dev = r.device
    gen = torch.Generator(device=dev)
    noise_fn, loss_fn = eager_fns(scheduler, gen)
    compiled: tuple | str | None = None
    if compile_pass:
        try:
            compiled = (torch.compile(noise_fn), torch.compile(loss_fn))
        except Exception as exc:  # noqa: BLE001
            compiled = f"n/a ({type(exc).__name__})"
    acp = scheduler.alphas_cumprod.to(dev, torch.float32)
    backends = [] if compile_pass else kernel_backends(dev)
    for lname, shape, B in noise_shapes(r):
        D = math.prod(shape)
        numel = B * D
        base = {"latent": lname, "batch": B, "numel": numel}
        if r.over_budget():
            emit("noise_loss", {**base, "method": "torch.compile(eager)" if compile_pass else "all",
                                "skipped": "time budget exhausted"})
            continue
        if isinstance(compiled, str):
            emit("noise_loss", {**base, "method": "torch.compile(eager)", "skipped": compiled})
            continue
        g = torch.Generator().manual_seed(B)
        x0 = torch.randn(B, *shape, generator=g).to(dev)
        out = torch.randn(B, *shape, generator=g).to(dev)
        t = torch.randint(0, 1000, (B,), generator=g).to(dev)
        sids = (torch.arange(B, dtype=torch.int64) + 10_000).to(dev)
        dids = torch.zeros(B, dtype=torch.int64, device=dev)
        # bytes a fused kernel must move: add_noise reads x0, writes x_t; the loss reads out and x0.
        bytes_noise = 2 * numel * x0.element_size()
        bytes_loss = 2 * numel * x0.element_size() + 4 * B
        _, eps = noise_fn(x0, t)

        methods: list[tuple[str, Callable, Callable, Callable | None, Callable | None]] = []
        methods.append(("eager", lambda: noise_fn(x0, t), lambda: loss_fn(out, eps), None, None))
        if compile_pass:
            cn, cl = compiled  # type: ignore[misc]
            methods.append(("torch.compile(eager)", lambda: cn(x0, t), lambda: cl(out, eps), None, None))
        for label, be in backends:
            mod = dispatch.resolve(be, dev)
            # By the module it resolves to: "auto" is the reference too where no compiled backend loads.
            if mod is reference and numel > REFERENCE_MAX_NUMEL[dev.type]:
                emit("noise_loss", {**base, "method": label,
                                    "skipped": f"reference backend above {REFERENCE_MAX_NUMEL[dev.type]} elements"})
                continue
            flat_x0, flat_out = x0.reshape(B, -1), out.reshape(B, -1)
            a, b = reference.noise_coefficients(acp, t)
            methods.append((
                label,
                lambda be=be: kernels.add_noise(x0, t, acp, SEED, sids, dids, backend=be),
                lambda be=be: kernels.diffusion_loss(out, x0, t, acp, SEED, sids, dids, backend=be),
                # the backend function alone: no argument checks, coefficients precomputed
                None if r.args.no_raw else (lambda m=mod, a=a, b=b: m.add_noise(flat_x0, a, b, SEED, sids, dids)),
                None if r.args.no_raw else (lambda m=mod, a=a, b=b: m.diffusion_loss(
                    flat_out, flat_x0, a, b, SEED, sids, dids, "epsilon", None)),
            ))
        fns: dict[str, Callable] = {}
        for label, fn_noise, fn_loss, raw_noise, raw_loss in methods:
            fns[f"{label}|noise"], fns[f"{label}|loss"] = fn_noise, fn_loss
            if raw_noise is not None:
                fns[f"{label}|raw_noise"], fns[f"{label}|raw_loss"] = raw_noise, raw_loss
        times = r.time_group(fns)
        eager_ms = None
        for label, *_ in methods:
            tn, tl = times[f"{label}|noise"], times[f"{label}|loss"]
            row = {**base, "method": label}
            if isinstance(tn, str) or isinstance(tl, str):
                row["skipped"] = tn if isinstance(tn, str) else tl
                if compile_pass:  # the first line of a compiler error is not informative
                    row["skipped"] = row["skipped"].split(":")[0] + ")"
            else:
                row.update(noise_ms=tn["median_s"] * 1e3, loss_ms=tl["median_s"] * 1e3,
                           total_ms=(tn["median_s"] + tl["median_s"]) * 1e3,
                           noise_timing=tn, loss_timing=tl,
                           noise_GBps=bytes_noise / tn["median_s"] / 1e9, loss_GBps=bytes_loss / tl["median_s"] / 1e9)
                rn, rl = times.get(f"{label}|raw_noise"), times.get(f"{label}|raw_loss")
                if isinstance(rn, dict) and isinstance(rl, dict):
                    row["noise_kernel_only_ms"] = rn["median_s"] * 1e3
                    row["loss_kernel_only_ms"] = rl["median_s"] * 1e3
                elif rn is not None:
                    row["kernel_only_error"] = rn if isinstance(rn, str) else rl
            if label == "eager":
                row["scheduler"] = sched_desc
                eager_ms = row.get("total_ms")
                if compile_pass:
                    continue  # timed again only as the same-pass baseline of the compiled rows
            elif compile_pass and eager_ms and "total_ms" in row:
                # compared with eager timed in the same rounds, not with the first pass
                row["eager_same_pass_ms"] = eager_ms
                row["speedup_vs_eager"] = eager_ms / row["total_ms"]
            emit("noise_loss", row)
        x0 = out = eps = methods = None  # free device memory (the lambdas hold these names) before empty_cache
        if dev.type == "cuda":
            torch.cuda.empty_cache()


# --------------------------------------------------------------------------- fisher

def cpu_peak_bytes(fn: Callable[[], Any]) -> tuple[int | None, str]:
    """Peak bytes allocated by torch on CPU during fn, from the profiler's memory timeline.

    Relies on a private profiler API; returns (None, why) where that is unavailable.
    """
    try:
        from torch.profiler import ProfilerActivity, profile
        from torch.profiler._memory_profiler import Action
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                     with_stack=True) as prof:
            fn()
        cur = peak = 0
        for _, action, _, size in prof._memory_profile().timeline:
            if action == Action.CREATE:
                cur += size
            elif action == Action.DESTROY:
                cur -= size
            peak = max(peak, cur)
        return peak, "profiler"
    except Exception as exc:  # noqa: BLE001
        return None, f"profiler unavailable ({type(exc).__name__})"


def cuda_peak_bytes(fn: Callable[[], Any]) -> tuple[int | None, str]:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before, "max_memory_allocated"


def bench_fisher(r: Runner, emit: Callable[[str, dict], None], rates: dict) -> None:
    dev = r.device
    fdtype = DTYPES[r.args.fisher_dtype]
    in_dtypes = r.args.fisher_input_dtypes or (("float32", "bfloat16") if dev.type == "cuda" else ("float32",))
    shapes = FISHER_SHAPES
    if r.args.quick:
        shapes = tuple(s for s in FISHER_SHAPES if s[5] == 64 and s[3] in (128, 320, 1280))
    backends = kernel_backends(dev)
    peak_fn = cuda_peak_bytes if dev.type == "cuda" else cpu_peak_bytes
    for model, layer, d_in, d_out, L, B in shapes:
        for dname in in_dtypes:
            dt = DTYPES[dname]
            base = {"model": model, "layer": layer, "d_in": d_in, "d_out": d_out, "L": L, "batch": B,
                    "input_dtype": dname, "fisher_dtype": r.args.fisher_dtype}
            if r.over_budget():
                emit("fisher", {**base, "method": "all", "skipped": "time budget exhausted"})
                continue
            g = torch.Generator().manual_seed(d_out * 7 + B)
            X = torch.randn(B, L, d_in, generator=g).to(dev, dt)
            G = torch.randn(B, L, d_out, generator=g).to(dev, dt)
            fisher = torch.zeros(d_out, d_in, dtype=fdtype, device=dev)
            flops = 2 * B * L * d_in * d_out
            analytic_naive = B * d_out * d_in * X.element_size()

            methods: list[tuple[str, Callable, Callable | None]] = [
                ("naive einsum", lambda: fisher.add_(torch.einsum("blo,bli->boi", G, X).square().sum(0)), None)]
            for label, be in backends:
                mod = dispatch.resolve(be, dev)
                raw = None if r.args.no_raw else (lambda m=mod: m.fisher_accumulate(fisher, X, G))
                methods.append((label, lambda be=be: kernels.fisher_accumulate(fisher, X, G, backend=be), raw))
            # The same flops as one GEMM (sum_b G_b^T X_b without the square): the matmul rate
            # this problem could reach on this device.
            G2, X2 = G.reshape(B * L, d_out), X.reshape(B * L, d_in)
            fns: dict[str, Callable] = {"gemm": lambda: torch.mm(G2.t(), X2)}
            for label, fn, raw in methods:
                fns[label] = fn
                if raw is not None:
                    fns[f"{label}|raw"] = raw
            times = r.time_group(fns)
            gemm = times["gemm"]
            gemm_tflops = flops / gemm["median_s"] / 1e12 if isinstance(gemm, dict) else None
            if gemm_tflops is None:  # e.g. bf16 mm unsupported on an old CPU
                emit("fisher", {**base, "method": "same-shape GEMM", "skipped": gemm})
            for label, fn, raw in methods:
                row = {**base, "method": label}
                tm = times[label]
                if isinstance(tm, str):
                    row["skipped"] = tm
                    emit("fisher", row)
                    continue
                row.update(ms=tm["median_s"] * 1e3, timing=tm, TFLOPs=flops / tm["median_s"] / 1e12)
                tr = times.get(f"{label}|raw")
                if isinstance(tr, dict):
                    row["kernel_only_ms"] = tr["median_s"] * 1e3
                elif tr is not None:
                    row["kernel_only_error"] = tr
                peak, how = peak_fn(fn)
                row["peak_extra_bytes"], row["peak_method"] = peak, how
                if label == "naive einsum":
                    row["analytic_extra_bytes"] = analytic_naive  # the per-sample gradients [B, d_out, d_in]
                if gemm_tflops:
                    row["same_shape_gemm_TFLOPs"] = gemm_tflops
                    row["pct_of_gemm"] = 100 * row["TFLOPs"] / gemm_tflops
                peak_rate = rates.get(f"matmul_{dname}_TFLOPs")
                if peak_rate:
                    row["pct_of_peak_matmul"] = 100 * row["TFLOPs"] / peak_rate
                emit("fisher", row)
            X = G = G2 = X2 = fisher = methods = None  # as above: free device memory
            if dev.type == "cuda":
                torch.cuda.empty_cache()


# --------------------------------------------------------------------------- device rates

def device_rates(r: Runner) -> dict[str, float]:
    """Copy bandwidth (GB/s, bytes read + written) and square-GEMM TFLOP/s on this device."""
    dev = r.device
    rates: dict[str, float] = {}
    n = (1 << 28 if dev.type == "cuda" else 1 << 26) // 4  # 256 MiB on CUDA, 64 MiB on CPU
    src = torch.randn(n, device=dev)
    dst = torch.empty_like(src)
    tm = r.time(lambda: dst.copy_(src))
    rates["copy_GBps"] = 2 * src.numel() * 4 / tm["median_s"] / 1e9
    src = dst = None
    size = 8192 if dev.type == "cuda" else 2048
    from forgetscore.attribution.losses import cpu_has_bf16

    emulated = dev.type == "cpu" and cpu_has_bf16() is False
    if emulated:  # each emulated 2048^3 product takes about a minute on such a CPU: minutes before any kernel
        rates["matmul_bfloat16_skipped"] = "this CPU has no bfloat16 instructions"  # type: ignore[assignment]
    for dname in ("float32",) if emulated else ("float32", "bfloat16"):
        dt = DTYPES[dname]
        try:
            a = torch.randn(size, size, device=dev).to(dt)
            b = torch.randn(size, size, device=dev).to(dt)
            tm = r.time(lambda: torch.mm(a, b))
            rates[f"matmul_{dname}_TFLOPs"] = 2 * size ** 3 / tm["median_s"] / 1e12
        except Exception as exc:  # noqa: BLE001
            rates[f"matmul_{dname}_error"] = f"{type(exc).__name__}: {exc}"  # type: ignore[assignment]
    rates["matmul_size"] = size
    if dev.type == "cuda":
        rates["tf32_matmul_allowed"] = bool(torch.backends.cuda.matmul.allow_tf32)
    return rates


# --------------------------------------------------------------------------- report

def fmt_ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if v < 1 else f"{v:.2f}" if v < 100 else f"{v:.0f}"


METHOD_ORDER = ("eager", "torch.compile", "naive", "kernels auto", "kernels")


def _method_rank(method: str) -> int:
    return next((i for i, m in enumerate(METHOD_ORDER) if method.startswith(m)), len(METHOD_ORDER))


def add_ratios(result: dict) -> None:
    """speedup_vs_eager / speedup_vs_naive on every timed row, and rows in a stable order."""
    latent_rank = {k: i for i, k in enumerate(LATENTS)}
    eager = {(r["latent"], r["batch"]): r["total_ms"] for r in result["noise_loss"]
             if r["method"] == "eager" and "total_ms" in r}
    for r in result["noise_loss"]:
        base = eager.get((r["latent"], r["batch"]))
        if base and "total_ms" in r and "eager_same_pass_ms" not in r:
            r["speedup_vs_eager"] = base / r["total_ms"]
    result["noise_loss"].sort(key=lambda r: (latent_rank.get(r["latent"], 99), r["batch"], _method_rank(r["method"])))
    naive = {(r["model"], r["d_out"], r["d_in"], r["batch"], r["input_dtype"]): r["ms"] for r in result["fisher"]
             if r["method"] == "naive einsum" and "ms" in r}
    for r in result["fisher"]:
        base = naive.get((r["model"], r["d_out"], r["d_in"], r["batch"], r["input_dtype"]))
        if base and "ms" in r:
            r["speedup_vs_naive"] = base / r["ms"]


def report(result: dict) -> str:
    meta, rates = result["meta"], result["rates"]
    cuda = meta["device"] == "cuda"
    lines = [f"forgetscore kernel benchmark — {meta['device_name']}, torch {meta['torch']}, "
             f"{meta['threads']} threads, {meta['date']}"]
    if rates:
        bits = [f"copy {rates['copy_GBps']:.0f} GB/s (read+write)"]
        for d in ("float32", "bfloat16"):
            if f"matmul_{d}_TFLOPs" in rates:
                bits.append(f"{d} matmul {rates[f'matmul_{d}_TFLOPs']:.2f} TFLOP/s ({rates['matmul_size']}^3)")
        lines.append("device rates: " + ", ".join(bits))
    lines.append(f"eager noising: {meta['scheduler']}")
    for s in meta["backends_not_timed"]:
        lines.append(f"not timed: {s}")
    lines.append("")
    if result["noise_loss"]:
        lines.append("Noising + loss (ms per call, median; x eager = eager total / this total)")
        hdr = ["latent", "batch", "method", "add_noise", "loss", "total", "x eager"]
        if not meta.get("no_raw"):
            hdr += ["kernel-only n+l"]
        hdr += ["noise GB/s", "loss GB/s"] + (["noise %copy", "loss %copy"] if cuda else []) + ["note"]
        rows = []
        for r in result["noise_loss"]:
            if "skipped" in r:
                rows.append([r["latent"], str(r["batch"]), r["method"]] + ["-"] * (len(hdr) - 4) + [r["skipped"]])
                continue
            row = [r["latent"], str(r["batch"]), r["method"], fmt_ms(r["noise_ms"]), fmt_ms(r["loss_ms"]),
                   fmt_ms(r["total_ms"]), f"{r['speedup_vs_eager']:.2f}x" if "speedup_vs_eager" in r else "-"]
            if not meta.get("no_raw"):
                ko = (r["noise_kernel_only_ms"] + r["loss_kernel_only_ms"]) if "noise_kernel_only_ms" in r else None
                row.append(fmt_ms(ko))
            row += [f"{r['noise_GBps']:.1f}", f"{r['loss_GBps']:.1f}"]
            if cuda:
                bw = rates.get("copy_GBps")
                row += ([f"{100 * r['noise_GBps'] / bw:.0f}%", f"{100 * r['loss_GBps'] / bw:.0f}%"] if bw
                        else ["-", "-"])
            row.append(f"x vs eager timed in the same pass ({fmt_ms(r['eager_same_pass_ms'])} ms)"
                       if "eager_same_pass_ms" in r else "")
            rows.append(row)
        lines.append(table(hdr, rows))
        lines.append("")
    if result["fisher"]:
        lines.append(f"Fisher accumulation (fisher {meta['fisher_dtype']}; ms per call, median; "
                     "x naive = naive time / this time; extra mem = peak bytes allocated during the call)")
        hdr = ["layer", "B", "method", "ms", "x naive"]
        if not meta.get("no_raw"):
            hdr += ["kernel-only"]
        hdr += ["TFLOP/s", "%GEMM", "extra mem", "naive analytic", "note"]
        rows = []
        for r in result["fisher"]:
            layer = f"{r['model']} {r['d_out']}x{r['d_in']} L{r['L']} {r['input_dtype']}"
            if "skipped" in r:
                rows.append([layer, str(r["batch"]), r["method"]] + ["-"] * (len(hdr) - 4) + [r["skipped"]])
                continue
            row = [layer, str(r["batch"]), r["method"], fmt_ms(r["ms"]),
                   f"{r['speedup_vs_naive']:.2f}x" if "speedup_vs_naive" in r else "-"]
            if not meta.get("no_raw"):
                row.append(fmt_ms(r.get("kernel_only_ms")))
            row += [f"{r['TFLOPs']:.3f}", f"{r['pct_of_gemm']:.0f}%" if "pct_of_gemm" in r else "-",
                    fmt_bytes(r.get("peak_extra_bytes")), fmt_bytes(r.get("analytic_extra_bytes")), ""]
            rows.append(row)
        lines.append(table(hdr, rows))
    if cuda:
        lines.append("")
        lines.append("Targets (CUDA): add_noise / loss >= 80% of copy bandwidth; fisher >= 50% of the matmul rate "
                     "(%GEMM: the same flops as one [d_out, B*L] x [B*L, d_in] GEMM in the input dtype).")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--quick", action="store_true",
                   help="batches <= 512, three fisher shapes, fewer repeats (a smoke run)")
    p.add_argument("--json", type=json_path, metavar="OUT",
                   help="write all measurements as JSON (rewritten after every row)")
    p.add_argument("--only", choices=("noise", "fisher"), help="run one of the two comparisons")
    p.add_argument("--batches", type=int_list,
                   help="comma-separated batch sizes for noising + loss (overrides the default)")
    p.add_argument("--fisher-dtype", choices=("float32", "float64"), default="float64",
                   help="accumulator dtype (float64, as forgetscore.attribution uses)")
    p.add_argument("--fisher-input-dtypes", type=choice_list(FISHER_INPUT_DTYPES),
                   help="comma-separated X/G dtypes, of " + ", ".join(FISHER_INPUT_DTYPES) + " (default float32; "
                   "float32,bfloat16 on CUDA)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile of the eager way")
    p.add_argument("--no-raw", action="store_true",
                   help="skip the kernel-only timings (backend function without argument checks)")
    p.add_argument("--threads", type=int_range(1, zero="torch's default"), default=0,
                   help="torch.set_num_threads(N) first (also the C++ kernels' thread count); 0: torch's default")
    p.add_argument("--budget-s", type=positive_float(zero="no limit"), default=0,
                   help="stop starting new shapes after this many seconds (0: no limit)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    dev = timing_device(args.device, args.threads)
    if dev is None:
        return 2
    r = Runner(args, dev)
    scheduler, sched_desc = make_scheduler()
    result = Results(args.json, {**run_meta(dev), "cpus": os.cpu_count(), "quick": args.quick,
                                 "no_raw": args.no_raw, "scheduler": sched_desc, "fisher_dtype": args.fisher_dtype,
                                 "seed": SEED, "backends_timed": [b for _, b in kernel_backends(dev)],
                                 "backends_not_timed": skipped_backends(dev)},
                     rates={}, noise_loss=[], fisher=[])

    def emit(section: str, row: dict) -> None:
        result[section].append(row)
        add_ratios(result)
        short = {k: v for k, v in row.items() if not isinstance(v, dict)}
        print(f"[{section}] " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in short.items()), flush=True)
        result.save()

    steps = [("rates", lambda: result["rates"].update(device_rates(r)))]
    if args.only != "fisher":
        steps.append(("noise_loss", lambda: bench_noise_loss(r, emit, scheduler, sched_desc)))
    if args.only != "noise":
        steps.append(("fisher", lambda: bench_fisher(r, emit, result["rates"])))
    if args.only != "fisher" and not args.no_compile:
        steps.append(("noise_loss compile", lambda: bench_noise_loss(r, emit, scheduler, sched_desc, compile_pass=True)))
    result.run_steps(steps)
    add_ratios(result)
    return result.finish(r.start, report)


if __name__ == "__main__":
    sys.exit(main())
