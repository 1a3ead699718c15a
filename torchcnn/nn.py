"""torchcnn's layers, drop-ins for their torch.nn namesakes.

Each class subclasses the torch.nn layer of the same name, so constructor arguments, parameter
names and shapes, default initialisation, ``repr`` and ``state_dict`` are torch's own: a model
built from torchcnn.nn loads a torch.nn model's state_dict and the other way round, and the same
seed gives the same initial weights. Only ``forward`` differs: it runs torchcnn.functional.

:func:`convert` turns a torch.nn model's layers into these in one call (and fuses conv → ReLU
(→ 2×2 max pool) runs of an ``nn.Sequential``); :func:`revert` turns them back.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from . import functional as F

__all__ = ["Conv2d", "Conv2dReLU", "Conv2dReLUMaxPool2d", "MaxPool2d", "ReLU", "Linear", "CrossEntropyLoss",
           "Folded", "convert", "revert"]


def _convolve(conv: torch.nn.Conv2d, function, input: Tensor, weight: Tensor, bias: Tensor | None, **kwargs):
    """`function` (conv2d or a fused variant) with the layer's arguments, any padding_mode."""
    padding = conv.padding
    if conv.padding_mode != "zeros":
        input = torch.nn.functional.pad(input, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        padding = 0
    return function(input, weight, bias, conv.stride, padding, conv.dilation, conv.groups, **kwargs)


class Conv2d(torch.nn.Conv2d):
    """:class:`torch.nn.Conv2d` computed by torchcnn's conv2d operator (every padding_mode)."""

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return _convolve(self, F.conv2d, input, weight, bias)


class Conv2dReLU(torch.nn.Conv2d):
    """A :class:`Conv2d` followed by a :class:`ReLU`, as one op (:func:`torchcnn.functional.conv2d_relu`).

    Constructor, parameters and ``state_dict`` are :class:`torch.nn.Conv2d`'s, so weights move
    between this layer, a Conv2d (torchcnn's or torch's) and the other fused layers."""

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return _convolve(self, F.conv2d_relu, input, weight, bias)


class Conv2dReLUMaxPool2d(torch.nn.Conv2d):
    """A :class:`Conv2d`, a :class:`ReLU` and a 2×2 :class:`MaxPool2d` (stride 2, ``ceil_mode`` as
    given), as one op (:func:`torchcnn.functional.conv2d_relu_max_pool2d`).

    Constructor (plus ``ceil_mode``), parameters and ``state_dict`` are :class:`torch.nn.Conv2d`'s,
    so weights move between this layer, a Conv2d (torchcnn's or torch's) and :class:`Conv2dReLU`."""

    def __init__(self, *args, ceil_mode: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.ceil_mode = ceil_mode

    def extra_repr(self) -> str:
        return super().extra_repr() + (", ceil_mode=True" if self.ceil_mode else "")

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return _convolve(self, F.conv2d_relu_max_pool2d, input, weight, bias, ceil_mode=self.ceil_mode)


class MaxPool2d(torch.nn.MaxPool2d):
    """:class:`torch.nn.MaxPool2d` computed by torchcnn's max_pool2d operator."""

    def forward(self, input: Tensor):
        return F.max_pool2d(input, self.kernel_size, self.stride, self.padding, self.dilation,
                            ceil_mode=self.ceil_mode, return_indices=self.return_indices)


class ReLU(torch.nn.ReLU):
    """ReLU(z) = max(0, z) with the design notes' gradient: it passes where z ≥ 0, *including*
    z = 0, where torch.nn.ReLU passes 0. See :func:`torchcnn.functional.relu`."""

    def forward(self, input: Tensor) -> Tensor:
        return F.relu(input, inplace=self.inplace)


class Linear(torch.nn.Linear):
    """:class:`torch.nn.Linear`, the dense layer z = W h + b."""

    def forward(self, input: Tensor) -> Tensor:
        return F.linear(input, self.weight, self.bias)


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """:class:`torch.nn.CrossEntropyLoss` as the design notes' softmax followed by cross-entropy."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                               reduction=self.reduction, label_smoothing=self.label_smoothing)


class Folded(torch.nn.Identity):
    """Stands where :func:`convert` folded a layer into the fused layer before it: passes its input
    on, and keeps the layer (not as a submodule: it has no parameters, and the model's
    ``state_dict`` keys stay the original's) for :func:`revert` to put back."""

    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        self.__dict__["layer"] = layer

    def train(self, mode: bool = True):
        self.layer.train(mode)  # so that revert puts it back in the model's mode
        return super().train(mode)

    def extra_repr(self) -> str:
        return repr(self.layer)


# torch.nn's layers and torchcnn's drop-ins for them. Only these exact classes are converted: a
# subclass may have a forward of its own, which converting would lose.
_TORCHCNN = {torch.nn.Conv2d: Conv2d, torch.nn.MaxPool2d: MaxPool2d, torch.nn.ReLU: ReLU, torch.nn.Linear: Linear,
             torch.nn.CrossEntropyLoss: CrossEntropyLoss}
_TORCH = {ours: theirs for theirs, ours in _TORCHCNN.items()} | {Conv2dReLU: torch.nn.Conv2d,
                                                                  Conv2dReLUMaxPool2d: torch.nn.Conv2d}


def _check_module(fn: str, module) -> None:
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"{fn}: expected module to be a torch.nn.Module but got {type(module).__name__}")


def _has_hooks(module: torch.nn.Module) -> bool:
    return any(getattr(module, name, None) for name in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                                                        "_backward_pre_hooks"))


def _runs_as_sequential(module: torch.nn.Module) -> bool:
    """An nn.Sequential (or a subclass that keeps its forward): each child's output is the next one's
    input and nothing else's, which is what makes fusing neighbours safe."""
    return isinstance(module, torch.nn.Sequential) and type(module).forward is torch.nn.Sequential.forward


def _is_2x2_pool(layer) -> bool:
    """A max pool the fused op computes: 2×2 windows, stride 2, no padding or dilation, no indices."""
    def pair(value):
        return tuple(value) if isinstance(value, (tuple, list)) else (value, value)

    return (type(layer) in (torch.nn.MaxPool2d, MaxPool2d) and pair(layer.kernel_size) == (2, 2)
            and pair(layer.stride or layer.kernel_size) == (2, 2) and pair(layer.padding) == (0, 0)
            and pair(layer.dilation) == (1, 1) and not layer.return_indices)


def _fuse(model: torch.nn.Module) -> None:
    """Conv2d → ReLU (→ 2×2 MaxPool2d) runs of every Sequential in `model` become one fused layer, the
    layers after the convolution :class:`Folded` in their places. Only where that is safe: neighbours
    in a Sequential, no hooks on any of them, and a convolution that appears once in the model
    (a shared one would fuse everywhere it is used)."""
    uses = {}
    for _, m in model.named_modules(remove_duplicate=False):
        uses[id(m)] = uses.get(id(m), 0) + 1
    for parent in list(model.modules()):
        if not _runs_as_sequential(parent):
            continue
        names = list(parent._modules)
        for i, name in enumerate(names[:-1]):
            conv, relu = parent._modules[name], parent._modules[names[i + 1]]
            if (type(conv) is not Conv2d or type(relu) is not ReLU or uses[id(conv)] > 1
                    or _has_hooks(conv) or _has_hooks(relu)):
                continue
            pool = parent._modules[names[i + 2]] if i + 2 < len(names) else None
            if pool is not None and _is_2x2_pool(pool) and not _has_hooks(pool):
                conv.__class__, conv.ceil_mode = Conv2dReLUMaxPool2d, pool.ceil_mode
                parent._modules[names[i + 2]] = Folded(pool)
            else:
                conv.__class__ = Conv2dReLU
            parent._modules[names[i + 1]] = Folded(relu)


def convert(module: torch.nn.Module, *, fuse: bool = True, inplace: bool = False) -> torch.nn.Module:
    """`module` with every ``torch.nn`` Conv2d, MaxPool2d, ReLU, Linear and CrossEntropyLoss computed
    by torchcnn's layers.

    Each layer stays the object it was, its class changed to torchcnn's drop-in (a subclass of the
    torch.nn class with the same state), so parameters, buffers, hooks, training mode, device and
    ``state_dict`` keys are kept; only exact torch.nn classes are converted, not subclasses of them.
    With ``fuse=True``, the Conv2d → ReLU runs of an ``nn.Sequential`` (as in VGG and AlexNet)
    become :class:`Conv2dReLU`, and with a 2×2, stride-2 MaxPool2d after them
    :class:`Conv2dReLUMaxPool2d`; the ReLU and the pool stay in the Sequential as :class:`Folded`
    placeholders, so indices and keys do not move — but what a slice of the Sequential computes
    does: ``features[:2]`` of a fused VGG pools, and an output read at a convolution's index has been
    through the ReLU. Code that slices a Sequential or taps its intermediate outputs (feature
    extractors, perceptual losses, hooks added later) wants ``fuse=False``. Layers wired together by
    a ``forward`` of the model's own are not fused (nothing says that a layer's output goes only to
    the next), nor are layers with hooks or a convolution used in more than one place.

    The converted layers are torchcnn's in every respect: the ReLU's gradient at exactly 0 is the
    design notes' (1, where torch's is 0), and they run where torchcnn has kernels — CPU and CUDA
    tensors of float16, bfloat16, float32 and float64; other devices and dtypes raise.

    ``inplace=False`` (the default) converts a deep copy and leaves `module` as it was;
    ``inplace=True`` converts `module` itself (an optimizer made for it keeps working) and returns it.
    :func:`revert` is the inverse.
    """
    _check_module("convert", module)
    model = module if inplace else copy.deepcopy(module)
    for layer in model.modules():
        if type(layer) in _TORCHCNN:
            layer.__class__ = _TORCHCNN[type(layer)]
    if fuse:
        _fuse(model)
    return model


def _fused_to_conv(layer: torch.nn.Module) -> torch.nn.Module:
    layer.__dict__.pop("ceil_mode", None)
    layer.__class__ = torch.nn.Conv2d
    return layer


def _unfused(layer: torch.nn.Module) -> torch.nn.Module:
    """A fused layer that :func:`convert` did not make: torch.nn's conv, ReLU (and pool) in a Sequential."""
    pool = [torch.nn.MaxPool2d(2, 2, ceil_mode=layer.ceil_mode)] if type(layer) is Conv2dReLUMaxPool2d else []
    return torch.nn.Sequential(_fused_to_conv(layer), torch.nn.ReLU(), *pool)


def revert(module: torch.nn.Module, *, inplace: bool = False) -> torch.nn.Module:
    """`module` with torchcnn's layers turned back into torch.nn's, for tools that know only torch.nn:
    the inverse of :func:`convert`.

    The layers convert folded into a fused one come back from their :class:`Folded` places, so a
    converted model reverts to its original structure and ``state_dict`` keys. A fused layer built
    directly (not by convert) becomes an ``nn.Sequential`` of Conv2d, ReLU and MaxPool2d, whose keys
    gain a ``.0`` (``features.0.weight`` → ``features.0.0.weight``); a :class:`Folded` whose fused
    layer is gone becomes an ``nn.Identity``, as it computes. ``inplace`` as for :func:`convert`."""
    _check_module("revert", module)
    model = module if inplace else copy.deepcopy(module)
    if type(model) in (Conv2dReLU, Conv2dReLUMaxPool2d):
        model = _unfused(model)
    for parent in list(model.modules()):
        names = list(parent._modules)
        for i, name in enumerate(names):
            layer = parent._modules[name]
            if type(layer) not in (Conv2dReLU, Conv2dReLUMaxPool2d):
                continue
            count = 2 if type(layer) is Conv2dReLUMaxPool2d else 1  # the ReLU's (and the pool's) places
            after = names[i + 1:i + 1 + count]
            folded = [parent._modules[n] for n in after]
            if len(after) == count and all(type(f) is Folded for f in folded):
                _fused_to_conv(layer)
                for n, f in zip(after, folded):
                    parent._modules[n] = f.layer
            else:
                parent._modules[name] = _unfused(layer)
    for parent in list(model.modules()):
        for name, child in parent._modules.items():
            if type(child) is Folded:
                parent._modules[name] = torch.nn.Identity()
    for layer in model.modules():
        if type(layer) in _TORCH:
            layer.__class__ = _TORCH[type(layer)]
    return model
