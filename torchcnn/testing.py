"""Testing aids: torchcnn's CUDA kernels, run on the CPU.

:func:`emulated_cuda_ops` compiles ``csrc/cuda/*.cu`` a second time, with the C++ compiler and
``csrc/cuda/emulation.h`` standing in for the CUDA language, into a library of its own (built once
on first use, cached like the main extension, never part of a normal ``import torchcnn``). Its ops
have the names and schemas of ``torch.ops.torchcnn`` and take CPU tensors; they live in
``torch.ops.torchcnn_emulated``, beside the real CPU kernels.

:func:`emulated_cuda` routes every ``torchcnn`` op called inside it — from ``torchcnn.functional``,
``torchcnn.nn``, autograd or ``torch.ops.torchcnn`` directly — to its emulated twin, so the whole
op suite runs on the CUDA code without a GPU::

    with torchcnn.testing.emulated_cuda() as calls:
        y = torchcnn.functional.conv2d(x, w)   # csrc/cuda/conv2d.cu's kernels, on the CPU
    assert calls["conv2d"] == 1

With ``TORCHCNN_EMULATION_SANITIZE=1`` the library is built with AddressSanitizer and
UndefinedBehaviorSanitizer (``scripts/sanitize_emulated.sh`` sets up the process for it).
"""

from __future__ import annotations

import collections
import contextlib
import os

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import _build, _extension
from ._ops import schemas

NAMESPACE = "torchcnn_emulated"

_loaded: dict[str, object] = {}


def _sanitize_requested() -> bool:
    return os.environ.get("TORCHCNN_EMULATION_SANITIZE", "").strip().lower() in ("1", "true", "yes", "on")


def _asan_is_loaded() -> bool:
    with open("/proc/self/maps") as maps:
        return any("libasan" in line for line in maps)


def emulated_cuda_ops(sanitize: bool | None = None):
    """``torch.ops.torchcnn_emulated``: csrc/cuda's kernels compiled for the CPU (built on first use).

    ``sanitize`` (default: ``$TORCHCNN_EMULATION_SANITIZE``) builds them with ASan and UBSan; that
    needs the ASan runtime loaded first (``LD_PRELOAD``). One process holds one of the two builds.
    """
    sanitize = _sanitize_requested() if sanitize is None else sanitize
    if "sanitize" in _loaded:
        if _loaded["sanitize"] != sanitize:
            raise RuntimeError(f"emulated_cuda_ops: this process already loaded the "
                               f"{'sanitized' if _loaded['sanitize'] else 'plain'} emulated library; "
                               "a process can hold only one of the two")
        return getattr(torch.ops, NAMESPACE)
    if sanitize and not _asan_is_loaded():
        raise RuntimeError(
            "emulated_cuda_ops(sanitize=True): the AddressSanitizer runtime must be loaded before Python "
            "starts; run under LD_PRELOAD=\"$(gcc -print-file-name=libasan.so)\" ASAN_OPTIONS=detect_leaks=0 "
            "(scripts/sanitize_emulated.sh does this)")
    if not os.path.isdir(_build.CSRC):
        raise RuntimeError("emulated_cuda_ops: needs a source checkout (csrc/ was not found)")

    name = "torchcnn_emulated_cuda" + ("_sanitized" if sanitize else "")
    sources = _build.emulated_sources(os.path.join(_extension.build_directory(name), "src"))
    # The compiler must not run with this process's preloaded sanitizer runtime.
    preload = os.environ.pop("LD_PRELOAD", None)
    if "definitions" not in _loaded:  # the ops' schemas: the library registers only kernels
        _loaded["definitions"] = schemas.define(NAMESPACE)
    try:
        _extension.build_and_load(
            name,
            sources,
            f"the emulated CUDA kernels (csrc/cuda as C++{', sanitized' if sanitize else ''})",
            extra_cflags=_build.EMULATION_FLAGS + (_build.SANITIZER_FLAGS if sanitize else []),
            extra_ldflags=_build.SANITIZER_FLAGS[:1] if sanitize else [],
            extra_include_paths=[_build.CSRC],
            with_cuda=False,
        )
    finally:
        if preload is not None:
            os.environ["LD_PRELOAD"] = preload
    _loaded["sanitize"] = sanitize
    return getattr(torch.ops, NAMESPACE)


class _ToEmulated(TorchDispatchMode):
    """Sends each torchcnn op to the op of the same name and overload in the emulated library."""

    def __init__(self, ops):
        super().__init__()
        self.ops = ops
        self.calls: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "torchcnn":
            name = func._opname
            self.calls[name] += 1
            if name in _CPU_ONLY:
                with self:  # the route the GPU takes instead, whose ops come back through this mode
                    return _CPU_ONLY[name](*args, **(kwargs or {}))
            func = getattr(getattr(self.ops, name), func._overloadname)
        return func(*args, **(kwargs or {}))


def _dense_conv2d_relu_max_pool2d_backward(grad_output, input, weight, indices, passes, stride, padding, dilation,
                                           groups, ceil_mode, output_mask):
    from ._ops.conv2d import conv2d_relu_max_pool2d_gradients
    from ._ops.params import Conv2dPoolParams

    params = Conv2dPoolParams(tuple(stride), tuple(padding), tuple(dilation), groups, ceil_mode)
    grads = conv2d_relu_max_pool2d_gradients(grad_output, input, weight, indices, passes, params, output_mask)
    return tuple(input.new_empty((0,)) if grad is None else grad for grad in grads)


# Ops with CPU kernels only (csrc/cpu), which CPU tensors reach on routes the GPU does not take:
# under emulation, the GPU's route.
_CPU_ONLY = {"_cpu_conv2d_relu_max_pool2d_backward": _dense_conv2d_relu_max_pool2d_backward}


@contextlib.contextmanager
def emulated_cuda(sanitize: bool | None = None):
    """Within it, every torchcnn op runs csrc/cuda's kernels on the CPU (CPU tensors in and out).
    Yields a Counter of the ops it routed, by name."""
    mode = _ToEmulated(emulated_cuda_ops(sanitize))
    with mode:
        yield mode.calls


CPU_CONV2D_STRATEGIES = ("gemm_per_image", "gemm_batched", "winograd", "depthwise", "direct")


def cpu_conv2d_strategy(input, weight, stride=1, padding=0, dilation=1, groups: int = 1) -> str:
    """The algorithm torchcnn's CPU conv2d takes for a convolution of these tensors' shapes — one of
    :data:`CPU_CONV2D_STRATEGIES`, picked by the rule in ``csrc/cpu/conv2d.cpp`` (or forced by
    :func:`forced_cpu_conv2d_strategy`). ``input`` and ``weight`` may be tensors or sizes;
    ``padding`` is an int or a pair."""
    from .functional import _pair

    _extension.load()
    fn = "cpu_conv2d_strategy"
    sizes = [list(t.shape) if isinstance(t, torch.Tensor) else list(t) for t in (input, weight)]
    pairs = [list(_pair(name, fn, v)) for name, v in (("stride", stride), ("padding", padding), ("dilation", dilation))]
    return torch.ops.torchcnn._cpu_conv2d_strategy(*sizes, *pairs, groups)


@contextlib.contextmanager
def _cpu_setting(knob: str, value: str):
    """Sets one of the CPU kernels' knobs (a private op that sets a value and returns the previous
    one) for the duration of the block."""
    _extension.load()
    setter = getattr(torch.ops.torchcnn, knob)
    previous = setter(value)
    try:
        yield
    finally:
        setter(previous)


def forced_cpu_conv2d_strategy(name: str):
    """Makes torchcnn's CPU conv2d kernels take algorithm ``name`` wherever it applies (the rule
    decides the rest), for the tests to hold every algorithm to the same samples; a context
    manager. Process-wide: not for use while other threads run convolutions."""
    if name not in CPU_CONV2D_STRATEGIES:
        raise ValueError(f"forced_cpu_conv2d_strategy: expected name to be one of {CPU_CONV2D_STRATEGIES} but got {name!r}")
    return _cpu_setting("_cpu_conv2d_force_strategy", name)


def forced_fused_backward_route(name: str):
    """Makes the CPU backward of :func:`torchcnn.functional.conv2d_relu_max_pool2d` take the
    ``"sparse"`` op (the convolution's gradients from one non-zero per pool window) or the
    ``"dense"`` route (max_pool2d_backward, then the convolution's gradient ops) wherever it is not
    differentiated again, for the tests to hold both to the same samples; a context manager.
    Process-wide, like :func:`forced_cpu_conv2d_strategy`."""
    if name not in ("sparse", "dense"):
        raise ValueError(f"forced_fused_backward_route: expected name to be 'sparse' or 'dense' but got {name!r}")
    return _cpu_setting("_cpu_fused_backward_route", name)


CPU_CAPABILITIES = ("avx512", "avx2", "default")


def cpu_capability() -> str:
    """The instruction-set tier torchcnn's CPU kernels run at: ``"avx512"``, ``"avx2"`` or
    ``"default"`` (baseline code: every CPU but x86-64, and x86-64 capped to it). It is torch's own
    CPU capability (``torch.backends.cpu.get_cpu_capability()``), so ``ATEN_CPU_CAPABILITY=avx2`` or
    ``=default``, set before torch loads, caps torch's kernels and torchcnn's together."""
    _extension.load()
    return torch.ops.torchcnn._cpu_capability()


def cpu_has_avx512_gemm() -> bool:
    """Whether float32 CPU products can take torchcnn's own AVX-512 GEMM: at the ``"avx512"`` tier."""
    try:
        with _cpu_setting("_cpu_set_gemm", "avx512"):
            return True
    except ValueError:
        return False


def forced_cpu_gemm(name: str):
    """Makes torchcnn's CPU convolutions compute float32 products with ``"avx512"`` (its own GEMM,
    the default at the ``"avx512"`` tier) or ``"blas"`` (``at::mm``); a context manager.
    Process-wide, like :func:`forced_cpu_conv2d_strategy`."""
    return _cpu_setting("_cpu_set_gemm", name)
