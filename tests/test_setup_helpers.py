"""setup.py's choices for a CUDA build: where the toolkit is, and which GPU architectures.

Both matter on machines that build without a GPU or have `nvcc` as a wrapper script, and
neither can be reached through a real CUDA build on a CPU-only machine, so the helpers are
loaded from setup.py (its function definitions only, not the `setup()` call) and given
stand-ins for torch.
"""
from __future__ import annotations

import ast
import os
import shutil
import sys
import types
from pathlib import Path

import pytest

SETUP = Path(__file__).resolve().parents[1] / "setup.py"


@pytest.fixture(scope="module")
def helpers() -> dict:
    tree = ast.parse(SETUP.read_text())
    defs = [node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.Import, ast.ImportFrom))]
    namespace: dict = {"__file__": str(SETUP)}
    exec(compile(ast.Module(body=defs, type_ignores=[]), str(SETUP), "exec"), namespace)
    return namespace


def _fake_torch(devices: int, arch_flags: str | None):
    def flags():
        if arch_flags is None:
            raise AttributeError("no such helper in this torch")
        return arch_flags
    return types.SimpleNamespace(cuda=types.SimpleNamespace(device_count=lambda: devices),
                                 _C=types.SimpleNamespace(_cuda_getArchFlags=flags))


@pytest.mark.parametrize("devices, flags, want", [
    (0, "sm_75 sm_80 sm_90 sm_100 sm_120", "7.5;8.0;9.0;10.0;12.0+PTX"),
    (0, "sm_90", "9.0+PTX"),
    (0, None, "8.0;9.0+PTX"),              # the private helper is missing: a fixed list
    (0, "compute_90", "8.0;9.0+PTX"),      # nothing recognisable in it: the same
    (1, "sm_80 sm_90", None),              # a visible GPU: torch picks its architecture
])
def test_default_cuda_archs(helpers, monkeypatch, capsys, devices, flags, want):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    helpers["_default_cuda_archs"](_fake_torch(devices, flags))
    assert os.environ.get("TORCH_CUDA_ARCH_LIST") == want
    if want:
        assert "TORCH_CUDA_ARCH_LIST" in capsys.readouterr().err


def test_default_cuda_archs_keeps_the_users_choice(helpers, monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.6")
    helpers["_default_cuda_archs"](_fake_torch(0, "sm_90"))
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.6"


def _toolkit(root: Path) -> Path:
    (root / "include").mkdir(parents=True)
    (root / "include" / "cuda_runtime_api.h").write_text("")
    (root / "bin").mkdir()
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\n")
    nvcc.chmod(0o755)
    return nvcc


@pytest.mark.skipif(sys.platform == "win32", reason="symbolic links and PATH layout of POSIX")
def test_cuda_home_follows_a_linked_nvcc(helpers, tmp_path, monkeypatch):
    nvcc = _toolkit(tmp_path / "cuda-13.0")
    wrapper_bin = tmp_path / "local" / "bin"
    wrapper_bin.mkdir(parents=True)
    (wrapper_bin / "nvcc").symlink_to(nvcc)
    for name in ("CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PATH", str(wrapper_bin))
    assert shutil.which("nvcc") == str(wrapper_bin / "nvcc")
    ext = types.SimpleNamespace(CUDA_HOME=str(tmp_path / "local"))  # torch's guess: the folder above bin/
    got = helpers["_cuda_home"](ext)
    assert got == str(tmp_path / "cuda-13.0") == ext.CUDA_HOME == os.environ["CUDA_HOME"]


def test_cuda_home_is_left_alone_when_right_or_chosen(helpers, tmp_path, monkeypatch):
    _toolkit(tmp_path / "cuda")
    for name in ("CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(name, raising=False)
    ext = types.SimpleNamespace(CUDA_HOME=str(tmp_path / "cuda"))
    assert helpers["_cuda_home"](ext) == str(tmp_path / "cuda")
    assert "CUDA_HOME" not in os.environ
    # the user's CUDA_HOME is theirs, even without headers
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "elsewhere"))
    ext = types.SimpleNamespace(CUDA_HOME=str(tmp_path / "elsewhere"))
    assert helpers["_cuda_home"](ext) == str(tmp_path / "elsewhere")
