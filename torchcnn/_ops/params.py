"""The ops' arguments other than tensors, one frozen dataclass per op: what a Function takes as
its last argument (torch.func treats a tuple of ints as several inputs), and ``args()`` spells
them out again in the op's order."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Conv2dParams:
    """conv2d's arguments other than tensors, as one object (torch.func treats a tuple of ints as
    several inputs)."""

    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int

    def args(self):
        return (self.stride, self.padding, self.dilation, self.groups)


@dataclasses.dataclass(frozen=True)
class Conv2dPoolParams:
    """conv2d_relu_max_pool2d's arguments other than tensors: the convolution's, and the 2×2,
    stride-2 pool's ceil_mode."""

    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int
    ceil_mode: bool

    def args(self):
        return (self.stride, self.padding, self.dilation, self.groups, self.ceil_mode)

    def conv(self) -> "Conv2dParams":
        return Conv2dParams(self.stride, self.padding, self.dilation, self.groups)

    def pool(self) -> "MaxPool2dParams":
        return fused_pool(self.ceil_mode)


@dataclasses.dataclass(frozen=True)
class MaxPool2dParams:
    kernel_size: tuple
    stride: tuple
    padding: tuple
    dilation: tuple
    ceil_mode: bool

    def args(self):
        return (self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode)


def fused_pool(ceil_mode: bool) -> MaxPool2dParams:
    """The pool of conv2d_relu_max_pool2d: 2×2 windows, stride 2, no padding, no dilation (in C++,
    shapes.h's conv2d_relu_max_pool2d_geometry)."""
    return MaxPool2dParams((2, 2), (2, 2), (0, 0), (1, 1), ceil_mode)


@dataclasses.dataclass(frozen=True)
class CrossEntropyParams:
    reduction: str
    ignore_index: int
    label_smoothing: float

    def args(self):
        return (self.reduction, self.ignore_index, self.label_smoothing)


@dataclasses.dataclass(frozen=True)
class NoParams:
    """The parameters of an op that has none (relu)."""

    def args(self):
        return ()
