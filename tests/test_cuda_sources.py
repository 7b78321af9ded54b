"""The CUDA kernels compile with plain nvcc.

The .cu files take raw pointers and include no torch headers precisely so that
this check runs on machines without a GPU or a CUDA build of torch.
"""
from __future__ import annotations

import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

CUDA_DIR = Path(__file__).resolve().parents[1] / "csrc" / "cuda"
SOURCES = sorted(CUDA_DIR.glob("*.cu"))
NVCC = shutil.which("nvcc")
# Hopper is the main target; if this nvcc cannot emit it, use its default arch.
ARCH = "-arch=sm_90"

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")


def _nvcc(source: Path, out_dir: str, arch: str | None) -> subprocess.CompletedProcess:
    cmd = [NVCC, "-c", "-std=c++17", str(source), "-o", str(Path(out_dir) / (source.stem + ".o"))]
    if arch:
        cmd.insert(1, arch)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def arch() -> str | None:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "probe.cu"
        src.write_text("__global__ void k(float* p) { p[threadIdx.x] = 1.0f; }\n")
        if _nvcc(src, tmp, ARCH).returncode == 0:
            return ARCH
    return None


def test_there_are_cuda_sources():
    assert SOURCES, f"no .cu files under {CUDA_DIR}"


def test_every_cu_file_compiles_standalone(arch):
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda s: (s, _nvcc(s, tmp, arch)), SOURCES))
    failures = [f"{s.name}:\n{r.stdout}{r.stderr}" for s, r in results if r.returncode != 0]
    assert not failures, "nvcc failed:\n" + "\n".join(failures)
