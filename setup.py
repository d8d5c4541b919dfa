"""Build the compiled extension ``kdkernels._C`` (the package metadata lives in pyproject.toml).

    pip install --no-build-isolation -e .        # after torch; compiles against the torch you run

What gets compiled:

* CPU kernels (always): every ``csrc/cpu/*.cpp`` once per CPU capability -- DEFAULT (baseline
  x86-64, or any other architecture), AVX2 and AVX512 on x86-64 -- each with that ISA's flags
  and ``-DCPU_CAPABILITY=<NAME>``, as ATen builds its own kernels (the few files with no
  vector code of their own, ``BASELINE_ONLY_CPU_SOURCES``, only once). ``csrc/cpu_dispatch.cpp``
  (baseline flags) picks one copy at run time from ``torch.backends.cpu.get_cpu_capability()``,
  so a wheel built on an AVX-512 machine runs on any x86-64 CPU. See ``csrc/cpu/dispatch.h``.
* CUDA kernels (``csrc/cuda``): when the installed torch has CUDA and nvcc is found, or with
  ``FORCE_CUDA=1``.

Environment:

* ``KDKERNELS_NO_EXT=1``: no extension (the package then runs on Triton and the PyTorch reference).
* ``KDKERNELS_CPU_CAPABILITIES=DEFAULT,AVX2``: build only these capabilities (a faster dev build).
* ``MAX_JOBS=N``: parallel compile jobs (default: the number of CPUs).
* ccache (or sccache) is used when it is on PATH, as torch's BuildExtension does
  (``KDKERNELS_CCACHE=0`` turns that off), with ``CCACHE_BASEDIR`` set to ``csrc/`` so that a
  build of the unpacked sdist against the same torch reuses the checkout's cache.

The CPU objects are compiled by ``BuildCpuCapabilities`` below (ninja when installed, a thread
pool otherwise) because setuptools gives every source of an extension the same flags. With ninja
they compile in the background while torch's ``BuildExtension`` compiles the rest (so that on a
few cores no lone translation unit leaves a core idle at either end); the link waits for both and
takes everything, baseline objects first (so that where the linker keeps one copy of an inline
function shared by several capabilities' objects, it keeps the baseline one).
"""

from __future__ import annotations

import concurrent.futures
import glob
import os
import platform
import shlex
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))

# Compiler flags per capability, as ATen compiles its CPU_CAPABILITY kernels (cmake/Codegen.cmake).
CAPABILITY_FLAGS = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
}

# CPU sources with no at::vec code of their own (their work is ATen calls -- GEMMs, norms -- that
# pick their own CPU kernels at run time): compiled once, with baseline flags. Their stubs then
# hold only the DEFAULT copy, which the dispatcher picks on every CPU ("the best compiled one at or
# below the running capability", csrc/cpu/dispatch.h); three copies would only cost build time.
BASELINE_ONLY_CPU_SOURCES = {"pairwise_similarity.cpp", "rkd_angle.cpp"}


def cpu_capabilities() -> list[str]:
    """Capabilities to compile, baseline first (the link order relies on it)."""
    wanted = os.environ.get("KDKERNELS_CPU_CAPABILITIES")
    if platform.machine().lower() not in ("x86_64", "amd64") or sys.platform == "win32":
        # Other architectures (and MSVC, whose ISA flags differ): the portable build only.
        available = ["DEFAULT"]
    else:
        available = list(CAPABILITY_FLAGS)
    if not wanted:
        return available
    names = [w.strip().upper() for w in wanted.split(",") if w.strip()]
    unknown = [n for n in names if n not in CAPABILITY_FLAGS]
    if unknown:
        raise SystemExit(f"KDKERNELS_CPU_CAPABILITIES: unknown {unknown}; expected some of {list(CAPABILITY_FLAGS)}")
    if "DEFAULT" not in names:
        raise SystemExit("KDKERNELS_CPU_CAPABILITIES must include DEFAULT (the fallback every CPU runs)")
    return [n for n in available if n in names]


def compiler_command() -> list[str]:
    """The C++ compiler command for the CPU objects, behind ccache/sccache when one is installed.

    torch's BuildExtension (>= 2.10) puts ccache in front of $CXX by itself (unless
    TORCH_NO_COMPILER_WRAPPER is set), so a CXX="ccache g++" from the user is split here: the
    wrapper is ours to add, CXX keeps the compiler (otherwise torch would run `ccache 'ccache g++'`).
    """
    cxx = shlex.split(os.environ.get("CXX", "c++"))
    wrapper = None
    if len(cxx) > 1 and os.path.basename(cxx[0]) in ("ccache", "sccache"):
        wrapper, cxx = cxx[0], cxx[1:]
        os.environ["CXX"] = shlex.join(cxx)
    if os.environ.get("KDKERNELS_CCACHE", "1") == "0":
        os.environ["TORCH_NO_COMPILER_WRAPPER"] = "1"
        return cxx
    if os.environ.get("TORCH_NO_COMPILER_WRAPPER"):
        return cxx
    wrapper = wrapper or next((w for w in ("ccache", "sccache") if shutil.which(w)), None)
    if wrapper is None:
        return cxx
    # ccache hashes paths under CCACHE_BASEDIR relative to the working directory, others as they
    # are. Our sources (csrc/) are relative, torch's headers absolute: a build of the unpacked sdist
    # in another folder against the same torch hits the cache of the checkout's build.
    os.environ.setdefault("CCACHE_BASEDIR", os.path.join(ROOT, "csrc"))
    return [wrapper] + cxx


def _rel(path: str) -> str:
    return os.path.relpath(path, ROOT)


def _extensions():
    if os.environ.get("KDKERNELS_NO_EXT", "0") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cxx = compiler_command()
    # The C++ standard torch's headers are written for (torch's BuildExtension passes the same).
    cxx_std = "-std=c++20" if tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 10) else "-std=c++17"
    # at::parallel_for is a header template: with torch's OpenMP backend (AT_PARALLEL_OPENMP in
    # ATen/Config.h) its `#pragma omp parallel` is compiled into this extension, and without
    # -fopenmp the pragma is ignored and every CPU kernel runs on one thread. The OpenMP runtime is
    # the libgomp.so.1 torch already loaded (same soname).
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") and torch.backends.openmp.is_available() else []

    class BuildCpuCapabilities(BuildExtension):
        """torch's BuildExtension, plus the per-capability CPU objects (compiled alongside, linked first)."""

        def build_extension(self, ext):
            cpu_sources = getattr(ext, "kdkernels_cpu_sources", None)
            if not cpu_sources:
                return super().build_extension(ext)
            objects, wait_for_cpu_objects = self._start_cpu(ext, cpu_sources)
            ext.extra_objects = objects + list(ext.extra_objects or [])
            link = self.compiler.link_shared_object

            def link_after_cpu_objects(*args, **kwargs):
                wait_for_cpu_objects()
                return link(*args, **kwargs)

            self.compiler.link_shared_object = link_after_cpu_objects
            try:
                super().build_extension(ext)
            finally:
                self.compiler.link_shared_object = link
                wait_for_cpu_objects()  # also when the rest failed: no ninja left running

        def _cpu_jobs(self, ext, cpu_sources) -> list[tuple[str, str, list[str]]]:
            """(source, object, flags) of every CPU object, in link order."""
            include_dirs = [os.path.join(ROOT, "csrc")] + [os.path.abspath(d) for d in ext.include_dirs]
            import sysconfig

            include_dirs.append(sysconfig.get_paths()["include"])
            # Python's own CFLAGS as torch's build uses them (compiler_so[1:]) minus -g: with debug
            # info the .so was 20 MB for one capability; without it, 2.7 MB for all three.
            common = [f for f in self.compiler.compiler_so[1:] if f not in ("-g",)] + ["-Wno-psabi"]
            common += [f"-I{d}" for d in include_dirs]
            common += ["-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C", "-O3", cxx_std, "-fPIC"] + openmp
            out = os.path.abspath(os.path.join(self.build_temp, "kdkernels_cpu"))
            jobs = []
            dispatch = os.path.join(ROOT, "csrc", "cpu_dispatch.cpp")
            jobs.append((dispatch, os.path.join(out, "cpu_dispatch.o"), common))
            for cap in cpu_capabilities():
                flags = common + [f"-DCPU_CAPABILITY={cap}", f"-DCPU_CAPABILITY_{cap}"] + CAPABILITY_FLAGS[cap]
                for src in cpu_sources:
                    if cap != "DEFAULT" and os.path.basename(src) in BASELINE_ONLY_CPU_SOURCES:
                        continue
                    name = os.path.splitext(os.path.basename(src))[0]
                    jobs.append((src, os.path.join(out, cap.lower(), name + ".o"), flags))
            return jobs

        def _start_cpu(self, ext, cpu_sources):
            """Start compiling the CPU objects; returns (objects in link order, a function that
            waits for them and raises if one failed). ninja runs in the background; the thread
            pool fallback finishes before this returns."""
            jobs = self._cpu_jobs(ext, cpu_sources)
            workers = int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1)
            print(f"kdkernels: compiling {len(jobs)} CPU objects ({', '.join(cpu_capabilities())}) with {workers} jobs", flush=True)
            for _, obj, _ in jobs:
                os.makedirs(os.path.dirname(obj), exist_ok=True)
            ninja = shutil.which("ninja")
            if ninja is not None:
                path = os.path.join(os.path.dirname(jobs[0][1]), "build.ninja")
                lines = [
                    "ninja_required_version = 1.3",
                    f"builddir = {_ninja_escape(os.path.dirname(path))}",
                    f"cxx = {' '.join(shlex.quote(c) for c in cxx)}",
                    "rule compile",
                    "  command = $cxx -MMD -MF $out.d $flags -c $in -o $out",
                    "  depfile = $out.d",
                    "  deps = gcc",
                    "  description = CXX $out",
                ]
                for src, obj, flags in jobs:
                    lines.append(f"build {_ninja_escape(obj)}: compile {_ninja_escape(src)}")
                    lines.append(f"  flags = {' '.join(shlex.quote(f) for f in flags)}")
                with open(path, "w") as f:
                    f.write("\n".join(lines) + "\n")
                proc = subprocess.Popen([ninja, "-f", path, "-j", str(workers)], cwd=ROOT)

                def wait():
                    if proc.wait() != 0:
                        raise subprocess.CalledProcessError(proc.returncode, proc.args)

                return [obj for _, obj, _ in jobs], wait
            else:
                def compile_one(job):
                    src, obj, flags = job
                    cmd = cxx + flags + ["-c", src, "-o", obj]
                    print(" ".join(cmd[:2]) + f" ... -c {_rel(src)} -o {os.path.basename(obj)}", flush=True)
                    subprocess.run(cmd, check=True, cwd=ROOT)

                with concurrent.futures.ThreadPoolExecutor(workers) as pool:
                    list(pool.map(compile_one, jobs))
                return [obj for _, obj, _ in jobs], lambda: None

    cpu_sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    sources = [os.path.join("csrc", "kdkernels.cpp")]
    cxx_flags = ["-O3", cxx_std, "-g0"] + openmp
    want_cuda = os.environ.get("FORCE_CUDA", "0") == "1" or (torch.cuda.is_available() and CUDA_HOME is not None)
    want_cuda = want_cuda and torch.version.cuda is not None and CUDA_HOME is not None
    if want_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")) + glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
        ext = CUDAExtension(
            "kdkernels._C",
            sources,
            define_macros=[("KDKERNELS_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math", "-lineinfo", "-std=c++17"]},
            extra_link_args=openmp,
        )
    else:
        ext = CppExtension("kdkernels._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=openmp)
    ext.kdkernels_cpu_sources = cpu_sources
    return [ext], {"build_ext": BuildCpuCapabilities.with_options(use_ninja=True)}


def _ninja_escape(path: str) -> str:
    return path.replace("$", "$$").replace(" ", "$ ").replace(":", "$:")


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
