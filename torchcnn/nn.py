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

__all__ = ["Conv2d", "MaxPool2d", "ReLU", "Linear", "CrossEntropyLoss"]


class Conv2d(torch.nn.Conv2d):
    """:class:`torch.nn.Conv2d` computed by torchcnn's conv2d operator (every padding_mode)."""

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if self.padding_mode != "zeros":
            input = torch.nn.functional.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv2d(input, weight, bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)


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
