"""Autograd for the ops: one :class:`torch.autograd.Function` per op, and the op's Autograd kernel.

There is one route to every formula. Calling an op (``torch.ops.torchcnn.conv2d``, which is what
:mod:`torchcnn.functional` and :mod:`torchcnn.nn` do) reaches its Autograd kernel, registered
below; when a gradient or a forward-mode tangent is needed there, it runs the op's Function,
whose ``forward`` runs the op's kernels below autograd and whose ``backward`` and ``jvp`` are
written with the ops themselves — the gradient of a convolution is again a convolution, the
pooling gradient's is a gather by the same indices — so gradients of any order, forward-mode AD
and their mixes all run torchcnn's kernels, and ``torch.compile`` traces the same route.
``generate_vmap_rule`` lets ``torch.func`` run a Function under vmap by the ops' own vmap rules
(:mod:`torchcnn._ops.vmap`). ``Conv2dFunction.apply(x, w, b, Conv2dParams(...))`` is the same
computation as the op.

cross_entropy's Autograd kernel for CPU and CUDA tensors is C++ (csrc/autograd/cross_entropy_function.cpp):
for an op this small the Python kernel cost more than the op. It records the same backward as
:class:`CrossEntropyFunction` (cross_entropy_backward, or :func:`cross_entropy_gradient` through
the op ``_cross_entropy_gradient`` when differentiated again) and hands forward-mode tangents and
torch.func's transforms to the Python kernel registered here.

One exception to the single route: torch.func's differentiating transforms (grad, jvp, jacrev,
...) can take a Function only where it is applied from Python, not from inside a dispatcher
kernel, so while any torch.func transform is active :mod:`torchcnn.functional` applies the
Function itself (:func:`call`). The formulas are the same either way.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from torch.autograd import forward_ad

from .autocast import AUTOCAST_OPS, autocast
from .schemas import _opmath, conv2d_output_shape, ops


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
        return MaxPool2dParams((2, 2), (2, 2), (0, 0), (1, 1), self.ceil_mode)


@dataclasses.dataclass(frozen=True)
class MaxPool2dParams:
    kernel_size: tuple
    stride: tuple
    padding: tuple
    dilation: tuple
    ceil_mode: bool

    def args(self):
        return (self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode)


@dataclasses.dataclass(frozen=True)
class CrossEntropyParams:
    reduction: str
    ignore_index: int
    label_smoothing: float

    def args(self):
        return (self.reduction, self.ignore_index, self.label_smoothing)


def call(name, *args):
    """Run op `name` on its full argument list: the op itself, or, while torch.func transforms are
    active, its Function (with the Autocast key's casts, which applying a Function bypasses)."""
    if not torch._C._are_functorch_transforms_active():
        return getattr(ops, name)(*args)
    function, tensors, params = FUNCTIONS[name]
    inputs = args[:tensors]
    if name in AUTOCAST_OPS:
        inputs = autocast(*inputs)
    return function.apply(*inputs, params(*args[tensors:]))


def _below_autograd(op, *args):
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def _sum(*terms, zeros):
    """The sum of the terms that are not None; `zeros()` if all are (the tangent of an output
    that depends only on arguments whose tangents are not given, e.g. a gradient op's shape-only
    argument in forward-over-reverse AD)."""
    present = [t for t in terms if t is not None]
    if not present:
        return zeros()
    total = present[0]
    for t in present[1:]:
        total = total + t
    return total


class Conv2dFunction(torch.autograd.Function):
    """Y = conv2d(X, W) + b. ∂L/∂X = conv2d_backward_input(∂L/∂Y, W), ∂L/∂W =
    conv2d_backward_weight(∂L/∂Y, X), ∂L/∂b = Σ ∂L/∂Y; the tangent of Y is
    conv2d(Ẋ, W) + conv2d(X, Ẇ) + ḃ."""

    generate_vmap_rule = True

    @staticmethod
    def forward(input, weight, bias, params):
        return _below_autograd(ops.conv2d, input, weight, bias, *params.args())

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
    return _sum(
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
        return _below_autograd(ops.conv2d_relu, input, weight, bias, *params.args())

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
        return _below_autograd(ops.conv2d_relu_max_pool2d, input, weight, bias, *params.args())

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
        input, weight, indices, passes = ctx.saved_tensors
        mask = _gradient_mask(ctx)
        if _sparse_backward_applies(grad_output, input, weight, ctx.params):
            # On the CPU, one op from the pooled gradient: the non-zeros of ∂L/∂Y, one per window.
            grads = _below_autograd(ops._cpu_conv2d_relu_max_pool2d_backward, grad_output, input, weight, indices,
                                    passes, *ctx.params.args(), mask)
            return *(grad if wanted else None for grad, wanted in zip(grads, mask)), None
        return *conv2d_relu_max_pool2d_gradients(grad_output, input, weight, indices, passes, ctx.params, mask), None

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


def _sparse_backward_applies(grad_output, input, weight, params) -> bool:
    """Whether conv2d_relu_max_pool2d's backward takes the CPU's sparse op: CPU tensors, a backward
    that is not itself differentiated (no create_graph, no tangents, no torch.func transform: the
    dense route's ops carry those derivatives), and filters whose contiguous pieces are at least
    16 values long (a filter row, KW · C, with one group and no horizontal dilation; else one
    tap's C/groups), which the sparse op's vector loops need to beat the dense route's GEMMs (the
    MNIST model's second layer: 3 · 32 = 96; its first, 3 · 1 = 3, takes the dense route)."""
    if grad_output.device.type != "cpu" or torch.is_grad_enabled() or torch._C._are_functorch_transforms_active():
        return False
    group_channels = input.shape[1] // params.groups
    piece = group_channels * weight.shape[3] if params.groups == 1 and params.dilation[1] == 1 else group_channels
    return piece >= 16 and not _tracks_derivatives((grad_output, input, weight))


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
        return _below_autograd(ops.conv2d_backward_input, grad_output, input, weight, *params.args())

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
        return _sum(None if grad_output_t is None else op(grad_output_t, input, weight, *args),
                    None if weight_t is None else op(grad_output, input, weight_t, *args),
                    zeros=lambda: torch.zeros_like(input))


class Conv2dBackwardWeightFunction(_Conv2dGradientFunction):
    """∂L/∂W = conv2d_backward_weight(G, X): linear in G and in X (W gives only the shape). Its
    gradients: with respect to G, conv2d(X, ∂L/∂(∂L/∂W)); with respect to X,
    conv2d_backward_input(G, ∂L/∂(∂L/∂W))."""

    @staticmethod
    def forward(grad_output, input, weight, params):
        return _below_autograd(ops.conv2d_backward_weight, grad_output, input, weight, *params.args())

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
        return _sum(None if grad_output_t is None else op(grad_output_t, input, weight, *args),
                    None if input_t is None else op(grad_output, input_t, weight, *args),
                    zeros=lambda: torch.zeros_like(weight))


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
        return _below_autograd(ops.max_pool2d_with_indices, input, *params.args())

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
        return _below_autograd(ops.max_pool2d_backward, grad_output, input, indices, *params.args())

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


@dataclasses.dataclass(frozen=True)
class NoParams:
    """The parameters of an op that has none (relu)."""

    def args(self):
        return ()


class ReLUFunction(torch.autograd.Function):
    """A = relu(Z) and M = (Z ≥ 0), where the design notes' ReLU passes its gradient: ∂L/∂Z = M ⊙ ∂L/∂A,
    and the tangent of A is M ⊙ Ż. Only M is kept for the backward, not Z."""

    generate_vmap_rule = True

    @staticmethod
    def forward(input, params):
        return _below_autograd(ops.relu, input)

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
        return _below_autograd(ops.relu_backward, grad_output, passes)

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


class CrossEntropyFunction(torch.autograd.Function):
    """L = softmax + cross-entropy of logits z (rows, classes) and class-index targets, reduced:
    ∂L/∂z = (ŷ − y) · w scaled by the reduction, one pass of cross_entropy_backward from the
    forward's log Σ exp. Differentiated again (create_graph), the backward is the same formula in
    torch's ops (:func:`cross_entropy_gradient`), which autograd can differentiate. The class weights
    and targets take no gradient here: torchcnn.functional.cross_entropy computes a loss whose
    weight requires one by its composition of torch ops instead."""

    @staticmethod
    def forward(input, target, weight, params):
        return _below_autograd(ops.cross_entropy, input, target, weight, *params.args())

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
        if torch.is_grad_enabled() or _tracks_derivatives((grad_loss, input, weight)):
            # create_graph, or tangents to carry (forward-over-reverse): a formula autograd can
            # differentiate again; the op below autograd would drop them.
            grad = cross_entropy_gradient(grad_loss, input, target, weight, total_weight, ctx.params)
        else:
            grad = _below_autograd(ops.cross_entropy_backward, grad_loss, input, target, weight, log_sum_exp,
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
        per_row = _below_autograd(ops.cross_entropy_backward, rows, input, target, weight, log_sum_exp, total_weight,
                                  "none", ignore_index, smoothing)
        tangent = (per_row * input_t).sum(1)
        if reduction != "none":
            tangent = tangent.sum() / (total_weight if reduction == "mean" else 1)
        return tangent.to(input.dtype), None, None


def cross_entropy_gradient(grad_loss, input, target, weight, total_weight, params):
    """cross_entropy_backward's formula (csrc/cross_entropy_row.h) in torch's ops."""
    reduction, ignore_index, smoothing = params.args()
    classes = input.shape[1]
    ignored = target == ignore_index
    safe_target = target.masked_fill(ignored, 0)
    weight = input.new_ones(classes) if weight is None else weight
    probs = torch.softmax(input.to(_opmath(input.dtype)), 1)
    onehot = torch.nn.functional.one_hot(safe_target, classes).to(probs.dtype)
    hard = ((1 - smoothing) * weight[safe_target]).to(probs.dtype)
    d = hard[:, None] * (probs - onehot)
    if smoothing > 0:
        d = d + smoothing / classes * (weight.sum() * probs - weight)
    scale = grad_loss.to(probs.dtype)
    if reduction == "mean":
        scale = scale / total_weight
    scale = scale.expand(input.shape[:1]) if reduction != "none" else scale
    return torch.where(ignored[:, None], 0, d * scale[:, None]).to(input.dtype)


# --------------------------------------------------------------------------------------------
# The ops' Autograd kernels: the op's arguments are its Function's tensors followed by its other
# arguments spelled out. Without a gradient or tangent to track, the call goes straight on to the
# kernels below autograd, as torch.library.register_autograd's kernels do (that API has no jvp).

FUNCTIONS = {  # op name -> (Function, number of leading tensor arguments, parameter class)
    "conv2d": (Conv2dFunction, 3, Conv2dParams),
    "conv2d_relu": (Conv2dReLUFunction, 3, Conv2dParams),
    "conv2d_relu_max_pool2d": (Conv2dReLUMaxPool2dFunction, 3, Conv2dPoolParams),
    "conv2d_backward_input": (Conv2dBackwardInputFunction, 3, Conv2dParams),
    "conv2d_backward_weight": (Conv2dBackwardWeightFunction, 3, Conv2dParams),
    "max_pool2d_with_indices": (MaxPool2dFunction, 1, MaxPool2dParams),
    "max_pool2d_backward": (MaxPool2dBackwardFunction, 3, MaxPool2dParams),
    "cross_entropy": (CrossEntropyFunction, 3, CrossEntropyParams),
    "relu": (ReLUFunction, 1, NoParams),
    "relu_backward": (ReLUBackwardFunction, 2, NoParams),
}


def _in_kernel(function):
    """`function` as the Autograd kernel runs it: the same forward, backward and jvp, with the
    context set up inside forward. Inside a dispatcher kernel torch.func's transforms are already
    being applied level by level, and a Function with a separate setup_context would hand itself to
    them again (torch.func's custom_function_call); this form is plain autograd at each level, as
    the kernels that torch.library.register_autograd makes are."""

    def forward(ctx, *inputs):
        output = function.forward(*inputs)
        function.setup_context(ctx, inputs, output)
        return output

    return type(function.__name__ + "Kernel", (torch.autograd.Function,), {
        "forward": staticmethod(forward),
        "backward": staticmethod(function.backward),
        "jvp": staticmethod(function.jvp),
    })


def _tracks_derivatives(tensors) -> bool:
    """Whether autograd must record the call: a gradient is wanted, or a tangent is attached."""
    present = [t for t in tensors if isinstance(t, torch.Tensor)]
    if torch.is_grad_enabled() and any(t.requires_grad for t in present):
        return True
    return any(forward_ad.unpack_dual(t).tangent is not None for t in present)


def _pairs(values):
    """An int[2] argument as the dispatcher may hand it over (a list) as a tuple."""
    return tuple(values) if isinstance(values, (list, tuple)) else values


def register(library: torch.library.Library) -> None:
    after_autograd = torch._C._after_autograd_keyset
    for name, (function, tensors, params_class) in FUNCTIONS.items():
        op = getattr(ops, name).default
        defaults = [a.default_value for a in op._schema.arguments]
        in_kernel = _in_kernel(function)

        def kernel(keyset, *args, _op=op, _name=name, _function=in_kernel, _tensors=tensors,
                   _params=params_class, _defaults=defaults):
            if not _tracks_derivatives(args[:_tensors]):
                with torch._C._AutoDispatchBelowAutograd():
                    return _op.redispatch(keyset & after_autograd, *args)
            if torch._C._are_functorch_transforms_active():
                raise NotImplementedError(
                    f"torch.ops.torchcnn.{_name} called directly inside torch.func.grad/jvp/jacrev/...: "
                    f"call it through torchcnn.functional (or a torchcnn.nn layer), or apply its Function "
                    f"(torchcnn._ops.{FUNCTIONS[_name][0].__name__}), which torch.func can differentiate; "
                    f"torch.func.vmap alone works on the op")
            args = (*args, *_defaults[len(args):])  # arguments left at their defaults are not passed
            params = _params(*(_pairs(a) for a in args[_tensors:]))
            return _function.apply(*args[:_tensors], params)

        library.impl(name, kernel, "Autograd", with_keyset=True)

    def cross_entropy_backward(keyset, *args):
        if _tracks_derivatives(args[:5]):
            raise NotImplementedError(
                "torch.ops.torchcnn.cross_entropy_backward is not differentiable itself: differentiate "
                "torchcnn.functional.cross_entropy with create_graph=True, whose backward then uses a "
                "differentiable formula")
        with torch._C._AutoDispatchBelowAutograd():
            return ops.cross_entropy_backward.default.redispatch(keyset & after_autograd, *args)

    library.impl("cross_entropy_backward", cross_entropy_backward, "Autograd", with_keyset=True)

    def gradient(grad_loss, input, target, weight, total_weight, reduction, ignore_index, label_smoothing):
        params = CrossEntropyParams(reduction, ignore_index, label_smoothing)
        return cross_entropy_gradient(grad_loss, input, target, weight, total_weight, params)

    library.impl("_cross_entropy_gradient", gradient, "CompositeImplicitAutograd")
