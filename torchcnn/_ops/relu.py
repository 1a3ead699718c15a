"""Autograd formulas of ReLU and its gradient: masks by M = (Z ≥ 0), the design notes' ReLU."""

from __future__ import annotations

import torch

from .routing import below_autograd, call
from .schemas import ops


class ReLUFunction(torch.autograd.Function):
    """A = relu(Z) and M = (Z ≥ 0), where the design notes' ReLU passes its gradient: ∂L/∂Z = M ⊙ ∂L/∂A,
    and the tangent of A is M ⊙ Ż. Only M is kept for the backward, not Z."""

    generate_vmap_rule = True

    @staticmethod
    def forward(input, params):
        return below_autograd(ops.relu, input)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output[1])
        ctx.save_for_forward(output[1])
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, grad_output, _grad_passes):
        (passes,) = ctx.saved_tensors
        return call("relu_backward", grad_output, passes), None

    @staticmethod
    def jvp(ctx, input_t, _):
        (passes,) = ctx.saved_tensors
        return call("relu_backward", input_t, passes), None


class ReLUBackwardFunction(torch.autograd.Function):
    """∂L/∂Z = M ⊙ ∂L/∂A (M where the ReLU passes): linear in ∂L/∂A, so its gradient and tangent are
    the same masking; M is a constant."""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad_output, passes, params):
        return below_autograd(ops.relu_backward, grad_output, passes)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])
        ctx.save_for_forward(inputs[1])

    @staticmethod
    def backward(ctx, grad_grad_input):
        (passes,) = ctx.saved_tensors
        return call("relu_backward", grad_grad_input, passes), None, None

    @staticmethod
    def jvp(ctx, grad_output_t, _passes_t, _):
        (passes,) = ctx.saved_tensors
        return call("relu_backward", grad_output_t, passes)
