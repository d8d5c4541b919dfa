"""Build kdkernels and its compiled extension ``kdkernels._C``.

CPU kernels are always built. CUDA kernels are built when the installed torch has CUDA and
nvcc is found, or when ``FORCE_CUDA=1``. ``KDKERNELS_NO_EXT=1`` skips the extension entirely
(the package then runs on Triton and the PyTorch reference).

Install after torch, without build isolation so the extension compiles against the torch you run:
    pip install --no-build-isolation -e .
"""

import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cpu_capability_flags():
    """Compiler flags that select at::vec's SIMD width for our CPU kernels.

    ATen compiles its own kernels once per ISA and picks one at run time; an extension gets the
    scalar fallback of at::vec unless it defines CPU_CAPABILITY_* itself. We build for the best ISA
    of the build machine (KDKERNELS_CPU_CAPABILITY=DEFAULT|AVX2|AVX512 overrides it, e.g. for a
    portable wheel).
    """
    wanted = os.environ.get("KDKERNELS_CPU_CAPABILITY")
    if wanted is None:
        try:
            with open("/proc/cpuinfo") as f:
                flags = f.read()
        except OSError:
            flags = ""
        if all(f in flags for f in ("avx512f", "avx512bw", "avx512vl", "avx512dq")):
            wanted = "AVX512"
        elif "avx2" in flags and "fma" in flags:
            wanted = "AVX2"
        else:
            wanted = "DEFAULT"
    if wanted == "AVX512":
        return ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"]
    if wanted == "AVX2":
        return ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"]
    return ["-DCPU_CAPABILITY=DEFAULT"]


def _extensions():
    if os.environ.get("KDKERNELS_NO_EXT", "0") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cxx_flags = ["-O3", "-std=c++17", "-fopenmp"] + _cpu_capability_flags()
    want_cuda = os.environ.get("FORCE_CUDA", "0") == "1" or (torch.cuda.is_available() and CUDA_HOME is not None)
    want_cuda = want_cuda and torch.version.cuda is not None and CUDA_HOME is not None
    define_macros = []
    if want_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")) + glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
        define_macros.append(("KDKERNELS_WITH_CUDA", None))
        ext = CUDAExtension(
            "kdkernels._C",
            sources,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math", "-lineinfo", "-std=c++17"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension("kdkernels._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="kdkernels",
    version="0.1.0",
    description="Fused knowledge-distillation losses (Triton, CUDA, CPU) with a thin distiller framework",
    long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists(os.path.join(ROOT, "README.md")) else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["kdkernels", "kdkernels.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.6", "numpy"],
    extras_require={
        "triton": ["triton>=3.0"],
        "test": ["pytest", "ninja"],
        "bench": ["matplotlib", "tqdm"],
        "examples": ["tqdm", "matplotlib", "scikit-learn"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
