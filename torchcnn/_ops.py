"""Autograd and tracing for the compiled ops in ``torch.ops.torchcnn``.

Each op's gradient is a :class:`torch.autograd.Function` whose forward calls the forward op and
whose backward calls the backward op(s). The same ``setup_context``/``backward`` pair is also
registered on the op itself (``torch.library.register_autograd``), so calling
``torch.ops.torchcnn.conv2d`` directly is differentiable too. Fake (meta) kernels give output
shapes to ``torch.compile``; they mirror the shape arithmetic of ``csrc/shapes.h``.
"""

from __future__ import annotations

import torch

from . import _extension  # noqa: F401  (loads torch.ops.torchcnn)

ops = torch.ops.torchcnn


# --------------------------------------------------------------------------------------------
# Shapes (the same formulas as csrc/shapes.h, written for SymInts). Arguments left at their
# schema defaults may be left out of the call, hence the defaults here.


def _window_output_size(size, kernel, stride, pad, dilation, ceil_mode=False):
    span = size + 2 * pad - dilation * (kernel - 1) - 1
    out = (span + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + pad:
        out = out - 1
    return out


def _conv2d_output_shape(input, weight, stride, padding, dilation):
    torch._check(input.dim() == 4, lambda: f"conv2d: expected input to be 4-D but got {input.dim()}-D")
    torch._check(weight.dim() == 4, lambda: f"conv2d: expected weight to be 4-D but got {weight.dim()}-D")
    out_h = _window_output_size(input.shape[2], weight.shape[2], stride[0], padding[0], dilation[0])
    out_w = _window_output_size(input.shape[3], weight.shape[3], stride[1], padding[1], dilation[1])
    return (input.shape[0], weight.shape[0], out_h, out_w)


@torch.library.register_fake("torchcnn::conv2d")
def _conv2d_fake(input, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1):
    return input.new_empty(_conv2d_output_shape(input, weight, stride, padding, dilation))


@torch.library.register_fake("torchcnn::conv2d_backward_input")
def _conv2d_backward_input_fake(grad_output, input, weight, stride, padding, dilation, groups):
    return input.new_empty(input.shape)


@torch.library.register_fake("torchcnn::conv2d_backward_weight")
def _conv2d_backward_weight_fake(grad_output, input, weight, stride, padding, dilation, groups):
    return weight.new_empty(weight.shape)


@torch.library.register_fake("torchcnn::max_pool2d_with_indices")
def _max_pool2d_fake(input, kernel_size, stride, padding=(0, 0), dilation=(1, 1), ceil_mode=False):
    torch._check(input.dim() == 4, lambda: f"max_pool2d: expected input to be 4-D but got {input.dim()}-D")
    out_h, out_w = (
        _window_output_size(input.shape[2 + i], kernel_size[i], stride[i], padding[i], dilation[i], ceil_mode)
        for i in range(2)
    )
    shape = (input.shape[0], input.shape[1], out_h, out_w)
    return input.new_empty(shape), input.new_empty(shape, dtype=torch.long)


@torch.library.register_fake("torchcnn::max_pool2d_backward")
def _max_pool2d_backward_fake(grad_output, input, indices, kernel_size, stride, padding, dilation, ceil_mode):
    return input.new_empty(input.shape)


# --------------------------------------------------------------------------------------------
# Autograd


class Conv2dFunction(torch.autograd.Function):
    """Y = conv2d(X, W) + b; backward: ∂L/∂X and ∂L/∂W from the backward ops, ∂L/∂b = Σ ∂L/∂Y."""

    @staticmethod
    def forward(input, weight, bias, stride, padding, dilation, groups):
        return ops.conv2d(input, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, stride, padding, dilation, groups = inputs
        ctx.save_for_backward(input, weight)
        ctx.params = (stride, padding, dilation, groups)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_input = ops.conv2d_backward_input(grad_output, input, weight, *ctx.params)
        if ctx.needs_input_grad[1]:
            grad_weight = ops.conv2d_backward_weight(grad_output, input, weight, *ctx.params)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_output.sum((0, 2, 3))
        return grad_input, grad_weight, grad_bias, None, None, None, None


class MaxPool2dFunction(torch.autograd.Function):
    """P = max over each window, with argmax indices; backward routes ∂L/∂P to the argmax."""

    @staticmethod
    def forward(input, kernel_size, stride, padding, dilation, ceil_mode):
        return ops.max_pool2d_with_indices(input, kernel_size, stride, padding, dilation, ceil_mode)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, *params = inputs
        ctx.save_for_backward(input, output[1])
        ctx.params = params
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, grad_output, _grad_indices):
        input, indices = ctx.saved_tensors
        grad_input = None
        if ctx.needs_input_grad[0]:
            grad_input = ops.max_pool2d_backward(grad_output, input, indices, *ctx.params)
        return grad_input, None, None, None, None, None


torch.library.register_autograd(
    "torchcnn::conv2d", Conv2dFunction.backward, setup_context=Conv2dFunction.setup_context
)
torch.library.register_autograd(
    "torchcnn::max_pool2d_with_indices", MaxPool2dFunction.backward, setup_context=MaxPool2dFunction.setup_context
)
