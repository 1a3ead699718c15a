"""torchcnn's layers, drop-ins for their torch.nn namesakes.

Each class subclasses the torch.nn layer of the same name, so constructor arguments, parameter
names and shapes, default initialisation, ``repr`` and ``state_dict`` are torch's own: a model
built from torchcnn.nn loads a torch.nn model's state_dict and the other way round, and the same
seed gives the same initial weights. Only ``forward`` differs: it runs torchcnn.functional.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import functional as F

__all__ = ["Conv2d", "Conv2dReLU", "Conv2dReLUMaxPool2d", "MaxPool2d", "ReLU", "Linear", "CrossEntropyLoss"]


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
