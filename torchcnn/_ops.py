"""Autograd, forward-mode AD, vmap, autocast and tracing for the compiled ops in ``torch.ops.torchcnn``.

Each op is wrapped by one :class:`torch.autograd.Function`. Its ``backward`` and ``jvp`` are written
with the other Functions — the gradient of a convolution is again a convolution, the pooling
gradient's is a gather by the same indices — so gradients of any order, forward-mode AD and their
mixes all run torchcnn's kernels. ``generate_vmap_rule`` lets ``torch.func.vmap`` run a Function
by the ops' own vmap rules (below), which fold the vmapped dimension into the batch, or, when a
weight is vmapped too (per-sample gradients), into the channels as extra groups.

The same ``setup_context``/``backward`` pairs are registered on the ops themselves (as
``torch.library.register_autograd`` would, plus a refusal of forward-mode AD), so
``torch.ops.torchcnn.*`` called directly is differentiable to any order in reverse mode as well;
that is the route ``torch.compile`` takes (Dynamo does not trace a Function with a custom
``jvp``), with the fake kernels below for shapes. conv2d follows
torch's autocast policy (it runs in the autocast dtype); max_pool2d runs in its input's dtype.
"""

from __future__ import annotations

import dataclasses

import torch
import torch._library.autograd
from torch.autograd import forward_ad
from torch._prims_common import suggest_memory_format

from . import _extension  # noqa: F401  (loads torch.ops.torchcnn)

ops = torch.ops.torchcnn


# --------------------------------------------------------------------------------------------
# Shapes and memory formats (the same rules as csrc/shapes.h, written for SymInts). Arguments left
# at their schema defaults may be left out of the call, hence the defaults here.


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


def conv2d_memory_format(input, weight):
    """torch's rule for a convolution's output and gradients: channels_last if the input or the
    weight is channels_last — except float64 on CUDA, which cuDNN computes contiguous."""
    channels_last = torch.channels_last
    if input.device.type == "cuda" and input.dtype == torch.float64:
        return torch.contiguous_format
    if suggest_memory_format(input) == channels_last or suggest_memory_format(weight) == channels_last:
        return channels_last
    return torch.contiguous_format


def _empty(like, shape, memory_format, dtype=None):
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device, memory_format=memory_format)


@torch.library.register_fake("torchcnn::conv2d")
def _conv2d_fake(input, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1):
    shape = _conv2d_output_shape(input, weight, stride, padding, dilation)
    return _empty(input, shape, conv2d_memory_format(input, weight))


@torch.library.register_fake("torchcnn::conv2d_backward_input")
def _conv2d_backward_input_fake(grad_output, input, weight, stride, padding, dilation, groups):
    return _empty(input, input.shape, conv2d_memory_format(input, weight))


@torch.library.register_fake("torchcnn::conv2d_backward_weight")
def _conv2d_backward_weight_fake(grad_output, input, weight, stride, padding, dilation, groups):
    return _empty(weight, weight.shape, conv2d_memory_format(input, weight))


@torch.library.register_fake("torchcnn::max_pool2d_with_indices")
def _max_pool2d_fake(input, kernel_size, stride, padding=(0, 0), dilation=(1, 1), ceil_mode=False):
    torch._check(input.dim() == 4, lambda: f"max_pool2d: expected input to be 4-D but got {input.dim()}-D")
    out_h, out_w = (
        _window_output_size(input.shape[2 + i], kernel_size[i], stride[i], padding[i], dilation[i], ceil_mode)
        for i in range(2)
    )
    shape = (input.shape[0], input.shape[1], out_h, out_w)
    memory_format = suggest_memory_format(input)
    return _empty(input, shape, memory_format), _empty(input, shape, memory_format, dtype=torch.long)


@torch.library.register_fake("torchcnn::max_pool2d_backward")
def _max_pool2d_backward_fake(grad_output, input, indices, kernel_size, stride, padding, dilation, ceil_mode):
    return _empty(input, input.shape, suggest_memory_format(input))


# --------------------------------------------------------------------------------------------
# Autograd: one Function per op, each formula written once. The Functions take an op's tensors and
# then its other arguments as one object (torch.func treats a tuple of ints as several inputs).


@dataclasses.dataclass(frozen=True)
class Conv2dParams:
    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int

    def args(self):
        return (self.stride, self.padding, self.dilation, self.groups)


@dataclasses.dataclass(frozen=True)
class MaxPool2dParams:
    kernel_size: tuple
    stride: tuple
    padding: tuple
    dilation: tuple
    ceil_mode: bool

    def args(self):
        return (self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode)


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
        return ops.conv2d(input, weight, bias, *params.args())

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
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_input = Conv2dBackwardInputFunction.apply(grad_output, input, weight, ctx.params)
        if ctx.needs_input_grad[1]:
            grad_weight = Conv2dBackwardWeightFunction.apply(grad_output, input, weight, ctx.params)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_output.sum((0, 2, 3))
        return grad_input, grad_weight, grad_bias, None

    @staticmethod
    def jvp(ctx, input_t, weight_t, bias_t, _):
        input, weight = ctx.saved_tensors
        return _sum(
            None if input_t is None else Conv2dFunction.apply(input_t, weight, None, ctx.params),
            None if weight_t is None else Conv2dFunction.apply(input, weight_t, None, ctx.params),
            None if bias_t is None else bias_t.view(1, -1, 1, 1).expand(ctx.output_shape),
            zeros=lambda: None,
        )


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
        return ops.conv2d_backward_input(grad_output, input, weight, *params.args())

    @staticmethod
    def backward(ctx, grad_grad_input):
        grad_output, input, weight = ctx.saved_tensors
        gg_output = gg_weight = None
        if ctx.needs_input_grad[0]:
            gg_output = Conv2dFunction.apply(grad_grad_input, weight, None, ctx.params)
        if ctx.needs_input_grad[2]:
            gg_weight = Conv2dBackwardWeightFunction.apply(grad_output, grad_grad_input, weight, ctx.params)
        return gg_output, None, gg_weight, None

    @staticmethod
    def jvp(ctx, grad_output_t, input_t, weight_t, _):
        grad_output, input, weight = ctx.saved_tensors
        apply = Conv2dBackwardInputFunction.apply
        return _sum(None if grad_output_t is None else apply(grad_output_t, input, weight, ctx.params),
                    None if weight_t is None else apply(grad_output, input, weight_t, ctx.params),
                    zeros=lambda: torch.zeros_like(input))


class Conv2dBackwardWeightFunction(_Conv2dGradientFunction):
    """∂L/∂W = conv2d_backward_weight(G, X): linear in G and in X (W gives only the shape). Its
    gradients: with respect to G, conv2d(X, ∂L/∂(∂L/∂W)); with respect to X,
    conv2d_backward_input(G, ∂L/∂(∂L/∂W))."""

    @staticmethod
    def forward(grad_output, input, weight, params):
        return ops.conv2d_backward_weight(grad_output, input, weight, *params.args())

    @staticmethod
    def backward(ctx, grad_grad_weight):
        grad_output, input, weight = ctx.saved_tensors
        gg_output = gg_input = None
        if ctx.needs_input_grad[0]:
            gg_output = Conv2dFunction.apply(input, grad_grad_weight, None, ctx.params)
        if ctx.needs_input_grad[1]:
            gg_input = Conv2dBackwardInputFunction.apply(grad_output, input, grad_grad_weight, ctx.params)
        return gg_output, gg_input, None, None

    @staticmethod
    def jvp(ctx, grad_output_t, input_t, weight_t, _):
        grad_output, input, weight = ctx.saved_tensors
        apply = Conv2dBackwardWeightFunction.apply
        return _sum(None if grad_output_t is None else apply(grad_output_t, input, weight, ctx.params),
                    None if input_t is None else apply(grad_output, input_t, weight, ctx.params),
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
        return ops.max_pool2d_with_indices(input, *params.args())

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
            grad_input = MaxPool2dBackwardFunction.apply(grad_output, input, indices, ctx.params)
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
        return ops.max_pool2d_backward(grad_output, input, indices, *params.args())

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
        return MaxPool2dBackwardFunction.apply(grad_output_t, input, indices, ctx.params)


# The same formulas for the ops called directly, in reverse mode (torch.compile traces the ops
# this way): the op's arguments are the Function's tensors followed by its parameters, spelled
# out. torch.library.register_autograd would do, but a custom op reached by forward-mode AD drops
# the tangent without a word; these kernels refuse it, naming the route that supports it.
_LIBRARY = torch.library.Library("torchcnn", "IMPL")  # this module's kernel registrations


def _register_op_autograd(name, function, tensors, params_class):
    def setup_context(ctx, inputs, output):
        function.setup_context(ctx, (*inputs[:tensors], params_class(*inputs[tensors:])), output)

    def backward(ctx, *grads):
        return (*function.backward(ctx, *grads)[:tensors], *[None] * len(dataclasses.fields(params_class)))

    op = getattr(ops, name).default
    reverse = torch._library.autograd.make_autograd_impl(op, torch._library.autograd.Info(backward, setup_context))
    public = {"conv2d": "conv2d", "max_pool2d_with_indices": "max_pool2d"}.get(name)

    def kernel(keyset, *args):
        if any(isinstance(a, torch.Tensor) and forward_ad.unpack_dual(a).tangent is not None for a in args):
            route = f"call torchcnn.functional.{public} (or a torchcnn.nn layer)" if public else \
                "differentiate the torchcnn.functional op it is the gradient of"
            raise NotImplementedError(
                f"torch.ops.torchcnn.{name} called directly supports reverse-mode autograd only, not forward-mode "
                f"AD (torch.func.jvp, jacfwd, torch.autograd.forward_ad): {route}, whose forward-mode AD works")
        return reverse(keyset, *args)

    _LIBRARY.impl(name, kernel, "Autograd", with_keyset=True)


for _name, _function, _tensors, _params in [
    ("conv2d", Conv2dFunction, 3, Conv2dParams),
    ("conv2d_backward_input", Conv2dBackwardInputFunction, 3, Conv2dParams),
    ("conv2d_backward_weight", Conv2dBackwardWeightFunction, 3, Conv2dParams),
    ("max_pool2d_with_indices", MaxPool2dFunction, 1, MaxPool2dParams),
    ("max_pool2d_backward", MaxPool2dBackwardFunction, 3, MaxPool2dParams),
]:
    _register_op_autograd(_name, _function, _tensors, _params)


# --------------------------------------------------------------------------------------------
# vmap: the vmapped dimension B is folded into the batch (N → B·N) when only images and their
# gradients are vmapped, and into the channels (C → B·C, groups → B·groups) when a weight is, so
# that each of the B problems meets its own weight in one call.


def _front(t, dim, size):
    """t with its vmapped dimension first, or expanded to `size` copies if it is not vmapped."""
    return t.movedim(dim, 0) if dim is not None else t.expand(size, *t.shape)


def _logical(t, dim):
    """One of the B problems' tensors (for ops that read only its shape)."""
    return t if dim is None else t.select(dim, 0)


def _into_channels(t):
    """(B, N, C, H, W) → (N, B·C, H, W)."""
    return t.transpose(0, 1).flatten(1, 2)


def _from_channels(t, size):
    """(N, B·C, H, W) → (B, N, C, H, W)."""
    return t.unflatten(1, (size, t.shape[1] // size)).transpose(0, 1)


def _from_batch(t, size, batch):
    """(B·N, ...) → (B, N, ...); N is given, since it may be 0."""
    return t.unflatten(0, (size, batch))


def _shape_only(like, shape):
    return like.new_empty(shape)


@torch.library.register_vmap("torchcnn::conv2d")
def _conv2d_vmap(info, in_dims, input, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1):
    size = info.batch_size
    x_dim, w_dim, b_dim = (*in_dims, None)[:3]  # a bias left at its default may not be passed at all
    if w_dim is None and b_dim is None:
        x = _front(input, x_dim, size)
        y = ops.conv2d(x.flatten(0, 1), weight, bias, stride, padding, dilation, groups)
        return _from_batch(y, size, x.shape[1]), 0
    x = _into_channels(_front(input, x_dim, size))
    w = _front(weight, w_dim, size).flatten(0, 1)
    b = None if bias is None else _front(bias, b_dim, size).flatten()
    y = ops.conv2d(x, w, b, stride, padding, dilation, groups * size)
    return _from_channels(y, size), 0


@torch.library.register_vmap("torchcnn::conv2d_backward_input")
def _conv2d_backward_input_vmap(info, in_dims, grad_output, input, weight, stride, padding, dilation, groups):
    size = info.batch_size
    g_dim, x_dim, w_dim = in_dims[:3]
    x = _logical(input, x_dim)
    if g_dim is None and w_dim is None:
        return ops.conv2d_backward_input(grad_output, x, weight, stride, padding, dilation, groups), None
    if w_dim is None:
        g = _front(grad_output, g_dim, size).flatten(0, 1)
        grad_input = ops.conv2d_backward_input(g, _shape_only(x, (size * x.shape[0], *x.shape[1:])), weight, stride,
                                               padding, dilation, groups)
        return _from_batch(grad_input, size, x.shape[0]), 0
    g = _into_channels(_front(grad_output, g_dim, size))
    x = _shape_only(x, (x.shape[0], size * x.shape[1], *x.shape[2:]))
    w = _front(weight, w_dim, size).flatten(0, 1)
    return _from_channels(ops.conv2d_backward_input(g, x, w, stride, padding, dilation, groups * size), size), 0


@torch.library.register_vmap("torchcnn::conv2d_backward_weight")
def _conv2d_backward_weight_vmap(info, in_dims, grad_output, input, weight, stride, padding, dilation, groups):
    size = info.batch_size
    g_dim, x_dim, w_dim = in_dims[:3]
    w = _logical(weight, w_dim)
    if g_dim is None and x_dim is None:
        return ops.conv2d_backward_weight(grad_output, input, w, stride, padding, dilation, groups), None
    g = _into_channels(_front(grad_output, g_dim, size))
    x = _into_channels(_front(input, x_dim, size))
    w = _shape_only(w, (size * w.shape[0], *w.shape[1:]))
    grad_weight = ops.conv2d_backward_weight(g, x, w, stride, padding, dilation, groups * size)
    return _from_batch(grad_weight, size, w.shape[0] // size), 0


@torch.library.register_vmap("torchcnn::max_pool2d_with_indices")
def _max_pool2d_vmap(info, in_dims, input, kernel_size, stride, padding=(0, 0), dilation=(1, 1), ceil_mode=False):
    size = info.batch_size
    x = _front(input, in_dims[0], size)
    output, indices = ops.max_pool2d_with_indices(x.flatten(0, 1), kernel_size, stride, padding, dilation, ceil_mode)
    return (_from_batch(output, size, x.shape[1]), _from_batch(indices, size, x.shape[1])), (0, 0)


@torch.library.register_vmap("torchcnn::max_pool2d_backward")
def _max_pool2d_backward_vmap(info, in_dims, grad_output, input, indices, kernel_size, stride, padding, dilation,
                              ceil_mode):
    size = info.batch_size
    g_dim, x_dim, i_dim = in_dims[:3]
    x = _logical(input, x_dim)
    if g_dim is None and i_dim is None:
        return ops.max_pool2d_backward(grad_output, x, indices, kernel_size, stride, padding, dilation,
                                       ceil_mode), None
    g = _front(grad_output, g_dim, size).flatten(0, 1)
    i = _front(indices, i_dim, size).flatten(0, 1)
    grad_input = ops.max_pool2d_backward(g, _shape_only(x, (size * x.shape[0], *x.shape[1:])), i, kernel_size, stride,
                                         padding, dilation, ceil_mode)
    return _from_batch(grad_input, size, x.shape[0]), 0


# --------------------------------------------------------------------------------------------
# Autocast: torch's policy for convolutions — inside torch.autocast, conv2d runs in the autocast
# dtype (its floating inputs cast to it); max_pool2d has no autocast rule and runs in its input's
# dtype, as torch's does.


def autocast(*tensors):
    """conv2d's tensors (the first one given, None allowed after it) as the autocast of their device
    has them: cast to its dtype where it is enabled, as they are elsewhere."""
    device_type = tensors[0].device.type
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return tensors
    return _cast(tensors, torch.get_autocast_dtype(device_type))


def _cast(values, dtype):
    """Floating tensors to `dtype`, except float64, which autocast leaves alone (as torch's does)."""
    return [v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dtype != torch.float64 else v
            for v in values]


def _register_autocast(name):
    op = getattr(ops, name).default
    for device_type in ("cpu", "cuda"):
        key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        exclude = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

        def kernel(*args, _device_type=device_type, _exclude=exclude):
            dtype = torch.get_autocast_dtype(_device_type)
            with torch._C._ExcludeDispatchKeyGuard(_exclude):
                return op(*_cast(args, dtype))

        op.py_impl(getattr(torch._C.DispatchKey, key))(kernel)
        _LIBRARY.impl(name, lambda _keyset, *args, _kernel=kernel: _kernel(*args), key, with_keyset=True)


_register_autocast("conv2d")
