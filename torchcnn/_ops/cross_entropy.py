"""Autograd formulas of softmax-cross-entropy.

cross_entropy's Autograd kernel for CPU and CUDA tensors is C++ (csrc/autograd/cross_entropy_function.cpp):
for an op this small the Python kernel cost more than the op. It records the same backward as
:class:`CrossEntropyFunction` (cross_entropy_backward, or :func:`cross_entropy_gradient` through
the op ``_cross_entropy_gradient`` when differentiated again) and hands forward-mode tangents and
torch.func's transforms to the Python kernel (registration.py).
"""

from __future__ import annotations

import torch

from .routing import below_autograd, tracks_derivatives
from .. import reference
from .schemas import ops


class CrossEntropyFunction(torch.autograd.Function):
    """L = softmax + cross-entropy of logits z (rows, classes) and class-index targets, reduced:
    ∂L/∂z = (ŷ − y) · w scaled by the reduction, one pass of cross_entropy_backward from the
    forward's log Σ exp. Differentiated again (create_graph), the backward is the reference's
    formula (:func:`cross_entropy_gradient`), which autograd can differentiate. The class weights
    and targets take no gradient here: torchcnn.functional.cross_entropy computes a loss whose
    weight requires one by the reference's formula instead."""

    @staticmethod
    def forward(input, target, weight, params):
        return below_autograd(ops.cross_entropy, input, target, weight, *params.args())

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, target, weight, params = inputs
        _, log_sum_exp, total_weight = output
        ctx.save_for_backward(input, target, weight, log_sum_exp, total_weight)
        ctx.save_for_forward(input, target, weight, log_sum_exp, total_weight)
        ctx.mark_non_differentiable(log_sum_exp, total_weight)
        ctx.params = params

    @staticmethod
    def backward(ctx, grad_loss, _grad_log_sum_exp, _grad_total_weight):
        input, target, weight, log_sum_exp, total_weight = ctx.saved_tensors
        if ctx.needs_input_grad[2]:
            raise NotImplementedError("torch.ops.torchcnn.cross_entropy: no gradient with respect to weight; "
                                      "torchcnn.functional.cross_entropy computes one")
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        if torch.is_grad_enabled() or tracks_derivatives((grad_loss, input, weight)):
            # create_graph, or tangents to carry (forward-over-reverse): a formula autograd can
            # differentiate again; the op below autograd would drop them.
            grad = cross_entropy_gradient(grad_loss, input, target, weight, total_weight, ctx.params)
        else:
            grad = below_autograd(ops.cross_entropy_backward, grad_loss, input, target, weight, log_sum_exp,
                                   total_weight, *ctx.params.args())
        return grad, None, None, None

    @staticmethod
    def jvp(ctx, input_t, target_t, weight_t, _):
        input, target, weight, log_sum_exp, total_weight = ctx.saved_tensors
        if weight_t is not None:
            raise NotImplementedError("torch.ops.torchcnn.cross_entropy: no derivative with respect to weight; "
                                      "torchcnn.functional.cross_entropy computes one")
        if input_t is None:
            return None, None, None
        reduction, ignore_index, smoothing = ctx.params.args()
        rows = input.new_ones(input.shape[:1])
        per_row = below_autograd(ops.cross_entropy_backward, rows, input, target, weight, log_sum_exp, total_weight,
                                  "none", ignore_index, smoothing)
        tangent = (per_row * input_t).sum(1)
        if reduction != "none":
            tangent = tangent.sum() / (total_weight if reduction == "mean" else 1)
        return tangent.to(input.dtype), None, None


def cross_entropy_gradient(grad_loss, input, target, weight, total_weight, params):
    """∂L/∂z by the reference's formula (torchcnn.reference.cross_entropy_backward, the formula
    of csrc/cross_entropy_row.h), with log Σ exp taken again from ``input`` instead of the
    forward's saved value, so that autograd sees all of ∂L/∂z's dependence on z."""
    log_sum_exp = reference.log_sum_exp(input.to(reference.opmath(input.dtype)))
    return reference.cross_entropy_backward(grad_loss, input, target, weight, log_sum_exp, total_weight,
                                            *params.args())
