"""k-diffusion's ``sampling`` and ``external`` modules, the sampler code AUTOMATIC1111 runs.

k-diffusion 0.1.1.post1 is installed without its dependencies (``pip install --no-deps``): its
package ``__init__`` imports training code that needs torchvision, kornia and more. The two modules
the references need import only ``utils.append_dims`` from it, so they are loaded from the installed
files under a package of their own whose ``utils`` holds k-diffusion's own ``append_dims``.
"""

import ast
import importlib.util
import sys
import types
from pathlib import Path

import pytest


def _package_dir() -> Path:
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None:
        # A missing test dependency fails the run: skipping would pass the sampler tests untested.
        pytest.fail("k-diffusion is not installed (pip install --no-deps k-diffusion==0.1.1.post1)", pytrace=False)
    return Path(spec.submodule_search_locations[0])


def _load():
    name = "_k_diffusion_ref"
    if name in sys.modules:
        return sys.modules[name]
    folder = _package_dir()
    package = types.ModuleType(name)
    package.__path__ = []
    utils = types.ModuleType(f"{name}.utils")
    # k-diffusion's append_dims, taken from its utils.py source (the rest of that file needs torchvision).
    tree = ast.parse((folder / "utils.py").read_text())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "append_dims")
    exec(compile(ast.Module(body=[node], type_ignores=[]), str(folder / "utils.py"), "exec"), utils.__dict__)
    package.utils = utils
    sys.modules[name], sys.modules[utils.__name__] = package, utils
    for module in ("sampling", "external"):
        spec = importlib.util.spec_from_file_location(f"{name}.{module}", folder / f"{module}.py")
        loaded = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = loaded
        spec.loader.exec_module(loaded)
        setattr(package, module, loaded)
    return package


k_diffusion = _load()
sampling = k_diffusion.sampling
external = k_diffusion.external
