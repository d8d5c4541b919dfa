"""Loads a script that is not part of the package (an example, a benchmark) as a module, so that a
test can call its functions."""

import importlib.util
import pathlib
import sys
from types import ModuleType


def load_script(path: pathlib.Path, module_name: str) -> ModuleType:
    """Executes the file at ``path`` as a module named ``module_name`` and returns it. As when
    ``python <path>`` runs it, the script's folder comes first on ``sys.path`` while it is executed
    (for its sibling modules, such as ``examples/_training.py``); the module is registered in
    ``sys.modules`` first (dataclasses look their module up there)."""
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    sys.path.insert(0, str(pathlib.Path(path).parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(pathlib.Path(path).parent))
    return module
