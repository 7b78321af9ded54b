"""Compile every Triton kernel variant the backend launches for a GPU target, with no GPU.

Run in its own process (it patches torch and Triton globally):

    python tests/triton_aot.py [ARCH ...]      # default: 90 (Hopper); e.g. 80 for Ampere

The kernels are decorated for compilation (not the interpreter), the launch wrappers are
called with CPU tensors of the shapes and dtypes the dispatcher passes, and each launch is
turned into Triton's ahead-of-time path (warmup: compile, do not run) against a stand-in
driver that names the target. Prints one JSON line: every compiled variant and the stages
it reached (a cubin means ptxas accepted it), or the first error.
"""
from __future__ import annotations

import json
import os
import sys
import traceback

import torch

torch.cuda.is_available = lambda: True  # before forgetscore is imported: compile, do not interpret

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402


class _TargetOnly:
    """What the launch path asks the driver for, for a GPU that is not there."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


def variants():
    """(name, thunk) for every kernel specialization the backend can launch."""
    from forgetscore.kernels import triton_fisher, triton_loss, triton_noise

    def ids(n):
        return torch.arange(n, dtype=torch.int64)

    def coef(n):
        return torch.full((n,), 0.5, dtype=torch.float32)

    out = []
    for numel in (48, 4 * 16 * 16, 4 * 64 * 64):  # small, MSCOCO-latent and SD-latent rows: every BLOCK_Q
        out.append((f"bits n={numel}", lambda n=numel: triton_noise.bits(7, ids(3), ids(3), n)))
        out.append((f"normal n={numel}", lambda n=numel: triton_noise.normal(7, ids(3), ids(3), n)))
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            out.append((f"add_noise {dt} n={numel}", lambda n=numel, dt=dt: triton_noise.add_noise(
                torch.zeros(3, n, dtype=dt), coef(3), coef(3), 7, ids(3), ids(3))))
    pairs = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16),
             (torch.bfloat16, torch.float16)]
    for out_dt, x_dt in pairs:
        for kind in ("epsilon", "v_prediction", "sample"):
            for masked in (False, True):
                for chunked in (False, True):
                    d = 4 * 64 * 64

                    def call(out_dt=out_dt, x_dt=x_dt, kind=kind, masked=masked, chunked=chunked, d=d):
                        mask = torch.ones(1, d, dtype=torch.float32) if masked else None
                        triton_loss._diffusion_loss(torch.zeros(3, d, dtype=out_dt), torch.zeros(3, d, dtype=x_dt),
                                                    coef(3), coef(3), 7, ids(3), ids(3), kind, mask,
                                                    blocks_per_chunk=1 if chunked else None)
                    out.append((f"loss {out_dt}/{x_dt} {kind} mask={masked} chunked={chunked}", call))
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        for acc in (torch.float32, torch.float64):
            for L in (1, 77, 4096):  # every BLOCK_L
                for sliced in (False, True):
                    def call(dt=dt, acc=acc, L=L, sliced=sliced):
                        x, g = torch.zeros(4, L, 320, dtype=dt), torch.zeros(4, L, 768, dtype=dt)
                        triton_fisher._fisher_accumulate(torch.zeros(768, 320, dtype=acc), x, g,
                                                         samples_per_slice=1 if sliced else None)
                    out.append((f"fisher {dt} acc={acc} L={L} sliced={sliced}", call))
    return out


def main(archs: list[int]) -> dict:
    compiled: list[dict] = []
    run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        asm = getattr(kernel, "asm", {})
        # Fused multiply-adds in the PTX: libdevice's own, plus any the compiler contracted.
        compiled.append({"kernel": self.fn.__name__, "stages": sorted(asm),
                         "fma_f32": str(asm.get("ptx", "")).count("fma.rn.f32")})
        return kernel

    JITFunction.run = compile_only
    report = {"triton": triton.__version__, "torch": torch.__version__, "archs": archs, "variants": []}
    for arch in archs:
        driver.set_active(_TargetOnly(arch))
        for name, thunk in variants():
            before = len(compiled)
            try:
                thunk()
            except Exception as exc:  # noqa: BLE001 - reported, the caller decides
                report["error"] = {"arch": arch, "variant": name, "type": type(exc).__name__,
                                   "message": str(exc)[-2000:], "trace": traceback.format_exc()[-4000:]}
                return report
            report["variants"].append({"arch": arch, "variant": name, "launches": compiled[before:]})
    return report


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(json.dumps(main([int(a) for a in sys.argv[1:]] or [90])))
