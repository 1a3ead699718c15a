"""vmap rules for the ops: the vmapped dimension B is folded into the batch (N → B·N) when only
images and their gradients are vmapped, and into the channels (C → B·C, groups → B·groups) when a
weight is, so that each of the B problems meets its own weight in one call."""

from __future__ import annotations

import torch

from .schemas import ops

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


def _convolution_vmap(op, info, in_dims, input, weight, bias, stride, padding, dilation, groups, *rest):
    """The rule of every op that starts with a convolution (conv2d, conv2d_relu,
    conv2d_relu_max_pool2d): each output is (N, K, …), and pooling indices are within a plane, so
    all outputs unfold alike."""
    size = info.batch_size
    x_dim, w_dim, b_dim = (*in_dims, None)[:3]  # a bias left at its default may not be passed at all
    if w_dim is None and b_dim is None:
        x = _front(input, x_dim, size)
        out = op(x.flatten(0, 1), weight, bias, stride, padding, dilation, groups, *rest)
        return _each(out, lambda t: _from_batch(t, size, x.shape[1]))
    x = _into_channels(_front(input, x_dim, size))
    w = _front(weight, w_dim, size).flatten(0, 1)
    b = None if bias is None else _front(bias, b_dim, size).flatten()
    out = op(x, w, b, stride, padding, dilation, groups * size, *rest)
    return _each(out, lambda t: _from_channels(t, size))


def _each(out, unfold):
    """The vmap result of an op with one output or several, each unfolded by `unfold` to dim 0."""
    if isinstance(out, torch.Tensor):
        return unfold(out), 0
    return tuple(unfold(t) for t in out), (0,) * len(out)


@torch.library.register_vmap("torchcnn::conv2d")
def _conv2d_vmap(info, in_dims, input, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1):
    return _convolution_vmap(ops.conv2d, info, in_dims, input, weight, bias, stride, padding, dilation, groups)


@torch.library.register_vmap("torchcnn::conv2d_relu")
def _conv2d_relu_vmap(info, in_dims, input, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                      groups=1):
    return _convolution_vmap(ops.conv2d_relu, info, in_dims, input, weight, bias, stride, padding, dilation, groups)


@torch.library.register_vmap("torchcnn::conv2d_relu_max_pool2d")
def _conv2d_relu_max_pool2d_vmap(info, in_dims, input, weight, bias=None, stride=(1, 1), padding=(0, 0),
                                 dilation=(1, 1), groups=1, ceil_mode=False):
    return _convolution_vmap(ops.conv2d_relu_max_pool2d, info, in_dims, input, weight, bias, stride, padding,
                             dilation, groups, ceil_mode)


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




@torch.library.register_vmap("torchcnn::relu")
def _relu_vmap(info, in_dims, input):
    out, passes = ops.relu(input)  # elementwise: the vmapped dimension stays where it is
    return (out, passes), (in_dims[0], in_dims[0])


@torch.library.register_vmap("torchcnn::relu_backward")
def _relu_backward_vmap(info, in_dims, grad_output, passes):
    size = info.batch_size
    g_dim, p_dim = in_dims[:2]
    return ops.relu_backward(_front(grad_output, g_dim, size), _front(passes, p_dim, size)), 0
