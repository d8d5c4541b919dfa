"""The CPU kernels are compiled once per SIMD capability and the one that runs follows torch's
(``torch.backends.cpu.get_cpu_capability()``, set by ``ATEN_CPU_CAPABILITY``).

Each capability this machine supports runs tests/cpu_parity.py (every op against the float64
reference, each kernel layout) in a subprocess with ``ATEN_CPU_CAPABILITY`` set; with qemu-user
installed, the same script also runs on emulated CPUs without AVX-512 (Haswell: AVX2) and
without AVX (Westmere: DEFAULT), which is what a wheel built here meets on an older machine.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys

import pytest
import torch

from kdkernels import _extension

pytestmark = pytest.mark.skipif(not _extension.has_extension(), reason="kdkernels._C is not built")

CAPABILITIES = ["DEFAULT", "AVX2", "AVX512"]
PARITY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_parity.py")
REPO = os.path.dirname(os.path.dirname(PARITY))
X86 = platform.machine().lower() in ("x86_64", "amd64")


def _best_capability() -> str:
    """The best capability this CPU runs (torch's own choice without ATEN_CPU_CAPABILITY)."""
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    out = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
        capture_output=True, text=True, env=env, timeout=120, check=True,
    )
    return out.stdout.strip().splitlines()[-1]


def _run_parity(prefix: list[str], env_extra: dict[str, str], expect: str, timeout: float):
    env = {**os.environ, **env_extra, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    env.pop("KDKERNELS_BACKEND", None)
    result = subprocess.run(
        prefix + [sys.executable, PARITY, "--expect", expect], capture_output=True, text=True, env=env, timeout=timeout
    )
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    assert "checks ok" in result.stdout.splitlines()[-1], result.stdout[-3000:]


def test_compiled_capabilities_and_the_chosen_one():
    compiled = _extension.cpu_capabilities()
    assert compiled[0] == "DEFAULT", compiled
    assert compiled == [c for c in CAPABILITIES if c in compiled], compiled  # baseline first, in order
    if X86 and not os.environ.get("KDKERNELS_CPU_CAPABILITIES"):
        assert compiled == CAPABILITIES, compiled
    torch_cap = torch.backends.cpu.get_cpu_capability()
    expected = max((c for c in compiled if CAPABILITIES.index(c) <= CAPABILITIES.index(torch_cap)), key=CAPABILITIES.index) \
        if torch_cap in CAPABILITIES else "DEFAULT"
    assert _extension.cpu_capability() == expected, (torch_cap, compiled)


@pytest.mark.parametrize("capability", CAPABILITIES)
def test_kernels_match_the_reference_under_each_capability(capability):
    best = _best_capability()
    if best not in CAPABILITIES or CAPABILITIES.index(capability) > CAPABILITIES.index(best):
        pytest.skip(f"this CPU runs up to {best}")
    if capability not in _extension.cpu_capabilities():
        pytest.skip(f"the extension was built without {capability} (KDKERNELS_CPU_CAPABILITIES)")
    _run_parity([], {"ATEN_CPU_CAPABILITY": capability.lower()}, capability, timeout=300)


# qemu-user's CPU models: Haswell has AVX2 + FMA + F16C but no AVX-512; Westmere has no AVX at all.
EMULATED = [("Haswell", "AVX2"), ("Westmere", "DEFAULT")]


@pytest.mark.skipif(not X86, reason="qemu-x86_64 emulates x86-64 CPUs")
@pytest.mark.skipif(shutil.which("qemu-x86_64") is None, reason="qemu-user is not installed (apt-get install qemu-user)")
@pytest.mark.skipif(os.environ.get("KDKERNELS_SKIP_QEMU_TESTS") == "1", reason=".ci/run runs this on the installed wheel instead")
@pytest.mark.parametrize("cpu,expected", EMULATED, ids=[c for c, _ in EMULATED])
def test_kernels_run_on_an_emulated_older_cpu(cpu, expected):
    # A build on an AVX-512 machine used to die here with SIGILL ("Illegal instruction").
    _run_parity(["qemu-x86_64", "-cpu", cpu], {}, expected, timeout=900)
