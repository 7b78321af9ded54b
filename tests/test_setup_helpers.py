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
    def constant(node) -> bool:  # a module-level NAME = ... (upper case), as HERE
        return isinstance(node, ast.Assign) and all(
            isinstance(n, ast.Name) and n.id.isupper() for t in node.targets for n in ast.walk(t) if isinstance(n, ast.Name))

    defs = [node for node in tree.body
            if isinstance(node, (ast.FunctionDef, ast.Import, ast.ImportFrom)) or constant(node)]
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


@pytest.mark.parametrize("value, want", [("1", "1"), (" Yes ", "1"), ("on", "1"), ("TRUE", "1"), ("0", "0"),
                                         ("off", "0"), ("No", "0"), ("auto", "auto"), ("AUTO", "auto")])
def test_build_switches_read_their_documented_values(helpers, monkeypatch, value, want):
    monkeypatch.setenv("FORGETSCORE_BUILD_CUDA", value)
    assert helpers["_env_choice"]("FORGETSCORE_BUILD_CUDA", "auto", auto=True) == want
    monkeypatch.delenv("FORGETSCORE_BUILD_CUDA")
    assert helpers["_env_choice"]("FORGETSCORE_BUILD_CUDA", "auto", auto=True) == "auto"


@pytest.mark.parametrize("name, value, auto", [("FORGETSCORE_BUILD_CUDA", "2", True), ("FORGETSCORE_BUILD_CUDA", "", True),
                                               ("FORGETSCORE_STRICT_BUILD", "maybe", False),
                                               ("FORGETSCORE_BUILD_NATIVE", "auto", False)])
def test_build_switches_refuse_other_values_by_name(helpers, monkeypatch, name, value, auto):
    monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as stop:
        helpers["_env_choice"](name, "0", auto=auto)
    assert f"{name}={value!r} is not understood" in str(stop.value)
    assert ("auto, 1 or 0" if auto else "set it to 1 or 0") in str(stop.value)


def test_every_source_file_is_built_or_a_dependency_and_in_the_sdist(helpers):
    """A header missing from these lists is missing from the sdist too, which then cannot compile."""
    from forgetscore._sources import SUFFIXES

    root = SETUP.parent
    sources, cuda_sources, depends = helpers["_csrc_files"]()
    listed = {Path(p).as_posix() for p in sources + cuda_sources + depends}
    on_disk = {p.relative_to(root).as_posix() for p in (root / "csrc").rglob("*") if p.suffix in SUFFIXES}
    assert listed == on_disk
    manifest = (root / "MANIFEST.in").read_text()
    assert "recursive-include csrc " + " ".join(f"*{s}" for s in SUFFIXES) in manifest


def test_the_build_and_the_import_check_fingerprint_the_sources_alike(helpers, tmp_path):
    import torch  # noqa: F401 - the extension links against it

    from forgetscore._sources import fingerprint
    from forgetscore.kernels import native

    csrc = SETUP.parent / "csrc"
    assert helpers["_sources_fingerprint"]() == fingerprint(csrc)
    if native.cpu_available():  # built from these sources (CI builds strictly), so not reported out of date
        assert native.stale_sources(native._C) is None, native.STALE
    copy = tmp_path / "csrc"
    shutil.copytree(csrc, copy)
    module = types.SimpleNamespace(SOURCES="s" + fingerprint(copy), __file__="_C.so")
    assert native.stale_sources(module, copy) is None
    (copy / "cpu" / "noise.cpp").write_text((copy / "cpu" / "noise.cpp").read_text() + "\n// an edit\n")
    assert "was not built from the sources in" in native.stale_sources(module, copy)
    (copy / "cpu" / "noise.cpp").unlink()
    assert native.stale_sources(module, copy) is not None  # a file removed counts as a change too
    assert native.stale_sources(types.SimpleNamespace(), copy) is not None  # built before sources were fingerprinted
    assert native.stale_sources(module, tmp_path / "elsewhere") is None  # an installed copy: nothing to compare
