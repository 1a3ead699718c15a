"""Loads torchcnn's compiled operators into ``torch.ops.torchcnn``.

Two ways in:
- ahead of time: ``pip install --no-build-isolation -e .`` (or a wheel) built ``torchcnn._C``;
- just in time: in a source checkout where nothing was built, the extension is compiled once
  with ``torch.utils.cpp_extension.load`` (ninja) into torch's extensions cache
  (``$TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``) and reused from there.

``TORCHCNN_JIT=1`` skips a prebuilt ``torchcnn._C`` and always uses the just-in-time build.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

import torch

from . import _build

JIT_NAME = "torchcnn_C"


def _import_cpp_extension():
    """torch.utils.cpp_extension, without the warning it logs on import on a machine without a
    GPU ("No CUDA runtime is found"): compiling CUDA code needs no GPU."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        logger.setLevel(level)
    return cpp_extension


def _needs_compile(build_dir: str, sources: list[str], name: str = JIT_NAME) -> bool:
    library = os.path.join(build_dir, f"{name}.so")
    if not os.path.exists(library):
        return True
    headers = [os.path.join(root, f) for root, _, files in os.walk(_build.CSRC) for f in files]
    newest = max(os.path.getmtime(f) for f in sources + headers)
    return os.path.getmtime(library) < newest


def _load_jit() -> None:
    if not os.path.isdir(_build.CSRC):
        raise ImportError(
            "torchcnn: the compiled extension torchcnn._C is missing and there are no C++ sources to "
            "build it from; reinstall with `pip install --no-build-isolation .`"
        )
    cfg = _build.config()
    _build.prepare_environment(cfg)
    cpp_extension = _import_cpp_extension()
    build_dir = cpp_extension._get_build_directory(JIT_NAME, verbose=False)
    if _needs_compile(build_dir, cfg.sources):
        what = "C++/CUDA" if cfg.with_cuda else "C++ (CPU only: " + cfg.reason + ")"
        print(f"torchcnn: compiling the {what} extension once into {build_dir} ...",
              file=sys.stderr, flush=True)
    cpp_extension.load(
        name=JIT_NAME,
        sources=cfg.sources,
        extra_cflags=cfg.cxx_flags,
        extra_cuda_cflags=cfg.nvcc_flags,
        extra_ldflags=["-fopenmp"],
        extra_include_paths=[_build.CSRC] + cfg.include_dirs,
        with_cuda=cfg.with_cuda,
        is_python_module=False,
        verbose=os.environ.get("TORCHCNN_VERBOSE_BUILD") == "1",
    )


def load() -> str:
    """Make sure torch.ops.torchcnn holds the ops; returns how they were loaded."""
    if os.environ.get("TORCHCNN_JIT") != "1":
        try:
            importlib.import_module("torchcnn._C")
            return "prebuilt"
        except ImportError:
            pass
    _load_jit()
    return "jit"


LOADED_FROM = load()
WITH_CUDA = torch._C._dispatch_has_kernel_for_dispatch_key("torchcnn::conv2d", "CUDA")
