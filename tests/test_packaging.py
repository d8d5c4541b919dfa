"""The package as a user installs it: a complete sdist, the declared metadata, and
``backends.available`` listing only what can run here."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile

import pytest
import torch

import kdkernels

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _git_files(*paths: str) -> list[str]:
    if shutil.which("git") is None or not os.path.exists(os.path.join(REPO, ".git")):
        pytest.skip("not a git checkout")
    out = subprocess.run(["git", "-C", REPO, "ls-files", *paths], capture_output=True, text=True, check=True)
    return [line for line in out.stdout.splitlines() if line]


def test_sdist_ships_every_source_and_header(tmp_path):
    expected = _git_files("csrc", "kdkernels", "tests", "examples") + ["pyproject.toml", "setup.py", "README.md", "MANIFEST.in"]
    env = {**os.environ, "KDKERNELS_NO_EXT": "1"}  # the file list must come from MANIFEST.in alone
    try:  # pypa/build when installed (`import build` would find the checkout's build/ folder)
        importlib.metadata.version("build")
        cmd = [sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(tmp_path), REPO]
    except importlib.metadata.PackageNotFoundError:
        cmd = [sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (sdist,) = tmp_path.glob("kdkernels-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    missing = sorted(f for f in expected if f not in names)
    assert not missing, missing
    assert not [n for n in names if n.endswith((".so", ".o", ".pyc"))], "build products in the sdist"


def test_metadata_declares_python_torch_and_extras():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        meta = tomllib.load(f)
    project = meta["project"]
    assert project["requires-python"] == ">=3.10"
    assert any(d.replace(" ", "").startswith("torch>=") for d in project["dependencies"])
    assert {"test", "bench", "examples"} <= set(project["optional-dependencies"])
    assert "torch>=2.6" in meta["build-system"]["requires"]


def test_available_cuda_is_empty_without_a_cuda_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert kdkernels.backends.available("cuda") == []
    reason = kdkernels.backends.why_unavailable("triton", "cuda")
    assert reason is not None and "CUDA" in reason
    assert kdkernels.backends.available("cpu")[-1] in ("torch", "triton")  # CPU is unaffected


def test_available_cuda_lists_triton_when_a_device_is_there(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    names = kdkernels.backends.available("cuda")
    assert names[-1] == "torch"
    assert ("triton" in names) == kdkernels.backends._TRITON_INSTALLED


def test_extension_is_built_with_torchs_openmp():
    """``at::parallel_for`` is a header template: with torch's OpenMP backend its ``#pragma omp
    parallel`` is compiled into the extension, and built without ``-fopenmp`` the pragma was
    ignored and every CPU kernel ran on one thread (setup.py). The built objects then call
    libgomp's GOMP_parallel."""
    from kdkernels import _extension

    if not _extension.has_extension():
        pytest.skip(f"the extension is not built: {_extension.EXTENSION_ERROR}")
    if not (sys.platform.startswith("linux") and torch.backends.openmp.is_available()):
        pytest.skip("torch's parallel backend here is not OpenMP on Linux")
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("binutils' nm is not installed")
    symbols = subprocess.run([nm, "-D", "--undefined-only", _extension._C.__file__], capture_output=True, text=True, check=True).stdout
    assert "GOMP_parallel" in symbols, "kdkernels._C was built without -fopenmp: at::parallel_for runs serially"
