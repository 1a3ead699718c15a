"""Sample arguments for each op, shared by the correctness, gradient, opcheck, fake-kernel and
compile tests (in the manner of torch's OpInfo sample_inputs and extension-cpp's).

A :class:`Sample` describes one call by shapes and keyword arguments; ``sample.inputs(device,
dtype)`` makes its tensors. ``SAMPLE_INPUTS[op](device, dtype)`` yields every sample of
``torch.ops.torchcnn.<op>`` (the three gradient ops included) as ready op arguments.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from torchcnn._ops.schemas import conv2d_output_shape


@dataclass
class Sample:
    shape: tuple  # input shape
    kwargs: dict = field(default_factory=dict)
    weight_shape: tuple | None = None  # conv only
    bias: bool = True

    def __repr__(self):
        return f"{self.shape}-{self.weight_shape}-{self.kwargs}-bias={self.bias}"

    @property
    def op_compatible(self) -> bool:
        """Whether the op takes this call as it is: batched, and no padding='same' (which the
        functional layer resolves, with an extra pad for an even kernel)."""
        return len(self.shape) == 4 and self.kwargs.get("padding") != "same"

    def inputs(self, device, dtype, requires_grad=False) -> tuple:
        """The sample's tensors: (input, weight, bias) for a conv, (input,) for a pool."""
        if self.weight_shape is None:
            return (torch.randn(self.shape, dtype=dtype, device=device, requires_grad=requires_grad),)
        return make_conv(self, device, dtype, requires_grad)

    def conv2d_params(self) -> list:
        return conv2d_op_params(self.kwargs)

    def max_pool2d_params(self) -> list:
        return max_pool2d_op_params(self.kwargs)


def _pair(v) -> list:
    return list(v) if isinstance(v, (tuple, list)) else [v, v]


def conv2d_op_params(kwargs) -> list | None:
    """torch.nn.functional.conv2d's keyword arguments as the op takes them (stride, padding,
    dilation, groups); None for padding='same', which only the functional layer resolves."""
    padding = kwargs.get("padding", 0)
    if padding == "same":
        return None
    return [_pair(kwargs.get("stride", 1)), [0, 0] if padding == "valid" else _pair(padding),
            _pair(kwargs.get("dilation", 1)), kwargs.get("groups", 1)]


def max_pool2d_op_params(kwargs) -> list:
    """torch.nn.functional.max_pool2d's keyword arguments as the op takes them (kernel_size,
    stride, padding, dilation, ceil_mode)."""
    kernel = _pair(kwargs["kernel_size"])
    return [kernel, kernel if kwargs.get("stride") is None else _pair(kwargs["stride"]),
            _pair(kwargs.get("padding", 0)), _pair(kwargs.get("dilation", 1)), kwargs.get("ceil_mode", False)]


# A sample for each of the CPU conv2d's algorithms (csrc/cpu/conv2d.cpp's rule), with the one the
# rule is meant to pick for it.
CPU_STRATEGY_SAMPLES = [
    (Sample((3, 16, 4, 4), {"stride": 2, "padding": 1}, (24, 16, 3, 3)), "gemm_batched"),  # a 2×2 output plane
    (Sample((3, 16, 7, 7), {"stride": 2}, (24, 16, 1, 1), bias=False), "gemm_batched"),  # 1×1 stride-2 downsample
    (Sample((1, 2, 65, 65), {"stride": 2, "padding": 1}, (3, 2, 3, 3)), "gemm_per_image"),  # a plane of ≥ 1,024 pixels
    (Sample((2, 16, 9, 10), {"padding": 1, "groups": 16}, (32, 1, 3, 3)), "depthwise"),  # multiplier 2
    (Sample((11, 24, 11, 9), {"padding": 1}, (24, 24, 3, 3)), "winograd"),  # odd output: partial tiles
    (Sample((20, 24, 6, 7), {"padding": 2}, (8, 24, 3, 3)), "winograd"),  # padding 2: ∂X with no padding
    (Sample((3, 6, 9, 11), {"padding": 2}, (10, 6, 5, 5)), "direct"),  # a 5×5 filter
    (Sample((2, 8, 7, 21), {"padding": (1, 2), "dilation": (1, 2), "groups": 2}, (6, 4, 3, 3)), "direct"),  # grouped
    (Sample((2, 3, 5, 40), {}, (5, 3, 3, 1)), "direct"),  # few channels, 3×1 taps
    (Sample((2, 5, 14, 14), {"padding": 3}, (6, 5, 7, 7)), "direct"),  # 7×7 on 14 columns: vectors along rows
    # Few tiles, many channels: forced to Winograd, ∂W goes over the whole batch at once.
    (Sample((2, 32, 2, 3), {"padding": 1}, (40, 32, 3, 3)), "gemm_batched"),
]


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
        out += [sample for sample, _ in CPU_STRATEGY_SAMPLES]
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


# --------------------------------------------------------------------------------------------
# Ready op arguments: each op's sample_inputs(device, dtype) yields the argument tuples of
# torch.ops.torchcnn.<op> for every op-compatible sample. The gradient ops take a random
# grad_output of the forward's output shape (and the forward's indices for the pool).


def conv2d_sample_inputs(device, dtype, requires_grad=False, full=False):
    for sample in conv2d_samples(full):
        if sample.op_compatible:
            yield (*sample.inputs(device, dtype, requires_grad), *sample.conv2d_params())


def _conv2d_gradient_sample_inputs(device, dtype, requires_grad, full):
    for sample in conv2d_samples(full):
        if sample.op_compatible:
            x, w, _ = sample.inputs(device, dtype, requires_grad)
            params = sample.conv2d_params()
            shape = conv2d_output_shape("conv2d", x, w, None, *params)
            grad_output = torch.randn(shape, dtype=dtype, device=device, requires_grad=requires_grad)
            yield (grad_output, x, w, *params)


def conv2d_relu_sample_inputs(device, dtype, requires_grad=False, full=False):
    yield from conv2d_sample_inputs(device, dtype, requires_grad, full)


def conv2d_relu_max_pool2d_sample_inputs(device, dtype, requires_grad=False, full=False):
    """conv2d's samples whose output the 2×2 pool takes, ceil_mode on for every other one (and
    wherever the output has a side of 1)."""
    for i, args in enumerate(conv2d_sample_inputs(device, dtype, requires_grad, full)):
        _, _, h, w = conv2d_output_shape("conv2d", args[0], args[1], None, *args[3:])
        yield (*args, i % 2 == 1 or min(h, w) < 2)


def conv2d_backward_input_sample_inputs(device, dtype, requires_grad=False, full=False):
    yield from _conv2d_gradient_sample_inputs(device, dtype, requires_grad, full)


def conv2d_backward_weight_sample_inputs(device, dtype, requires_grad=False, full=False):
    yield from _conv2d_gradient_sample_inputs(device, dtype, requires_grad, full)


def max_pool2d_with_indices_sample_inputs(device, dtype, requires_grad=False, full=False):
    for sample in max_pool2d_samples(full):
        if sample.op_compatible:
            yield (*sample.inputs(device, dtype, requires_grad), *sample.max_pool2d_params())


def max_pool2d_backward_sample_inputs(device, dtype, requires_grad=False, full=False):
    for sample in max_pool2d_samples(full):
        if sample.op_compatible:
            (x,) = sample.inputs(device, dtype)
            params = sample.max_pool2d_params()
            output, indices = torch.ops.torchcnn.max_pool2d_with_indices(x, *params)
            grad_output = torch.randn_like(output).requires_grad_(requires_grad)
            yield (grad_output, x, indices, *params)


def cross_entropy_sample_inputs(device, dtype, requires_grad=False, full=False):
    """Logits (rows, classes) with class-index targets, over the reductions, class weights,
    ignore_index (a row of it included) and label smoothing; a single row, a single class, no row."""
    cases = [((8, 10), "mean", False, -100, 0.0), ((5, 3), "sum", True, 1, 0.0), ((6, 4), "none", True, -100, 0.2),
             ((7, 5), "mean", True, 2, 0.1), ((1, 10), "mean", False, -100, 0.0), ((4, 1), "sum", False, -100, 0.3),
             ((0, 3), "none", False, -100, 0.0)]
    for shape, reduction, weighted, ignore_index, smoothing in cases:
        x = torch.randn(shape, dtype=dtype, device=device, requires_grad=requires_grad)
        target = torch.randint(0, shape[1], shape[:1], device=device)
        if ignore_index >= 0 and shape[0] > 1:
            target[0] = ignore_index
        weight = torch.rand(shape[1], dtype=dtype, device=device) + 0.5 if weighted else None
        yield (x, target, weight, reduction, ignore_index, smoothing)


def relu_sample_inputs(device, dtype, requires_grad=False, full=False):
    """Any shape and layout: a vector, an image batch (contiguous, channels_last and transposed), a
    scalar, no element."""
    def make(*shape):
        return torch.randn(shape, dtype=dtype, device=device)

    for x in (make(7), make(2, 3, 4, 5), make(2, 3, 4, 5).contiguous(memory_format=torch.channels_last),
              make(3, 6).t(), make(), make(0, 3)):
        yield (x.requires_grad_(requires_grad),)


def relu_backward_sample_inputs(device, dtype, requires_grad=False, full=False):
    """relu's samples as gradients, with masks of their shape (and, once, of other strides)."""
    for (x,) in relu_sample_inputs(device, dtype):
        passes = torch.rand(x.shape, device=device) > 0.5
        yield (x.detach().requires_grad_(requires_grad), passes)
    g = torch.randn(4, 6, dtype=dtype, device=device, requires_grad=requires_grad)
    yield (g, (torch.rand(6, 4, device=device) > 0.5).t())  # a mask of other strides
    mask = torch.rand(2, 3, 4, 5, device=device).contiguous(memory_format=torch.channels_last) > 0.5
    yield (torch.randn(2, 3, 4, 5, dtype=dtype, device=device, requires_grad=requires_grad), mask)
    yield (torch.randn(2, 3, dtype=dtype, device=device, requires_grad=requires_grad),
           (torch.rand(1, 3, device=device) > 0.5).expand(2, 3))  # a mask that is not dense


SAMPLE_INPUTS = {
    "conv2d": conv2d_sample_inputs,
    "conv2d_relu": conv2d_relu_sample_inputs,
    "conv2d_relu_max_pool2d": conv2d_relu_max_pool2d_sample_inputs,
    "conv2d_backward_input": conv2d_backward_input_sample_inputs,
    "conv2d_backward_weight": conv2d_backward_weight_sample_inputs,
    "max_pool2d_with_indices": max_pool2d_with_indices_sample_inputs,
    "max_pool2d_backward": max_pool2d_backward_sample_inputs,
    "cross_entropy": cross_entropy_sample_inputs,
    "relu": relu_sample_inputs,
    "relu_backward": relu_backward_sample_inputs,
}
