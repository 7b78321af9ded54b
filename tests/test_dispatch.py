"""Backend selection, graceful degradation, and the `forgetscore info` report."""
import os
import subprocess
import sys
import warnings

import pytest
import torch

from forgetscore import kernels
from forgetscore.kernels import dispatch, reference


def test_torch_backend_always_available():
    assert "torch" in kernels.available_backends()


def test_native_cpu_backend_was_built():
    # CI builds the C++ extension; a silent fallback to the reference would hide a broken build.
    if os.environ.get("FORGETSCORE_ALLOW_NO_NATIVE") == "1":
        pytest.skip("FORGETSCORE_ALLOW_NO_NATIVE=1")
    assert "cpu" in kernels.available_backends(), {s.name: s.detail for s in kernels.status()}


def test_auto_uses_native_cpu_when_built():
    if "cpu" not in kernels.available_backends():
        pytest.skip("native CPU kernels not built")
    assert dispatch.resolve("auto", torch.device("cpu")) is not reference


def test_auto_falls_back_with_one_warning(monkeypatch):
    fake = tuple(dispatch.BackendStatus(s.name, s.name == "torch", s.devices, s.detail) for s in kernels.status())
    monkeypatch.setattr(dispatch, "status", lambda: fake)
    monkeypatch.setattr(dispatch, "_warned", set())
    with pytest.warns(RuntimeWarning, match="slow PyTorch reference"):
        assert dispatch.resolve("auto", torch.device("cpu")) is reference
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch.resolve("auto", torch.device("cpu")) is reference
    with pytest.raises(ValueError, match="^backend: 'cpu' is not available"):
        dispatch.resolve("cpu", torch.device("cpu"))


def test_a_missing_extension_names_a_checkout_that_shadows_the_installed_copy(monkeypatch, tmp_path):
    from forgetscore.kernels import native

    package = tmp_path / "forgetscore"
    package.mkdir()
    monkeypatch.setattr(native, "PACKAGE", package)
    error = ImportError("cannot import name '_C'")
    assert native._why_missing(error) == "ImportError: cannot import name '_C'"  # no checkout: nothing to add
    (tmp_path / "setup.py").write_text("")
    assert f"imported from the source checkout {package}, which holds no built extension" in native._why_missing(error)
    (package / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    assert "checkout" not in native._why_missing(error)  # built there but broken: the error itself says why


def test_the_cuda_row_says_the_extension_did_not_load(monkeypatch):
    from forgetscore.kernels import native

    monkeypatch.setattr(native, "_C", None)
    monkeypatch.setattr(native, "NATIVE_IMPORT_ERROR", "ImportError: gone")
    dispatch.status.cache_clear()
    try:
        rows = {s.name: s for s in dispatch.status()}
    finally:
        dispatch.status.cache_clear()
    assert not rows["cpu"].available and "ImportError: gone" in rows["cpu"].detail
    assert rows["cuda"].detail == "forgetscore._C did not load (see the cpu backend)"


def test_backend_on_the_wrong_device_is_refused():
    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    with pytest.raises(ValueError, match="^backend"):
        dispatch.resolve("cuda", torch.device("cpu"))


def test_info_command_reports_every_backend_passing():
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "forgetscore", "info"], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "self-test against the PyTorch reference" in proc.stdout
    for name in kernels.available_backends():
        row = next(line for line in proc.stdout.splitlines() if line.strip().startswith(name + " ")
                   and "pass" in line)
        assert row.count("pass") == 4, proc.stdout


def test_an_interpreter_that_cannot_run_loops_is_reported(monkeypatch):
    jitmod = pytest.importorskip("forgetscore.kernels.triton_jit")
    if not jitmod.INTERPRETED:
        pytest.skip("compiled Triton: the interpreter probe does not apply")
    assert jitmod.interpreter_problem() is None  # the installed Triton runs our kernels

    class Broken:  # as Triton 3.6's interpreter does with NumPy 2.4
        def __getitem__(self, grid):
            def launch(*args):
                raise TypeError("only 0-dimensional arrays can be converted to Python scalars")
            return launch

    monkeypatch.setattr(jitmod, "_loop_probe", Broken())
    msg = jitmod.interpreter_problem()
    assert "TypeError: only 0-dimensional" in msg and "use Triton >= 3.7 for the interpreter, or a GPU" in msg
