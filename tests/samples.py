"""Sample arguments for each op, shared by the correctness, gradient, opcheck and compile tests
(in the manner of torch's OpInfo sample_inputs)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch


@dataclass
class Sample:
    shape: tuple  # input shape
    kwargs: dict = field(default_factory=dict)
    weight_shape: tuple | None = None  # conv only
    bias: bool = True

    def __repr__(self):
        return f"{self.shape}-{self.weight_shape}-{self.kwargs}-bias={self.bias}"


def conv2d_samples(full: bool = True) -> list[Sample]:
    """Odd/non-square sizes, non-square kernels, stride/padding/dilation/groups combinations,
    batch 1, 1×1 kernels, kernel equal to the input, 'same'/'valid', unbatched input."""
    out = [
        Sample((2, 3, 7, 9), {}, (4, 3, 3, 3)),
        Sample((1, 1, 28, 28), {}, (32, 1, 3, 3)),  # the MNIST model's first layer
        Sample((2, 32, 12, 12), {}, (64, 32, 3, 3)),  # … and its second
        Sample((3, 4, 11, 8), {"stride": 2, "padding": 1, "dilation": 2, "groups": 2}, (6, 2, 3, 2)),
        Sample((1, 2, 5, 5), {}, (3, 2, 5, 5)),  # kernel = input
        Sample((2, 4, 6, 7), {}, (8, 4, 1, 1), bias=False),  # pointwise
        Sample((2, 4, 9, 6), {"stride": (2, 1), "padding": (1, 0), "groups": 4}, (8, 1, 1, 1)),  # 1×1 strided
        Sample((2, 6, 10, 7), {"groups": 3, "padding": "same"}, (9, 2, 2, 3)),  # asymmetric 'same'
        Sample((2, 3, 8, 8), {"padding": "same", "dilation": 2}, (4, 3, 3, 3)),
        Sample((2, 3, 8, 8), {"padding": "valid"}, (4, 3, 2, 2)),
        Sample((3, 9, 9), {"padding": 1}, (5, 3, 3, 3)),  # unbatched
        Sample((2, 4, 7, 7), {"groups": 4, "stride": 3, "padding": 2}, (4, 1, 3, 3)),  # depthwise
        Sample((0, 3, 5, 5), {}, (2, 3, 3, 3)),  # empty batch
    ]
    if full:
        for (k, s, p, d, g) in itertools.product([(1, 2), (3, 3), (2, 4)], [1, (2, 3)], [0, (1, 2)], [1, 2], [1, 2]):
            h, w = 9, 11
            if d * (k[0] - 1) + 1 > h + 2 * (p if isinstance(p, int) else p[0]):
                continue
            out.append(Sample((2, 2 * g, h, w), {"stride": s, "padding": p, "dilation": d, "groups": g},
                              (2 * g, 2, *k), bias=(k[0] + d) % 2 == 0))
    return out


def max_pool2d_samples(full: bool = True) -> list[Sample]:
    out = [
        Sample((2, 3, 8, 8), {"kernel_size": 2}),  # the design notes' 2×2 fast path
        Sample((2, 3, 9, 7), {"kernel_size": 2}),  # … with an odd remainder row/column
        Sample((1, 64, 24, 24), {"kernel_size": 2, "stride": 2}),
        Sample((2, 3, 9, 7), {"kernel_size": 2, "ceil_mode": True}),
        Sample((2, 3, 10, 11), {"kernel_size": 3, "stride": 2, "padding": 1}),
        Sample((2, 2, 10, 11), {"kernel_size": (3, 2), "stride": (1, 2), "padding": (1, 1), "dilation": (2, 1)}),
        Sample((3, 7, 5), {"kernel_size": 2, "stride": 1}),  # unbatched
        Sample((1, 1, 4, 4), {"kernel_size": 4}),  # kernel = input
        Sample((0, 3, 6, 6), {"kernel_size": 2}),  # empty batch
    ]
    if full:
        for k, s, p, d, c in itertools.product([2, 3, (2, 3)], [None, 1, 2], [0, 1], [1, 2], [False, True]):
            kk = k if isinstance(k, tuple) else (k, k)
            if any(2 * p > d * (kk[i] - 1) + 1 for i in range(2)):
                continue
            out.append(Sample((2, 2, 9, 8), {"kernel_size": k, "stride": s, "padding": p, "dilation": d,
                                             "ceil_mode": c}))
    return out


def make_conv(sample: Sample, device, dtype, requires_grad=False):
    x = torch.randn(sample.shape, dtype=dtype, device=device, requires_grad=requires_grad)
    w = torch.randn(sample.weight_shape, dtype=dtype, device=device, requires_grad=requires_grad)
    b = torch.randn(sample.weight_shape[0], dtype=dtype, device=device, requires_grad=requires_grad) \
        if sample.bias else None
    return x, w, b
