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
import importlib.util
import logging
import os
import re
import struct
import sys
import threading
import time
import warnings

import torch

from . import _build


@dataclasses.dataclass(frozen=True)
class Extension:
    """What :func:`load` loaded: ``origin`` is ``"prebuilt"`` (torchcnn._C) or ``"jit"``;
    ``reason`` says why the CUDA kernels are missing, when they are."""

    origin: str
    with_cuda: bool
    reason: str = ""


_lock = threading.RLock()
_loaded: Extension | None = None
_failure: BaseException | None = None  # a load that failed fails again, rather than recompile every call
_on_load: list = []  # callbacks run with the Extension once the kernels are registered

# The op schemas that a library built by torchcnn 0.1.0 defines itself (now torchcnn/_ops/schemas.py
# does): such a torchcnn/_C*.so cannot be loaded beside them.
_OLD_LAYOUT_MARK = b"conv2d(Tensor input, Tensor weight"
# csrc/module.cpp's record of the torch a library was compiled against: torch.__version__ spelled
# in hex (torchcnn._build.torch_build_tag).
_BUILT_FOR = re.compile(rb"torchcnn built for torch (0x[0-9a-f]+)")


def _check_built_for(path: str, constants: bytes) -> None:
    """Refuse a library compiled against another torch, naming both, before the dynamic loader
    fails on it with an "undefined symbol"."""
    record = _BUILT_FOR.search(constants)
    if record is not None and record.group(1).decode() == _build.torch_build_tag():
        return
    remedy = ("Rebuild it against this torch (in the source: pip install --no-build-isolation --force-reinstall "
              "--no-deps .; or install the torchcnn wheel built for this torch), or compile the kernels on first "
              "use instead (TORCHCNN_JIT=1 in a source checkout)")
    if record is None:
        raise ImportError(f"torchcnn: {path} does not say which torch it was built for (an earlier torchcnn built "
                          f"it), and this is torch {torch.__version__}. {remedy}")
    built_for = _build.torch_version_of_tag(record.group(1).decode())
    raise ImportError(f"torchcnn: {path} was built for torch {built_for}, but this is torch {torch.__version__}: a "
                      f"compiled extension loads only into the torch it was compiled against. {remedy}")


def _string_constants(path: str) -> bytes:
    """Where a library's string constants are: the .rodata section of an ELF64 little-endian file
    (tens of kilobytes of a 50 MB CUDA build), or, for any other format or an ELF file whose
    section headers this cannot follow, the whole file."""
    with open(path, "rb") as f:
        try:
            rodata = _elf_section(f, b".rodata")
        except (struct.error, ValueError, OverflowError):
            rodata = None
        if rodata is not None:
            return rodata
        f.seek(0)
        return f.read()


def _elf_section(f, wanted: bytes) -> bytes | None:
    """Section ``wanted`` of the ELF64 little-endian file ``f``; None where it is not one, or has no
    such section, or numbers its sections in the extended way (more than 0xff00 of them)."""
    file_size = os.fstat(f.fileno()).st_size

    def read(offset, size):  # what a header points to, if it lies inside the file
        if offset + size > file_size:
            raise ValueError("a section outside the file")
        f.seek(offset)
        return f.read(size)

    header = read(0, 64) if file_size >= 64 else b""
    if header[:6] != b"\x7fELF\x02\x01":
        return None
    (table_offset,) = struct.unpack_from("<Q", header, 0x28)
    entry_size, count, names_index = struct.unpack_from("<HHH", header, 0x3A)
    if entry_size < 64 or count == 0 or not 0 < names_index < count:
        return None
    table = read(table_offset, entry_size * count)

    def section(i):  # (name's offset in the names section, offset in the file, size)
        name, _, _, _, offset, size = struct.unpack_from("<IIQQQQ", table, i * entry_size)
        return name, offset, size

    names = read(*section(names_index)[1:])
    for i in range(count):
        name, offset, size = section(i)
        end = names.find(b"\0", name)
        if end >= 0 and names[name:end] == wanted:
            return read(offset, size)
    return None


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


def _newest_in_csrc() -> float:
    """The modification time of the newest file under csrc/ (sources and headers)."""
    return max(os.path.getmtime(os.path.join(root, f)) for root, _, files in os.walk(_build.CSRC) for f in files)


def _needs_compile(library: str, sources: list[str]) -> bool:
    """Whether `library` is missing or older than a source (outside csrc/ too) or anything in csrc/."""
    if not os.path.exists(library):
        return True
    return os.path.getmtime(library) < max([_newest_in_csrc()] + [os.path.getmtime(s) for s in sources])


def build_directory(name: str) -> str:
    """Where the just-in-time library `name` is built, in torch's extensions cache."""
    return _import_cpp_extension()._get_build_directory(name, verbose=False)


def build_and_load(name: str, sources: list[str], what: str, **options) -> None:
    """Compile the library `name` from `sources` with torch.utils.cpp_extension.load (ninja, cached
    by name) if need be, reporting progress, and load it; `options` are load()'s build options."""
    cpp_extension = _import_cpp_extension()
    build_dir = build_directory(name)
    library = os.path.join(build_dir, f"{name}.so")
    before = os.path.getmtime(library) if os.path.exists(library) else None
    progress = (reporting_progress(f"{what} once into {build_dir}") if _needs_compile(library, sources)
                else contextlib.nullcontext({}))
    with progress as outcome:
        cpp_extension.load(name=name, sources=sources, is_python_module=False,
                           verbose=os.environ.get("TORCHCNN_VERBOSE_BUILD") == "1", **options)
        if before is not None and os.path.getmtime(library) == before:
            # A changed file that this library does not compile (csrc/cuda in a CPU build): ninja had
            # nothing to do. Mark the library current so that the next start does not say it again.
            os.utime(library)
            outcome["message"] = "nothing needed recompiling"


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


def _sanitize_requested() -> bool:
    """TORCHCNN_SANITIZE=1: the CPU kernels built (just in time, apart from the normal build) with
    AddressSanitizer and UndefinedBehaviorSanitizer — scripts/sanitize_cpu.sh sets up the process."""
    return os.environ.get("TORCHCNN_SANITIZE", "").strip().lower() in ("1", "true", "yes", "on")


def _load_jit() -> str:
    """Build (if need be) and load the kernels; returns why the CUDA kernels are left out, if they are."""
    if not os.path.isdir(_build.CSRC):
        raise ImportError(
            "torchcnn: the compiled extension torchcnn._C is missing and there are no C++ sources to "
            "build it from; reinstall with `pip install --no-build-isolation .`"
        )
    if _sanitize_requested():
        cfg = _build.BuildConfig(_build.sources(False), False, reason="TORCHCNN_SANITIZE=1 builds the CPU kernels only")
        name, what = "torchcnn_C_cpu_sanitized", "the CPU kernels with ASan and UBSan"
        cfg.cxx_flags += _build.SANITIZER_FLAGS
        ldflags = _build.openmp_flags() + ["-fsanitize=address,undefined"]
    else:
        cfg = _build.config(just_in_time=True)
        name = "torchcnn_C_cuda" if cfg.with_cuda else "torchcnn_C_cpu"
        what = "the CPU and CUDA kernels" if cfg.with_cuda else f"the CPU kernels only ({cfg.reason})"
        ldflags = _build.openmp_flags()
    _build.prepare_environment(cfg)
    build_and_load(
        name,
        cfg.sources,
        what,
        extra_cflags=cfg.cxx_flags,
        extra_cuda_cflags=cfg.nvcc_flags,
        extra_ldflags=ldflags,
        extra_include_paths=[_build.CSRC] + cfg.include_dirs,
        with_cuda=cfg.with_cuda,
    )
    return "" if cfg.with_cuda else cfg.reason


def _prebuilt() -> str | None:
    """The path of an ahead-of-time build torchcnn._C, after checking it belongs to these sources."""
    spec = importlib.util.find_spec("torchcnn._C")
    if spec is None or not spec.origin:
        return None
    constants = _string_constants(spec.origin)
    if _OLD_LAYOUT_MARK in constants:
        raise ImportError(f"torchcnn: {spec.origin} was built by an older torchcnn and cannot be loaded with "
                          "this one: delete it, then rebuild (pip install --no-build-isolation -e .) or let "
                          "torchcnn compile its kernels on first use")
    _check_built_for(spec.origin, constants)
    if os.path.isdir(_build.CSRC):
        if os.path.getmtime(spec.origin) < _newest_in_csrc():
            warnings.warn(f"torchcnn: the prebuilt {spec.origin} is older than the sources in {_build.CSRC}; it runs "
                          "the kernels it was built from. Rebuild (pip install --no-build-isolation -e .), or set "
                          "TORCHCNN_JIT=1 to compile the sources on first use", stacklevel=3)
    return spec.origin


def load() -> Extension:
    """Register the compiled kernels of torch.ops.torchcnn (building them first if need be), once.

    The first op call does this by itself. Call it yourself to choose the moment: before timing,
    or before several threads make their first calls (registering kernels while other threads
    dispatch the same ops is not safe)."""
    global _loaded, _failure
    with _lock:
        if _loaded is not None:
            return _loaded
        if _failure is not None:
            raise _failure
        try:
            if os.environ.get("TORCHCNN_JIT") != "1" and not _sanitize_requested() and _prebuilt() is not None:
                importlib.import_module("torchcnn._C")
                origin = "prebuilt"
                reason = "the prebuilt torchcnn._C was compiled without them"
            else:
                reason = _load_jit()
                origin = "jit"
        except Exception as e:  # not KeyboardInterrupt: an interrupted build may be started again
            _failure = e
            raise
        with_cuda = torch._C._dispatch_has_kernel_for_dispatch_key("torchcnn::conv2d", "CUDA")
        _loaded = Extension(origin, with_cuda, "" if with_cuda else reason)
        for callback in _on_load:
            callback(_loaded)
        return _loaded


def loaded() -> Extension | None:
    """What :func:`load` loaded, or None while nothing has needed the kernels yet."""
    return _loaded
