"""Loads torchcnn's compiled kernels, on first use.

The ops themselves are defined in Python (:mod:`torchcnn._ops.schemas`), so ``import torchcnn``,
tracing, fake tensors and ``--help`` need no compiler. The first call of an op on a real tensor
runs :func:`load`, which registers the kernels, one of two ways:

- ahead of time: ``pip install --no-build-isolation -e .`` (or a wheel) built ``torchcnn._C``;
- just in time: in a source checkout where nothing was built, the kernels are compiled once with
  ``torch.utils.cpp_extension.load`` (ninja) into torch's extensions cache
  (``$TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``) and reused from there. The
  CUDA kernels are included when there is a GPU to run them (or ``TORCHCNN_CUDA=1``), see
  :func:`torchcnn._build.config`.

``TORCHCNN_JIT=1`` skips a prebuilt ``torchcnn._C`` and always uses the just-in-time build.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import os
import sys
import threading
import time

import torch

from . import _build


@dataclasses.dataclass(frozen=True)
class Extension:
    """What :func:`load` loaded: ``origin`` is ``"prebuilt"`` (torchcnn._C) or ``"jit"``."""

    origin: str
    with_cuda: bool


_lock = threading.RLock()
_loaded: Extension | None = None
_on_load: list = []  # callbacks run once the kernels are registered


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


def needs_compile(build_dir: str, sources: list[str], name: str) -> bool:
    """Whether the library `name` in `build_dir` is missing or older than a source or header."""
    library = os.path.join(build_dir, f"{name}.so")
    if not os.path.exists(library):
        return True
    headers = [os.path.join(root, f) for root, _, files in os.walk(_build.CSRC) for f in files]
    newest = max(os.path.getmtime(f) for f in sources + headers)
    return os.path.getmtime(library) < newest


@contextlib.contextmanager
def reporting_progress(what: str, stream=None, every: float = 30.0):
    """Says that a build started, keeps saying it is still going (every second on a terminal, every
    `every` seconds otherwise) and how long it took."""
    stream = stream or sys.stderr
    tty = stream.isatty()
    print(f"torchcnn: compiling {what} ...", file=stream, flush=True)
    done = threading.Event()
    started = time.monotonic()

    def tick():
        while not done.wait(1.0 if tty else every):
            elapsed = time.monotonic() - started
            if tty:
                print(f"\rtorchcnn: compiling ... {elapsed:.0f} s", end="", file=stream, flush=True)
            else:
                print(f"torchcnn: still compiling ({elapsed:.0f} s)", file=stream, flush=True)

    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    outcome = {"message": None}  # the caller may say what happened instead
    try:
        yield outcome
    finally:
        done.set()
        ticker.join()
        if tty:
            print(file=stream)
    message = outcome["message"] or f"compiled in {time.monotonic() - started:.0f} s"
    print(f"torchcnn: {message}", file=stream, flush=True)


def _load_jit() -> bool:
    if not os.path.isdir(_build.CSRC):
        raise ImportError(
            "torchcnn: the compiled extension torchcnn._C is missing and there are no C++ sources to "
            "build it from; reinstall with `pip install --no-build-isolation .`"
        )
    cfg = _build.config(just_in_time=True)
    _build.prepare_environment(cfg)
    cpp_extension = _import_cpp_extension()
    name = "torchcnn_C_cuda" if cfg.with_cuda else "torchcnn_C_cpu"
    build_dir = cpp_extension._get_build_directory(name, verbose=False)
    what = ("the CPU and CUDA kernels" if cfg.with_cuda else f"the CPU kernels only ({cfg.reason})")
    library = os.path.join(build_dir, f"{name}.so")
    before = os.path.getmtime(library) if os.path.exists(library) else None
    progress = (reporting_progress(f"{what} once into {build_dir}")
                if needs_compile(build_dir, cfg.sources, name) else contextlib.nullcontext({}))
    with progress as outcome:
        cpp_extension.load(
            name=name,
            sources=cfg.sources,
            extra_cflags=cfg.cxx_flags,
            extra_cuda_cflags=cfg.nvcc_flags,
            extra_ldflags=["-fopenmp"],
            extra_include_paths=[_build.CSRC] + cfg.include_dirs,
            with_cuda=cfg.with_cuda,
            is_python_module=False,
            verbose=os.environ.get("TORCHCNN_VERBOSE_BUILD") == "1",
        )
        if before is not None and os.path.getmtime(library) == before:
            # A changed file that this build does not compile (csrc/cuda in a CPU build): ninja had
            # nothing to do. Mark the library current so that the next start does not say it again.
            os.utime(library)
            outcome["message"] = "nothing needed recompiling"
    return cfg.with_cuda


def load() -> Extension:
    """Register the compiled kernels of torch.ops.torchcnn (building them first if need be), once."""
    global _loaded
    with _lock:
        if _loaded is not None:
            return _loaded
        origin = None
        if os.environ.get("TORCHCNN_JIT") != "1":
            try:
                importlib.import_module("torchcnn._C")
                origin = "prebuilt"
            except ImportError:
                pass
        if origin is None:
            _load_jit()
            origin = "jit"
        with_cuda = torch._C._dispatch_has_kernel_for_dispatch_key("torchcnn::conv2d", "CUDA")
        _loaded = Extension(origin, with_cuda)
        for callback in _on_load:
            callback()
        return _loaded


def loaded() -> Extension | None:
    """What :func:`load` loaded, or None while nothing has needed the kernels yet."""
    return _loaded
