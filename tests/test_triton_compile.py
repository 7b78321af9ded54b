"""Every Triton kernel variant compiles for Hopper (sm_90), here, without a GPU.

The interpreter that runs the other Triton tests on the CPU accepts code that the compiler
would refuse; this compiles each specialization the backend launches down to a cubin
(tests/triton_aot.py), so a kernel that cannot build for the GPU fails here, not on a GPU.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")


def test_every_triton_kernel_variant_compiles_for_sm90(tmp_path):
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FORGETSCORE_TRITON_INTERPRET")}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # compile afresh, not from an earlier run
    script = Path(__file__).with_name("triton_aot.py")
    proc = subprocess.run([sys.executable, str(script), "90"], capture_output=True, text=True, env=env,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "error" not in report, f"{report['error']['variant']}: {report['error']['trace']}"
    kernels = {launch["kernel"] for v in report["variants"] for launch in v["launches"]}
    assert kernels == {"_noise_kernel", "_loss_kernel", "_fisher_kernel"}
    for v in report["variants"]:
        assert v["launches"], f"{v['variant']} launched no kernel"
        for launch in v["launches"]:
            assert "cubin" in launch["stages"], f"{v['variant']}: stopped at {launch['stages']}"
    assert len(report["variants"]) >= 90
    # No contracted multiply-adds in the noise and the loss: x_t = a * x0 + s * eps and the targets are
    # rounded after each operation, as in the reference and the CUDA kernels (an FMA rounds once).
    for v in report["variants"]:
        for launch in v["launches"]:
            if launch["kernel"] in ("_noise_kernel", "_loss_kernel"):
                assert launch["fma_f32"] == 0, f"{v['variant']}: {launch['fma_f32']} fma.rn.f32 in its PTX"
