"""torchcnn's build backend: setuptools', building against the torch the user has.

A compiled extension loads only into the torch it was compiled against. Under pip's build isolation
(``pip install .``, ``python -m build``) the build runs in a fresh environment, where a
``requires = ["torch"]`` would download a torch of its own — the newest, several gigabytes for a
CUDA build — and compile against that, not the torch the package is installed beside. So torch is
not in ``[build-system] requires``: this backend finds the torch of the environment being installed
into (the interpreter's own site-packages, which isolation hides from ``sys.path``, or the activated
environment's) and lets the build import it from there. Where it finds none it stops with an error
that says what to do, rather than build against a torch the user does not have. Everything else is
setuptools.build_meta's.
"""

from __future__ import annotations

import glob
import importlib.machinery
import importlib.util
import os
import site
import sys
import sysconfig

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403  (every hook this module does not wrap)

def _candidate_site_dirs() -> list[str]:
    """Where the environment being installed into may keep torch. pip isolates a build within the
    same interpreter, whose own folders these are (site-packages, Debian's dist-packages, the user's);
    ``python -m build`` runs it in a venv of its own, which leaves the activated environment
    (``$VIRTUAL_ENV``, ``$CONDA_PREFIX``) to go by. ``$TORCHCNN_TORCH_SITE`` names the folder outright."""
    if os.environ.get("TORCHCNN_TORCH_SITE"):
        return [os.environ["TORCHCNN_TORCH_SITE"]]
    paths = [sysconfig.get_paths()[key] for key in ("purelib", "platlib")] + site.getsitepackages()
    for variable in ("VIRTUAL_ENV", "CONDA_PREFIX"):
        if os.environ.get(variable):
            prefix = {"base": os.environ[variable], "platbase": os.environ[variable]}
            paths += [sysconfig.get_paths(vars=prefix)[key] for key in ("purelib", "platlib")]
    paths.append(site.getusersitepackages())
    return [p for i, p in enumerate(paths) if os.path.isdir(p) and p not in paths[:i]]


def _pth_folders(folder: str) -> list[str]:
    """The folders a site folder's .pth files add (a torch built from source, installed editable,
    lives there). Only their path lines: their import lines are not run here."""
    folders = []
    for pth in sorted(glob.glob(os.path.join(folder, "*.pth"))):
        with open(pth, encoding="utf-8", errors="replace") as f:
            for line in f:
                line = line.strip()
                if line and not line.startswith(("#", "import ", "import\t")):
                    path = os.path.join(folder, line)
                    if os.path.isdir(path):
                        folders.append(path)
    return folders


def _use_environment_torch() -> bool:
    """Make the environment's torch importable here (appended to sys.path: the build's own packages
    stay first); False where none is found."""
    if importlib.util.find_spec("torch") is not None:
        return True  # no isolation (--no-build-isolation), or torch in the build environment already
    for folder in _candidate_site_dirs():
        folders = [folder] + _pth_folders(folder)
        if importlib.machinery.PathFinder.find_spec("torch", folders) is not None:
            sys.path.extend(f for f in folders if f not in sys.path)
            importlib.invalidate_caches()
            return True
    return False


NO_TORCH = ("torchcnn: no torch found to build against. A compiled extension loads only into the torch it was "
            "compiled against, so torchcnn builds against the torch of the environment it is installed into, and "
            "does not download one of its own. Install torch there first (pip install torch), activate that "
            "environment (python -m build and uv look at $VIRTUAL_ENV / $CONDA_PREFIX), set TORCHCNN_TORCH_SITE "
            "to the folder that holds it, or build without isolation (pip install --no-build-isolation ., "
            "python -m build --no-isolation). Looked in: ")


def _require_environment_torch() -> None:
    """The environment's torch importable here, or an error that says what to do."""
    if not _use_environment_torch():
        raise RuntimeError(NO_TORCH + (", ".join(_candidate_site_dirs()) or "nowhere"))


def _requires(hook, config_settings) -> list[str]:
    """setuptools' answer (it runs setup.py, which imports torch) once the environment's torch is
    importable."""
    _require_environment_torch()
    return hook(config_settings)


def get_requires_for_build_wheel(config_settings=None):
    return _requires(_setuptools.get_requires_for_build_wheel, config_settings)


def get_requires_for_build_editable(config_settings=None):
    return _requires(_setuptools.get_requires_for_build_editable, config_settings)


def get_requires_for_build_sdist(config_settings=None):
    return _requires(_setuptools.get_requires_for_build_sdist, config_settings)


def _building(hook):
    def build(*args, **kwargs):
        _require_environment_torch()
        return hook(*args, **kwargs)

    build.__name__ = hook.__name__
    return build


build_wheel = _building(_setuptools.build_wheel)
build_editable = _building(_setuptools.build_editable)
build_sdist = _building(_setuptools.build_sdist)
prepare_metadata_for_build_wheel = _building(_setuptools.prepare_metadata_for_build_wheel)
prepare_metadata_for_build_editable = _building(_setuptools.prepare_metadata_for_build_editable)
