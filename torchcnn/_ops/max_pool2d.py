"""Autograd formulas of max pooling: the gradient goes to each window's argmax, and the
gradient's own gradient and the tangents gather at the same indices."""

from __future__ import annotations

import torch

from .routing import below_autograd, call
from .schemas import ops


def _real_windows(size, out, kernel, stride, pad, dilation, device):
    """Which of the `out` windows along one dimension hold a real pixel (only a dilated one can miss)."""
    taps = (torch.arange(out, device=device) * stride - pad)[:, None] + torch.arange(kernel, device=device) * dilation
    return ((taps >= 0) & (taps < size)).any(1)


def gather_at_argmax(values, indices, params):
    """out[n, c, i, j] = values[n, c].flatten()[indices[n, c, i, j]]: the adjoint of max-pool's
    backward, and the forward-mode derivative of max pooling. A window that holds no real pixel
    gives 0 (its output is a constant −inf)."""
    kernel_size, stride, padding, dilation = params.kernel_size, params.stride, params.padding, params.dilation
    h, w = values.shape[-2:]
    flat = values.flatten(-2)
    index = indices.flatten(-2)
    if dilation[0] == 1 and dilation[1] == 1:  # every window holds a real pixel
        return flat.gather(-1, index).view(indices.shape)
    rows = _real_windows(h, indices.shape[-2], kernel_size[0], stride[0], padding[0], dilation[0], values.device)
    cols = _real_windows(w, indices.shape[-1], kernel_size[1], stride[1], padding[1], dilation[1], values.device)
    real = rows[:, None] & cols[None, :]
    gathered = flat.gather(-1, index.clamp(0, h * w - 1)).view(indices.shape)
    return torch.where(real, gathered, torch.zeros((), dtype=values.dtype, device=values.device))


class MaxPool2dFunction(torch.autograd.Function):
    """P = max over each window, with argmax indices; ∂L/∂X routes ∂L/∂P to the argmax; the tangent
    of P is the tangent of X at the argmax."""

    generate_vmap_rule = True

    @staticmethod
    def forward(input, params):
        return below_autograd(ops.max_pool2d_with_indices, input, *params.args())

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, params = inputs
        ctx.save_for_backward(input, output[1])
        ctx.save_for_forward(input, output[1])
        ctx.params = params
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, grad_output, _grad_indices):
        input, indices = ctx.saved_tensors
        grad_input = None
        if ctx.needs_input_grad[0]:
            grad_input = call("max_pool2d_backward", grad_output, input, indices, *ctx.params.args())
        return grad_input, None

    @staticmethod
    def jvp(ctx, input_t, _):
        _, indices = ctx.saved_tensors
        return gather_at_argmax(input_t, indices, ctx.params), None


class MaxPool2dBackwardFunction(torch.autograd.Function):
    """∂L/∂X = max_pool2d_backward(G, indices): linear in G (X gives only the shape); its gradient
    with respect to G gathers ∂L/∂(∂L/∂X) at the same indices. The argmax does not move under an
    infinitesimal change of X, so there is no gradient with respect to X."""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad_output, input, indices, params):
        return below_autograd(ops.max_pool2d_backward, grad_output, input, indices, *params.args())

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad_output, input, indices, params = inputs
        ctx.save_for_backward(input, indices)
        ctx.save_for_forward(input, indices)
        ctx.params = params

    @staticmethod
    def backward(ctx, grad_grad_input):
        _, indices = ctx.saved_tensors
        gg_output = None
        if ctx.needs_input_grad[0]:
            gg_output = gather_at_argmax(grad_grad_input, indices, ctx.params)
        return gg_output, None, None, None

    @staticmethod
    def jvp(ctx, grad_output_t, *_):
        input, indices = ctx.saved_tensors
        if grad_output_t is None:  # only the shape-only input has a tangent
            return torch.zeros_like(input)
        return call("max_pool2d_backward", grad_output_t, input, indices, *ctx.params.args())
