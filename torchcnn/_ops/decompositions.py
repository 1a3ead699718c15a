"""The forward ops written in torch's own ops, for exporters that translate only those.

``torch.onnx.export`` translates torch's ATen ops to ONNX and, for an op it cannot translate,
looks for a decomposition in ``torch._decomp.decomposition_table``. Registering torchcnn's forward
ops there is what lets ``torch.onnx.export(model, (x,))`` export a model with torchcnn's layers as
it is, with no extra argument and without ``import torchcnn`` importing onnx: conv2d becomes
``aten.convolution`` (ONNX ``Conv``), relu ``aten.relu`` (``Relu``), max_pool2d
``aten.max_pool2d_with_indices`` (``MaxPool``), and the fused ops their composition. Each
decomposition computes every output of the op, the mask of where the design notes' ReLU passes
(not Z < 0) included, so the values are the op's; exporters drop the outputs an inference graph does
not use. The gradient ops and cross_entropy have none: an exporter that meets them (a training
graph) keeps saying it cannot translate them.

``torch.export`` keeps the ops as they are (its default decompositions do not read this table),
and so do ``torch.compile``'s backends. FakeTensorMode is the one other reader: with symbolic
shapes it prefers a decomposition to an op's fake kernel. There the fake kernel answers, so that
tracing sees the op's own output layouts whichever way it traces.

Inductor reads the table too, in one place: with the environment variable ``CI`` set (GitHub
Actions and most CI services set it), it refuses to fall back to an op's kernel when the op has a
decomposition, the guard of PyTorch's own CI. So each decomposed op is registered with inductor as
a fallback, the kernel it would choose anyway, when inductor's lowerings are first imported:
``import torchcnn`` does not import inductor.
"""

from __future__ import annotations

import importlib.abc
import logging
import sys

import torch
from torch._decomp import register_decomposition

from .params import fused_pool
from .schemas import (_conv2d_fake, _conv2d_relu_fake, _conv2d_relu_max_pool2d_fake, _max_pool2d_fake, _relu_fake,
                      ops)

aten = torch.ops.aten
_DECOMPOSED: list[torch._ops.OpOverload] = []  # the ops given a decomposition below


def _decomposing() -> bool:
    """False only where FakeTensorMode itself asks for output metadata (it is the active mode, no
    make_fx proxy mode is tracing the call): there the op's fake kernel answers. Every other caller
    (a decomposition pass, DTensor's sharding rules, a direct call) gets the decomposition."""
    try:
        modes = torch._C._TorchDispatchModeKey
        return (torch._C._get_dispatch_mode(modes.FAKE) is None
                or torch._C._get_dispatch_mode(modes.PROXY) is not None)
    except AttributeError:  # an older or newer torch without this query: always decompose
        return True


def _decomposition(op, fake):
    """Register the decorated function as ``op``'s decomposition; ``fake`` answers FakeTensorMode."""

    def register(function):
        def decompose(*args, **kwargs):
            return function(*args, **kwargs) if _decomposing() else fake(*args, **kwargs)

        decompose.__name__ = decompose.__qualname__ = function.__name__
        decompose.__doc__ = function.__doc__
        register_decomposition(op)(decompose)
        _DECOMPOSED.append(op)
        return function

    return register


def _convolution(input, weight, bias, stride, padding, dilation, groups):
    return aten.convolution.default(input, weight, bias, list(stride), list(padding), list(dilation), False, [0, 0],
                                    groups)


def _passes(z):
    """Where the design notes' ReLU passes its gradient: not Z < 0 (Z ≥ 0, and NaN, which propagates)."""
    return aten.logical_not.default(aten.lt.Scalar(z, 0))


@_decomposition(ops.conv2d.default, _conv2d_fake)
def conv2d(input, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1):
    return _convolution(input, weight, bias, stride, padding, dilation, groups)


@_decomposition(ops.relu.default, _relu_fake)
def relu(input):
    return aten.relu.default(input), _passes(input)


@_decomposition(ops.conv2d_relu.default, _conv2d_relu_fake)
def conv2d_relu(input, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1):
    z = _convolution(input, weight, bias, stride, padding, dilation, groups)
    return aten.relu.default(z), _passes(z)


@_decomposition(ops.max_pool2d_with_indices.default, _max_pool2d_fake)
def max_pool2d_with_indices(input, kernel_size, stride, padding=(0, 0), dilation=(1, 1), ceil_mode=False):
    return aten.max_pool2d_with_indices.default(input, list(kernel_size), list(stride), list(padding),
                                                list(dilation), ceil_mode)


@_decomposition(ops.conv2d_relu_max_pool2d.default, _conv2d_relu_max_pool2d_fake)
def conv2d_relu_max_pool2d(input, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1,
                           ceil_mode=False):
    z = _convolution(input, weight, bias, stride, padding, dilation, groups)
    pool = fused_pool(ceil_mode)
    pooled, indices = max_pool2d_with_indices(aten.relu.default(z), pool.kernel_size, pool.stride, pool.padding,
                                              pool.dilation, ceil_mode)
    # The pass mask at each window's max: Z there (indices are flat within a plane of Z).
    planes = aten.flatten.using_ints(z, 2)
    at_max = aten.gather.default(planes, 2, aten.flatten.using_ints(indices, 2))
    return pooled, indices, aten.view.default(_passes(at_max), list(pooled.shape))


def _register_inductor_fallbacks(lowering) -> None:
    """Make each decomposed op a fallback of inductor's (its kernel runs in compiled code) with the
    layout constraint inductor would give it implicitly, without the ``CI`` guard that an implicit
    fallback of an op with a decomposition meets. ``lowering`` is ``torch._inductor.lowering``."""
    from torch._library.utils import get_layout_constraint_tag

    for op in _DECOMPOSED:
        if op not in lowering.lowerings:
            constraint = lowering.tag_to_layout_constraint(get_layout_constraint_tag(op, with_default=True))
            lowering.make_fallback(op, layout_constraint=constraint, warn=False)


def _when_imported(lowering) -> None:
    try:
        _register_inductor_fallbacks(lowering)
    except Exception as e:  # another torch's inductor: its implicit fallbacks still work where CI is unset
        # Logged, not warned: this runs inside inductor's import, which a warning made an error
        # (python -W error) would break.
        logging.getLogger("torchcnn").warning(
            "torchcnn could not register its ops as inductor fallbacks (%r); torch.compile may refuse them where "
            "the environment variable CI is set", e)


class _RegisteringLoader(importlib.abc.Loader):
    """``torch._inductor.lowering``'s own loader, which then registers the fallbacks; everything
    else is the loader's (source, file name, resources)."""

    def __init__(self, loader, finder):
        self._loader, self._finder = loader, finder

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        self._finder.done = True  # a failed import is retried, and registers then
        _when_imported(module)


class _InductorLowerings(importlib.abc.MetaPathFinder):
    """Finds ``torch._inductor.lowering`` with the finders after it, the first time it is imported,
    and gives it a loader that registers the fallbacks once the module has run. Every other import
    passes by; ``sys.meta_path`` is left as it is (another thread may be walking it)."""

    NAME = "torch._inductor.lowering"

    def __init__(self):
        self.done = False

    def find_spec(self, fullname, path, target=None):
        if self.done or fullname != self.NAME:
            return None
        for finder in list(sys.meta_path):
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _RegisteringLoader(spec.loader, self)
        return spec


if _InductorLowerings.NAME in sys.modules:
    _when_imported(sys.modules[_InductorLowerings.NAME])
else:
    sys.meta_path.insert(0, _InductorLowerings())
