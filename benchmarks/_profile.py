"""Where a benchmarked call spends its time, from one call under torch.profiler.

Two views: the top ops (for a reader who wants the kernels by name) and a breakdown of the
device's time by kind of kernel, with how much of the call the device was busy at all. The
second tells a GPU run where a sweep's time could still be won (convolutions, attention,
normalisation, fused pointwise kernels, copies, our noise and loss kernels) and whether the
device waits on the host between kernels.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

# Our own kernels (Triton and CUDA), by the fragments of their names.
OURS = ("_noise_kernel", "_loss_kernel", "loss_partial", "loss_finalize", "normal_kernel", "bits_kernel",
        "_fisher_kernel", "fisher_reduce")
# Library kernels (cuDNN, cuBLAS, PyTorch's own) and CPU ops, by name fragments; the first kind that matches wins.
# Convolutions come before matmuls: cuDNN names its convolutions "..._fprop_implicit_gemm_...".
KINDS = (
    ("attention", ("flash", "fmha", "attention", "softmax")),
    ("convolution", ("conv", "fprop", "dgrad", "wgrad", "winograd")),
    ("matmul", ("gemm", "nvjet", "cutlass", "addmm", "aten::mm", "bmm", "matmul", "linear")),
    ("normalization", ("norm",)),
    # with the layout changes around cuDNN's channels-last kernels
    ("copies", ("memcpy", "memset", "copy", "cat", "index", "gather", "scatter", "nchwtonhwc", "nhwctonchw",
                "transpose")),
)


def kernel_kind(name: str) -> str:
    """The kind of work a kernel (or, on the CPU, an op) does, from its name."""
    n = name.lower()
    if any(f in n for f in OURS):
        return "ours: noise, loss"
    if n.startswith("triton_"):  # torch.compile's generated kernels, named after what they fuse
        if n.startswith("triton_tem"):
            return "matmul"  # max-autotune's matmul and convolution templates
        return "normalization" if "norm" in n else "fused pointwise"
    for kind, fragments in KINDS:
        if any(f in n for f in fragments):
            return kind
    return "pointwise and other"


def busy_seconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals: time the device ran anything, overlaps counted once."""
    total, end = 0.0, float("-inf")
    for lo, hi in sorted(intervals):
        if hi <= end:
            continue
        total += hi - max(lo, end)
        end = hi
    return total


def profile_kinds(run: Callable[[], Any], sync: Callable[[], None], dev: torch.device,
                  top: int = 15) -> dict:
    """One call of `run` under torch.profiler, summed by :func:`kernel_kind`.

    Returns ``kinds`` (seconds of device time per kind on CUDA; of self CPU time per op kind on the
    CPU), ``busy_s`` (CUDA: the union of all device activity; None on the CPU), ``wall_s`` (the
    profiled call, which the profiler slows on the host side) and ``top`` (the `top` kernels or ops
    by total time: name, kind, seconds, calls).
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = dev.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        run()
        sync()
        wall = time.perf_counter() - t0
    per_name: dict[str, list[float]] = {}
    intervals = []
    for e in prof.events():
        if cuda:
            if e.device_type != DeviceType.CUDA:
                continue
            seconds = (e.time_range.end - e.time_range.start) / 1e6
            intervals.append((e.time_range.start, e.time_range.end))
        else:
            seconds = e.self_cpu_time_total / 1e6
        entry = per_name.setdefault(e.name, [0.0, 0])
        entry[0] += seconds
        entry[1] += 1
    kinds: dict[str, float] = {}
    for name, (seconds, _) in per_name.items():
        kind = kernel_kind(name)
        kinds[kind] = kinds.get(kind, 0.0) + seconds
    ranked = sorted(per_name.items(), key=lambda item: -item[1][0])[:top]
    return {"kinds": dict(sorted(kinds.items(), key=lambda item: -item[1])),
            "busy_s": busy_seconds(intervals) / 1e6 if cuda else None, "wall_s": wall,
            "top": [[name[:100], kernel_kind(name), seconds, calls] for name, (seconds, calls) in ranked]}


def kinds_note(info: dict, median_s: float | None) -> str:
    """One line: how busy the device was over the unprofiled median call, and the largest kinds' shares."""
    total = sum(info["kinds"].values()) or 1.0
    shares = ", ".join(f"{kind} {seconds / total:.0%}" for kind, seconds in list(info["kinds"].items())[:5])
    if info["busy_s"] is None:
        return f"CPU self time: {shares}"
    busy = f"device busy {info['busy_s'] / median_s:.0%} of the median call" if median_s else \
        f"device busy {info['busy_s']:.3f} s"
    return f"{busy}; {shares}"


def kinds_table(info: dict) -> str:
    """The breakdown and the top kernels, as text for a log."""
    total = sum(info["kinds"].values()) or 1.0
    lines = [f"  {'kind':<22} {'seconds':>9} {'share':>6}"]
    lines += [f"  {kind:<22} {seconds:9.4f} {seconds / total:6.1%}" for kind, seconds in info["kinds"].items()]
    lines.append(f"  top {len(info['top'])} by time:")
    lines += [f"  {seconds:9.4f} s {calls:6d}x  [{kind}] {name}" for name, kind, seconds, calls in info["top"]]
    return "\n".join(lines)


def profile_table(run: Callable[[], Any], sync: Callable[[], None], dev: torch.device, rows: int = 25) -> str:
    """One more call of `run` under torch.profiler: the ops (and compute_fisher's phases, which it labels)
    that took the most time, on the device for CUDA, else on the CPU."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=activities) as prof:
        run()
        sync()
    key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    # The labels' totals say where the wall time goes; the ops by self time say which kernels.
    phases = prof.key_averages().table(sort_by="cpu_time_total", row_limit=rows)
    ops = prof.key_averages().table(sort_by=key, row_limit=rows)
    return f"by total CPU time (the phases' labels: wall time):\n{phases}\nby {key}:\n{ops}"
