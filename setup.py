"""Build script for forgetscore and its optional native extension forgetscore._C.

torch is not a build requirement: install torch first, then

    pip install --no-build-isolation .

Environment (any other value is refused):
    FORGETSCORE_BUILD_CUDA   auto (default): CUDA kernels when torch has CUDA and
                             nvcc is found; 1: always (an error without both); 0: never.
    TORCH_CUDA_ARCH_LIST     the GPU architectures (e.g. "9.0"); by default those of the
                             visible GPUs, or with none visible those torch was built for.
    FORGETSCORE_BUILD_NATIVE 1 (default) builds the extension; 0 skips it (pure Python).
    FORGETSCORE_STRICT_BUILD 1 makes an extension build failure fatal (for CI);
                             0 (default): the install continues without it.
    (1/0 may also be spelt true/false, yes/no, on/off.)
"""
from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import sys
import traceback

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext as _setuptools_build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
VERSION = "0.1.0"


def _warn(message: str) -> None:
    bar = "=" * 78
    print(f"\n{bar}\nforgetscore: WARNING: {message}\n{bar}\n", file=sys.stderr, flush=True)


_ON, _OFF = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _env_choice(name: str, default: str, auto: bool = False) -> str:
    """'1', '0' (or 'auto' where allowed) from the environment variable `name`; any other value is an error."""
    given = os.environ.get(name, default)
    value = given.strip().lower()
    if value in _ON:
        return "1"
    if value in _OFF:
        return "0"
    if auto and value == "auto":
        return "auto"
    allowed = "auto, 1 or 0" if auto else "1 or 0"
    raise SystemExit(f"forgetscore: {name}={given!r} is not understood; set it to {allowed} (or unset it)")


def _sources_fingerprint() -> str:
    # The one implementation, shared with the import-time check; loaded by path (nothing is installed yet).
    spec = importlib.util.spec_from_file_location("_forgetscore_sources", os.path.join(HERE, "forgetscore", "_sources.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.fingerprint(os.path.join(HERE, "csrc"))


def _rel(pattern: str) -> list[str]:
    # setuptools wants source paths relative to setup.py.
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def _cuda_home(cpp_extension) -> str | None:
    """torch's CUDA_HOME, corrected when it holds no CUDA headers.

    Unless CUDA_HOME is set, torch takes the folder above the first `nvcc` on PATH, which is
    wrong where that nvcc is a wrapper script (e.g. /usr/local/bin/nvcc running the toolkit's):
    the build then fails on a missing cuda_runtime_api.h. Look where the real toolkit is.
    """
    home = cpp_extension.CUDA_HOME

    def has_headers(folder: str | None) -> bool:
        return bool(folder) and os.path.isfile(os.path.join(folder, "include", "cuda_runtime_api.h"))

    if has_headers(home) or os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return home
    nvcc = shutil.which("nvcc")
    for candidate in ((os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None),
                      "/usr/local/cuda"):
        if has_headers(candidate):
            found = f"torch's CUDA_HOME {home!r} holds no CUDA headers" if home else "torch found no CUDA_HOME"
            print(f"forgetscore: {found}; using {candidate!r} (set CUDA_HOME to choose)", file=sys.stderr)
            cpp_extension.CUDA_HOME = candidate  # read by torch's build helpers when they compile
            os.environ["CUDA_HOME"] = candidate
            return candidate
    return home


def _find_nvcc(cuda_home: str | None) -> str | None:
    if cuda_home:
        candidate = os.path.join(cuda_home, "bin", "nvcc")
        if os.path.exists(candidate):
            return candidate
    return shutil.which("nvcc")


def _default_cuda_archs(torch) -> None:
    """Sets TORCH_CUDA_ARCH_LIST when it is unset and no GPU is visible (a build machine).

    torch derives the target architectures from the visible GPUs, and with none it fails
    deep inside its build helpers (IndexError). Build for the architectures this torch was
    itself built for, the newest also as PTX so that newer GPUs can JIT it.
    """
    if os.environ.get("TORCH_CUDA_ARCH_LIST") or torch.cuda.device_count() > 0:
        return
    try:
        flags = torch._C._cuda_getArchFlags().split()  # e.g. "sm_80 sm_90"; no GPU needed
        archs = [f"{a[3:-1]}.{a[-1]}" for a in flags if a.startswith("sm_") and a[3:].isdigit()]
    except Exception:  # noqa: BLE001 - a private helper: fall back to a fixed list
        archs = []
    archs = archs or ["8.0", "9.0"]
    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(archs[:-1] + [archs[-1] + "+PTX"])
    print(f"forgetscore: no GPU visible and TORCH_CUDA_ARCH_LIST unset; building for "
          f"{os.environ['TORCH_CUDA_ARCH_LIST']} (set TORCH_CUDA_ARCH_LIST to choose)", file=sys.stderr)


def _openmp_flags() -> tuple[list[str], list[str]]:
    if sys.platform == "win32":
        return ["/openmp"], []
    if sys.platform == "darwin":
        # Apple clang has no -fopenmp; the kernels then run single-threaded.
        return [], []
    return ["-fopenmp"], ["-fopenmp"]


def _csrc_files() -> tuple[list[str], list[str], list[str]]:
    """(C++ sources, CUDA-only sources, headers and the rest a rebuild depends on) under csrc/."""
    sources = _rel("csrc/bindings.cpp") + _rel("csrc/cpu/*.cpp")
    cuda_sources = _rel("csrc/cuda/*.cu") + _rel("csrc/cuda/*.cpp")
    depends = _rel("csrc/*.h") + _rel("csrc/cpu/*.h") + _rel("csrc/cuda/*.cuh") + cuda_sources
    return sources, cuda_sources, depends


def _native_extensions():
    """(ext_modules, build_ext class) for forgetscore._C, or ([], None)."""
    mode = _env_choice("FORGETSCORE_BUILD_CUDA", "auto", auto=True)
    strict = _env_choice("FORGETSCORE_STRICT_BUILD", "0") == "1"
    if _env_choice("FORGETSCORE_BUILD_NATIVE", "1") == "0":
        print(f"forgetscore: FORGETSCORE_BUILD_NATIVE={os.environ['FORGETSCORE_BUILD_NATIVE']}, skipping the "
              "native extension", file=sys.stderr)
        return [], None
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as exc:  # noqa: BLE001 - any import failure means "no extension"
        _warn(f"torch is not importable ({exc!r}); installing without the native extension forgetscore._C. "
              "Install torch first and reinstall with `pip install --no-build-isolation .` to build it.")
        return [], None

    may_use_cuda = mode != "0" and torch.version.cuda is not None
    nvcc = _find_nvcc(_cuda_home(cpp_extension) if may_use_cuda else cpp_extension.CUDA_HOME)
    with_cuda = may_use_cuda and nvcc is not None
    if mode == "1" and not with_cuda:
        # Found now rather than minutes into a compilation that cannot succeed (and would cost the CPU kernels too).
        missing = (f"torch {torch.__version__} is a build without CUDA; install a CUDA build of torch"
                   if torch.version.cuda is None else "nvcc is not found; put it on PATH or set CUDA_HOME")
        raise SystemExit(f"forgetscore: FORGETSCORE_BUILD_CUDA=1 asks for the CUDA kernels, but {missing}, "
                         "or set FORGETSCORE_BUILD_CUDA=auto (CUDA when both are there) or 0")
    print(f"forgetscore: building forgetscore._C with{'' if with_cuda else 'out'} CUDA "
          f"(FORGETSCORE_BUILD_CUDA={mode}, torch CUDA {torch.version.cuda}, nvcc {nvcc})", file=sys.stderr)

    omp_compile, omp_link = _openmp_flags()
    # -fno-math-errno lets sqrt compile to one instruction, so the Box-Muller
    # loop vectorises; nothing in the kernels reads errno.
    cxx_flags = ["-O3", "-fno-math-errno"] + omp_compile if sys.platform != "win32" else ["/O2"] + omp_compile
    sources, cuda_sources, depends = _csrc_files()
    # Which sources the extension was built from, for the import-time check (forgetscore/_sources.py);
    # a bare token, which no shell or build file quoting can mangle, made a string in bindings.cpp.
    sources_macro = ("FORGETSCORE_SOURCES", "s" + _sources_fingerprint())
    if with_cuda:
        _default_cuda_archs(torch)
        sources += cuda_sources
        ext = cpp_extension.CUDAExtension(
            "forgetscore._C",
            sources,
            depends=depends,
            define_macros=[("FORGETSCORE_WITH_CUDA", "1"), sources_macro],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=omp_link,
        )
    else:
        ext = cpp_extension.CppExtension(
            "forgetscore._C",
            sources,
            depends=depends,
            define_macros=[sources_macro],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=omp_link,
        )

    base = cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)

    class TolerantBuildExt(base):
        """Installs without forgetscore._C when it cannot be compiled.

        The pure-PyTorch (and Triton) backends work without it, so a missing
        compiler should cost speed, not the installation.
        """

        def run(self):
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001
                self._give_up(exc)

        def build_extension(self, ext_):
            try:
                super().build_extension(ext_)
            except Exception as exc:  # noqa: BLE001
                self._give_up(exc)

        def _give_up(self, exc: BaseException) -> None:
            if strict:
                _warn(f"could not build the native extension forgetscore._C ({exc}); FORGETSCORE_STRICT_BUILD=1 "
                      "makes this an error (the compiler's messages are above)")
                raise exc
            traceback.print_exc()
            # An extension left from an earlier build (in build/ or, for an editable install, beside the
            # sources) would otherwise be installed or loaded as if it were this build's.
            for built in self._outputs():
                if os.path.exists(built):
                    os.remove(built)
            _warn(f"could not build the native extension forgetscore._C ({exc}). forgetscore is installed "
                  "without it; the native cpu/cuda backends are unavailable (the torch backend still works). "
                  "Set FORGETSCORE_STRICT_BUILD=1 to make this an error.")

        def _outputs(self) -> set[str]:
            places = set()
            for ext_ in self.extensions:
                name = self.get_ext_filename(self.get_ext_fullname(ext_.name))
                places.add(os.path.join(self.build_lib, name))
                places.add(os.path.join(HERE, name))
            return places

    return [ext], TolerantBuildExt


def _readme() -> str:
    path = os.path.join(HERE, "README.md")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    return ""


ext_modules, build_ext_cls = _native_extensions()
cmdclass = {"build_ext": build_ext_cls} if build_ext_cls is not None else {"build_ext": _setuptools_build_ext}

setup(
    name="forgetscore",
    version=VERSION,
    description="Data attribution for text-to-image diffusion models by unlearning, with fused kernels",
    long_description=_readme(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["forgetscore", "forgetscore.*"]),
    include_package_data=True,
    package_data={"forgetscore": ["**/*.md", "py.typed"]},
    install_requires=[
        "numpy",
        "safetensors",
        "diffusers",
        "transformers",
        "scikit-learn",
        "pillow",
        "tqdm",
        "matplotlib",  # the evaluation's plots
    ],
    extras_require={"triton": ["triton"], "test": ["pytest", "pytest-benchmark"]},
    entry_points={"console_scripts": ["forgetscore = forgetscore.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
