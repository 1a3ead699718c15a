"""Autograd formulas of the convolutions: conv2d, the fused conv2d_relu and
conv2d_relu_max_pool2d, and conv2d's two gradient ops, each differentiable again."""

from __future__ import annotations

import functools

import torch

from .max_pool2d import gather_at_argmax
from .routing import below_autograd, call, sum_present
from .schemas import conv2d_output_shape, ops


class Conv2dFunction(torch.autograd.Function):
    """Y = conv2d(X, W) + b. ∂L/∂X = conv2d_backward_input(∂L/∂Y, W), ∂L/∂W =
    conv2d_backward_weight(∂L/∂Y, X), ∂L/∂b = Σ ∂L/∂Y; the tangent of Y is
    conv2d(Ẋ, W) + conv2d(X, Ẇ) + ḃ."""

    generate_vmap_rule = True

    @staticmethod
    def forward(input, weight, bias, params):
        return below_autograd(ops.conv2d, input, weight, bias, *params.args())

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, params = inputs
        ctx.save_for_backward(input, weight)
        ctx.save_for_forward(input, weight)
        ctx.params = params
        ctx.has_bias = bias is not None
        ctx.output_shape = output.shape

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        return *_conv2d_gradients(grad_output, input, weight, ctx.params, _gradient_mask(ctx)), None

    @staticmethod
    def jvp(ctx, input_t, weight_t, bias_t, _):
        input, weight = ctx.saved_tensors
        return _conv2d_tangent(input, weight, input_t, weight_t, bias_t, ctx.params, ctx.output_shape)


def _gradient_mask(ctx):
    """Which of a convolution Function's (input, weight, bias) need a gradient."""
    return [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]


def _conv2d_gradients(grad_output, input, weight, params, mask):
    """conv2d's gradients (input, weight, bias) from ∂L/∂Y, None where `mask` is off."""
    args = params.args()
    return (call("conv2d_backward_input", grad_output, input, weight, *args) if mask[0] else None,
            call("conv2d_backward_weight", grad_output, input, weight, *args) if mask[1] else None,
            grad_output.sum((0, 2, 3)) if mask[2] else None)


def _conv2d_tangent(input, weight, input_t, weight_t, bias_t, params, output_shape):
    """Ẏ = conv2d(Ẋ, W) + conv2d(X, Ẇ) + ḃ, over the tangents given (None if there are none)."""
    args = params.args()
    return sum_present(
        None if input_t is None else call("conv2d", input_t, weight, None, *args),
        None if weight_t is None else call("conv2d", input, weight_t, None, *args),
        None if bias_t is None else bias_t.view(1, -1, 1, 1).expand(output_shape),
        zeros=lambda: None,
    )


def _conv2d_output_shape(input, weight, params):
    return conv2d_output_shape("conv2d", input, weight, None, *params.args())


class Conv2dReLUFunction(torch.autograd.Function):
    """A = relu(Y) with Y = conv2d(X, W) + b, and M = (Y ≥ 0), where the design notes' ReLU passes
    its gradient: ∂L/∂Y = M ⊙ ∂L/∂A, then conv2d's gradients; the tangent of A is M ⊙ Ẏ. M is
    piecewise constant in X, W and b: no gradient flows through it."""

    generate_vmap_rule = True

    @staticmethod
    def forward(input, weight, bias, params):
        return below_autograd(ops.conv2d_relu, input, weight, bias, *params.args())

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, params = inputs
        ctx.save_for_backward(input, weight, output[1])
        ctx.save_for_forward(input, weight, output[1])
        ctx.mark_non_differentiable(output[1])
        ctx.params = params
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, grad_output, _grad_passes):
        input, weight, passes = ctx.saved_tensors
        return *_conv2d_gradients(call("relu_backward", grad_output, passes), input, weight, ctx.params,
                                  _gradient_mask(ctx)), None

    @staticmethod
    def jvp(ctx, input_t, weight_t, bias_t, _):
        input, weight, passes = ctx.saved_tensors
        tangent = _conv2d_tangent(input, weight, input_t, weight_t, bias_t, ctx.params, passes.shape)
        return call("relu_backward", tangent, passes), None


class Conv2dReLUMaxPool2dFunction(torch.autograd.Function):
    """P = the 2×2 max pool of relu(Y), Y = conv2d(X, W) + b, with the index of each max in Y's plane
    and M = whether the ReLU passes there: ∂L/∂Y = max_pool2d_backward(M ⊙ ∂L/∂P) — the pooled
    gradient routed to the argmax, never a ReLU output or gradient of Y's size — then conv2d's
    gradients; the tangent of P is M ⊙ Ẏ at the argmax."""

    generate_vmap_rule = True

    @staticmethod
    def forward(input, weight, bias, params):
        return below_autograd(ops.conv2d_relu_max_pool2d, input, weight, bias, *params.args())

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, params = inputs
        _, indices, passes = output
        ctx.save_for_backward(input, weight, indices, passes)
        ctx.save_for_forward(input, weight, indices, passes)
        ctx.mark_non_differentiable(indices, passes)
        ctx.params = params
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, grad_output, _grad_indices, _grad_passes):
        # The dense route, differentiable again: this kernel serves torch.func, forward-mode AD,
        # other devices and the first call in a process. (The C++ node of CPU tensors,
        # csrc/autograd/conv2d_function.cpp, takes the sparse op where nothing differentiates it.)
        input, weight, indices, passes = ctx.saved_tensors
        return *conv2d_relu_max_pool2d_gradients(grad_output, input, weight, indices, passes, ctx.params,
                                                 _gradient_mask(ctx)), None

    @staticmethod
    def jvp(ctx, input_t, weight_t, bias_t, _):
        input, weight, indices, passes = ctx.saved_tensors
        conv = ctx.params.conv()
        tangent = _conv2d_tangent(input, weight, input_t, weight_t, bias_t, conv,
                                  _conv2d_output_shape(input, weight, conv))
        return call("relu_backward", gather_at_argmax(tangent, indices, ctx.params.pool()), passes), None, None


def conv2d_relu_max_pool2d_gradients(grad_output, input, weight, indices, passes, params, mask):
    """conv2d_relu_max_pool2d's gradients (input, weight, bias; None where `mask` is off) by the
    dense route, which the GPU takes and which autograd can differentiate again: ∂L/∂Y =
    max_pool2d_backward(M ⊙ ∂L/∂P), then conv2d's gradient ops."""
    conv = params.conv()
    # max_pool2d_backward reads only the shape of its `input`, Y here: a stand-in of no storage.
    y_shape = grad_output.new_empty(()).expand(_conv2d_output_shape(input, weight, conv))
    grad_y = call("max_pool2d_backward", call("relu_backward", grad_output, passes), y_shape, indices,
                  *params.pool().args())
    return _conv2d_gradients(grad_y, input, weight, conv, mask)


class _Conv2dGradientFunction(torch.autograd.Function):
    """What the two gradient ops share: arguments (G, X, W, params), all three saved."""

    generate_vmap_rule = True

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad_output, input, weight, params = inputs
        ctx.save_for_backward(grad_output, input, weight)
        ctx.save_for_forward(grad_output, input, weight)
        ctx.params = params


class Conv2dBackwardInputFunction(_Conv2dGradientFunction):
    """∂L/∂X = conv2d_backward_input(G, W): linear in G and in W (X gives only the shape). Its
    gradients: with respect to G, conv2d(∂L/∂(∂L/∂X), W); with respect to W,
    conv2d_backward_weight(G, ∂L/∂(∂L/∂X))."""

    @staticmethod
    def forward(grad_output, input, weight, params):
        return below_autograd(ops.conv2d_backward_input, grad_output, input, weight, *params.args())

    @staticmethod
    def backward(ctx, grad_grad_input):
        grad_output, input, weight = ctx.saved_tensors
        args = ctx.params.args()
        gg_output = gg_weight = None
        if ctx.needs_input_grad[0]:
            gg_output = call("conv2d", grad_grad_input, weight, None, *args)
        if ctx.needs_input_grad[2]:
            gg_weight = call("conv2d_backward_weight", grad_output, grad_grad_input, weight, *args)
        return gg_output, None, gg_weight, None

    @staticmethod
    def jvp(ctx, grad_output_t, input_t, weight_t, _):
        grad_output, input, weight = ctx.saved_tensors
        args = ctx.params.args()
        op = functools.partial(call, "conv2d_backward_input")
        return sum_present(None if grad_output_t is None else op(grad_output_t, input, weight, *args),
                    None if weight_t is None else op(grad_output, input, weight_t, *args),
                    zeros=lambda: torch.zeros_like(input))


class Conv2dBackwardWeightFunction(_Conv2dGradientFunction):
    """∂L/∂W = conv2d_backward_weight(G, X): linear in G and in X (W gives only the shape). Its
    gradients: with respect to G, conv2d(X, ∂L/∂(∂L/∂W)); with respect to X,
    conv2d_backward_input(G, ∂L/∂(∂L/∂W))."""

    @staticmethod
    def forward(grad_output, input, weight, params):
        return below_autograd(ops.conv2d_backward_weight, grad_output, input, weight, *params.args())

    @staticmethod
    def backward(ctx, grad_grad_weight):
        grad_output, input, weight = ctx.saved_tensors
        args = ctx.params.args()
        gg_output = gg_input = None
        if ctx.needs_input_grad[0]:
            gg_output = call("conv2d", input, grad_grad_weight, None, *args)
        if ctx.needs_input_grad[1]:
            gg_input = call("conv2d_backward_input", grad_output, input, grad_grad_weight, *args)
        return gg_output, gg_input, None, None

    @staticmethod
    def jvp(ctx, grad_output_t, input_t, weight_t, _):
        grad_output, input, weight = ctx.saved_tensors
        args = ctx.params.args()
        op = functools.partial(call, "conv2d_backward_weight")
        return sum_present(None if grad_output_t is None else op(grad_output_t, input, weight, *args),
                    None if input_t is None else op(grad_output, input_t, weight, *args),
                    zeros=lambda: torch.zeros_like(weight))
