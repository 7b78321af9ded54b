"""`forgetscore info`: versions, backends, and a quick self-test of each backend."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
import time
from collections.abc import Callable

import torch

from . import __version__, kernels
from .cache import cache_root
from .kernels import reference

KERNELS = ("normal", "add_noise", "diffusion_loss", "fisher_accumulate")


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _checks(device: torch.device) -> dict[str, Callable[[str], bool]]:
    """One small check per kernel: the backend against the reference on fresh random inputs."""
    gen = torch.Generator().manual_seed(int(time.time_ns() % 2**31))
    batch, shape = 3, (2, 5, 7)
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    sids = torch.randint(0, 2**40, (batch,), generator=gen).to(device)
    dids = torch.randint(0, 2**31, (batch,), generator=gen).to(device)
    acp = torch.linspace(0.999, 0.01, 1000, dtype=torch.float64).to(device)
    ts = torch.randint(0, 1000, (batch,), generator=gen).to(device)
    x0 = torch.randn(batch, *shape, generator=gen).to(device)
    out = torch.randn(batch, *shape, generator=gen).to(device)
    x = torch.randn(batch, 9, 33, generator=gen).to(device)
    g = torch.randn(batch, 9, 17, generator=gen).to(device)

    def normal(backend: str) -> bool:
        bits_ok = torch.equal(kernels.random_bits(seed, sids, dids, 50, backend=backend),
                              kernels.random_bits(seed, sids, dids, 50, backend="torch"))
        return bits_ok and torch.allclose(kernels.normal(seed, sids, dids, shape, backend=backend),
                                          kernels.normal(seed, sids, dids, shape, backend="torch"),
                                          atol=1e-6, rtol=1e-6)

    def add_noise(backend: str) -> bool:
        return torch.allclose(kernels.add_noise(x0, ts, acp, seed, sids, dids, backend=backend),
                              kernels.add_noise(x0, ts, acp, seed, sids, dids, backend="torch"), atol=1e-5)

    def diffusion_loss(backend: str) -> bool:
        ok = True
        for kind in reference.PREDICTION_TYPES:
            a = kernels.diffusion_loss(out, x0, ts, acp, seed, sids, dids, prediction_type=kind, backend=backend)
            b = kernels.diffusion_loss(out, x0, ts, acp, seed, sids, dids, prediction_type=kind, backend="torch")
            ok &= torch.allclose(a, b, rtol=1e-5, atol=1e-6)
        return ok

    def fisher_accumulate(backend: str) -> bool:
        f = kernels.fisher_accumulate(torch.zeros(17, 33, dtype=torch.float64, device=device), x, g, backend=backend)
        r = kernels.fisher_accumulate(torch.zeros(17, 33, dtype=torch.float64, device=device), x, g, backend="torch")
        return torch.allclose(f, r, rtol=1e-4, atol=1e-8)

    return {"normal": normal, "add_noise": add_noise, "diffusion_loss": diffusion_loss,
            "fisher_accumulate": fisher_accumulate}


def self_test() -> dict[str, dict[str, str]]:
    """{backend: {kernel: 'pass' | 'FAIL' | 'error: ...'}} for every backend that can run here."""
    results: dict[str, dict[str, str]] = {}
    for s in kernels.status():
        if not s.available:
            continue
        device = torch.device("cuda" if "cuda" in s.devices and torch.cuda.is_available() else s.devices[0])
        row = {}
        for name, check in _checks(device).items():
            try:
                row[name] = "pass" if check(s.name) else "FAIL"
            except Exception as exc:  # report, never crash the report
                row[name] = f"error: {type(exc).__name__}: {exc}"
        results[s.name] = row
    return results


def _cpu_line() -> str:
    """The CPU's vector capability as torch sees it, and whether bf16 runs natively (a sweep precision)."""
    from .attribution.losses import cpu_has_bf16

    native = cpu_has_bf16()
    bf16 = {True: "yes", False: "no: bf16 and mixed precisions are emulated here, slower than fp32",
            None: "unknown"}[native]
    return f"{torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores; bfloat16 instructions: {bf16}"


def report(run_self_test: bool = True) -> tuple[str, bool]:
    """The text `forgetscore info` prints, and whether every self-test passed."""
    lines = [f"forgetscore {__version__} ({os.path.dirname(os.path.abspath(__file__))})",
             f"python {platform.python_version()} ({sys.platform}, {platform.machine()})"]
    for pkg in ("torch", "triton", "diffusers", "transformers", "safetensors", "numpy"):
        lines.append(f"{pkg:<13} {_version(pkg)}")
    lines.append(f"cuda devices  {torch.cuda.device_count() if torch.cuda.is_available() else 0}")
    lines.append(f"cpu           {_cpu_line()}")
    lines.append(f"cache         {cache_root()} (set $FORGETSCORE_CACHE to move it; `forgetscore cache` lists it)")
    lines.append("")
    lines.append("backends:")
    for s in kernels.status():
        mark = "yes" if s.available else "no "
        lines.append(f"  {s.name:<7} {mark}  [{'/'.join(s.devices)}] {s.detail}")
    ok = True
    if run_self_test:
        lines.append("")
        lines.append("self-test against the PyTorch reference:")
        lines.append("  " + f"{'backend':<8}" + "".join(f"{k:<19}" for k in KERNELS))
        for backend, row in self_test().items():
            ok &= all(v == "pass" for v in row.values())
            lines.append("  " + f"{backend:<8}" + "".join(f"{row[k][:18]:<19}" for k in KERNELS))
            lines.extend(f"    {backend}.{k}: {v}" for k, v in row.items() if v.startswith("error"))
    return "\n".join(lines), ok
