"""torchcnn's build backend: setuptools', building against the torch the user has.

A compiled extension loads only into the torch it was compiled against. Under pip's build isolation
(``pip install .``, ``python -m build``) the build runs in a fresh environment, where a
``requires = ["torch"]`` would download a torch of its own — the newest, several gigabytes for a
CUDA build — and compile against that, not the torch the package is installed beside. So torch is
not in ``[build-system] requires``: this backend finds the torch of the environment being installed
into (the interpreter's own site-packages, which isolation hides from ``sys.path``) and lets the
build import it from there. Only where that environment has no torch does it ask pip for one.
Everything else is setuptools.build_meta's.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import site
import sys
import sysconfig

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403  (every hook this module does not wrap)

# The oldest torch CI builds and tests against (pyproject.toml's dependency says the same).
TORCH_FLOOR = "torch>=2.13"


def _environment_site_packages() -> list[str]:
    """The site-packages folders of the environment being installed into. pip isolates a build
    within the same interpreter, whose own folders these are; ``python -m build`` runs it in a
    separate virtual environment, which leaves the activated environment's folders
    (``$VIRTUAL_ENV``, ``$CONDA_PREFIX``) to go by."""
    paths = [sysconfig.get_paths()[key] for key in ("purelib", "platlib")]
    if site.ENABLE_USER_SITE:
        paths.append(site.getusersitepackages())
    for variable in ("VIRTUAL_ENV", "CONDA_PREFIX"):
        if os.environ.get(variable):
            paths += [sysconfig.get_paths(vars={"base": os.environ[variable], "platbase": os.environ[variable]})[key]
                      for key in ("purelib", "platlib")]
    return [p for i, p in enumerate(paths) if os.path.isdir(p) and p not in paths[:i]]


def _use_environment_torch() -> bool:
    """Make the environment's torch importable here (appended to sys.path: the build's own packages
    stay first); False where there is none."""
    if importlib.util.find_spec("torch") is not None:
        return True  # no isolation (--no-build-isolation), or torch in the build environment already
    for path in _environment_site_packages():
        if glob.glob(os.path.join(path, "torch-*.dist-info")) and os.path.isdir(os.path.join(path, "torch")):
            sys.path.append(path)
            importlib.invalidate_caches()
            return True
    return False


def _requires(hook, config_settings) -> list[str]:
    """setuptools' answer (it runs setup.py, which imports torch), or, with no torch anywhere,
    setuptools' own needs and a torch for pip to install."""
    if _use_environment_torch():
        return hook(config_settings)
    print(f"torchcnn: no torch found in the environment being installed into, so the build installs one "
          f"({TORCH_FLOOR}, the newest there is) and compiles against it: the result loads only under that "
          "torch. To build against yours, activate its environment or build without isolation "
          "(pip install --no-build-isolation ., python -m build --no-isolation)", file=sys.stderr)
    return ["wheel", TORCH_FLOOR]


def get_requires_for_build_wheel(config_settings=None):
    return _requires(_setuptools.get_requires_for_build_wheel, config_settings)


def get_requires_for_build_editable(config_settings=None):
    return _requires(_setuptools.get_requires_for_build_editable, config_settings)


def get_requires_for_build_sdist(config_settings=None):
    return _requires(_setuptools.get_requires_for_build_sdist, config_settings)


def _building(hook):
    def build(*args, **kwargs):
        _use_environment_torch()
        return hook(*args, **kwargs)

    build.__name__ = hook.__name__
    return build


build_wheel = _building(_setuptools.build_wheel)
build_editable = _building(_setuptools.build_editable)
build_sdist = _building(_setuptools.build_sdist)
prepare_metadata_for_build_wheel = _building(_setuptools.prepare_metadata_for_build_wheel)
prepare_metadata_for_build_editable = _building(_setuptools.prepare_metadata_for_build_editable)
