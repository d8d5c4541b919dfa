"""Every Triton kernel's source is one Inductor can copy.

Under ``torch.compile`` with the Triton backend on a GPU, Inductor writes each user kernel
(``wrap_triton``) into its generated module together with the ``@triton.jit`` functions and the
``constexpr`` globals the kernel names. A helper reached through a module attribute
(``walker.empty_softmax``) is not copied: the compiled kernel then fails with
``NameError: walker is not defined`` (seen on an H200, torch 2.11 / Triton 3.6, where eager runs
were fine). So inside ``@triton.jit`` code, the only module attributes are Triton's own
(``tl.…``), and every other global a kernel reads is a jit function or a ``tl.constexpr``.
This runs on any machine: it reads the sources.
"""

import ast
import importlib
import inspect
import pkgutil
import textwrap
import types

import pytest

triton = pytest.importorskip("triton")
from triton.runtime.jit import KernelInterface  # noqa: E402

import kdkernels.ops.triton as triton_ops  # noqa: E402


def jit_functions(module) -> dict:
    """``{name: kernel}``: the ``@triton.jit`` functions defined in ``module`` (not the shared
    helpers it imports)."""
    return {
        name: obj
        for name, obj in vars(module).items()
        if isinstance(obj, KernelInterface) and obj.fn.__module__ == module.__name__
    }


def _jit_functions():
    for info in pkgutil.iter_modules(triton_ops.__path__):
        module = importlib.import_module(f"{triton_ops.__name__}.{info.name}")
        for name, obj in jit_functions(module).items():
            yield pytest.param(obj.fn, id=f"{info.name}.{name}")


def _local_names(tree: ast.AST) -> set[str]:
    """Parameters and names assigned in the function (they shadow globals)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
    return names


@pytest.mark.parametrize("fn", list(_jit_functions()))
def test_kernel_reads_only_jit_functions_constexprs_and_triton(fn):
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    local = _local_names(tree)
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id not in local:
            value = fn.__globals__.get(node.value.id)
            if isinstance(value, types.ModuleType) and value.__name__.split(".")[0] != "triton":
                problems.append(f"{node.value.id}.{node.attr} (import {node.attr} by name)")
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id not in local:
            value = fn.__globals__.get(node.id)
            if value is None or isinstance(value, (KernelInterface, types.ModuleType, triton.language.constexpr)):
                continue
            problems.append(f"{node.id} (a {type(value).__name__}: make it a tl.constexpr or a jit function)")
    assert not problems, problems
