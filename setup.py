"""Builds ringkern and its native extension ``ringkern._C``.

The sources come from csrc/SOURCES, the list CMakeLists.txt reads too. CUDA sources are compiled when
torch is a CUDA build and nvcc is found (set RINGKERN_NO_CUDA=1 to skip them); the target archs come
from TORCH_CUDA_ARCH_LIST, by default sm_90a code for Hopper plus compute_90 PTX as a fallback.
Build against the installed torch: ``pip install --no-build-isolation .``
"""
import importlib.util
import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
DEFAULT_CUDA_ARCHS = "9.0a;9.0+PTX"


def native_sources() -> list[str]:
    lines = (ROOT / "csrc" / "SOURCES").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def cutlass_include() -> str | None:
    """CUTLASS headers: $CUTLASS_DIR/include, else the nvidia-cutlass wheel's copy."""
    if os.environ.get("CUTLASS_DIR"):
        return str(Path(os.environ["CUTLASS_DIR"]) / "include")
    spec = importlib.util.find_spec("cutlass_library")
    if spec and spec.submodule_search_locations:
        path = Path(spec.submodule_search_locations[0]) / "source" / "include"
        if (path / "cutlass" / "cutlass.h").exists():
            return str(path)
    return None


def pip_cuda_includes() -> list[str]:
    """Headers of the CUDA libraries torch's wheels ship (cuBLAS, cuSPARSE, ...), when the toolkit lacks them."""
    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
    return [str(p) for r in roots for p in sorted(Path(r).glob("cu*/include")) if (p / "cusparse.h").exists()]


def extension():
    # nvcc on PATH may be a wrapper outside the toolkit; prefer the toolkit itself for headers and libs.
    if "CUDA_HOME" not in os.environ and Path("/usr/local/cuda/bin/nvcc").exists():
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    import torch
    from torch.utils import cpp_extension

    sources = native_sources()
    want_cuda = (torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
                 and os.environ.get("RINGKERN_NO_CUDA", "0") != "1")
    include_dirs = [str(ROOT / "csrc")]
    # No -std here: torch's cpp_extension adds the standard its headers were built with (C++17 for torch
    # <= 2.12, C++20 after); mixing them changes c10's inline classes and crashes on a thrown c10::Error.
    cxx = ["-O3"]
    if not want_cuda:
        print(f"ringkern: CPU-only build (torch CUDA: {torch.version.cuda}, CUDA_HOME: {cpp_extension.CUDA_HOME})")
        return cpp_extension.CppExtension("ringkern._C", [s for s in sources if not s.endswith(".cu")],
                                          include_dirs=include_dirs, extra_compile_args={"cxx": cxx})
    archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    cutlass = cutlass_include()
    print(f"ringkern: CUDA build for {archs} with {cpp_extension.CUDA_HOME}; CUTLASS headers: {cutlass or 'not found'}")
    include_dirs += ([cutlass] if cutlass else []) + pip_cuda_includes()
    defines = ["-DRINGKERN_WITH_CUDA", f'-DRINGKERN_CUDA_ARCHS="{archs.replace(";", " ")}"']
    defines += ["-DRINGKERN_WITH_CUTLASS"] if cutlass else []
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", *defines]
    return cpp_extension.CUDAExtension("ringkern._C", sources, include_dirs=include_dirs,
                                       extra_compile_args={"cxx": cxx + defines, "nvcc": nvcc})


def build_ext_cls():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=True)


setup(ext_modules=[extension()], cmdclass={"build_ext": build_ext_cls()})
