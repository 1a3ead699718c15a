"""Every torchcnn op as the plain math: the oracle the kernels answer to, beside torch's built-ins.

Each function computes one equation of docs/math.md, with the indices the equation names, in the
same order: loops over filter taps, window positions and channels, with tensor arithmetic over the
batch inside. Nothing here calls torch's convolution, pooling, softmax or loss functions. The
functions take and return what the op of the same name in ``torch.ops.torchcnn`` does, so that a
test can put the two side by side; they are written for reading, and are fast enough for test sizes.
The loss's two functions are also torchcnn's own formulas where its op does not apply
(torchcnn.functional.cross_entropy with a weight that takes a gradient, and the differentiable
backward of torchcnn._ops.cross_entropy): they are differentiable, and cheap at any size.

Sums are taken in the order written, in the input's dtype (the loss's in float32 for the half
types, as its op does): the oracle is for float64 and float32. Inputs are batched: (N, C, H, W) images,
(K, C / groups, R, S) filters, (rows, classes) logits.
"""

from __future__ import annotations

import math

import torch


# --------------------------------------------------------------------------------------------
# Convolution. With the input zero-padded by (pad_h, pad_w), Xp, and c running over the
# C / groups input channels of filter k's group g = k // (K / groups):
#
#   Y[n, k, i, j] = b[k] + Σ_c Σ_p Σ_q Xp[n, g·C/groups + c, i·stride_h + p·dil_h, j·stride_w + q·dil_w] · W[k, c, p, q]


def _pad(x: torch.Tensor, padding) -> torch.Tensor:
    n, c, h, w = x.shape
    xp = x.new_zeros(n, c, h + 2 * padding[0], w + 2 * padding[1])
    xp[:, :, padding[0]:padding[0] + h, padding[1]:padding[1] + w] = x
    return xp


def conv2d_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """The positions a filter of ``kernel`` taps, ``dilation`` apart, takes in steps of ``stride``
    over ``size`` pixels padded by ``padding`` on each side."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _tap(xp: torch.Tensor, p: int, q: int, out_h: int, out_w: int, stride, dilation) -> torch.Tensor:
    """Xp[:, :, i·stride_h + p·dil_h, j·stride_w + q·dil_w] for every output position (i, j): what
    filter tap (p, q) sees, a (N, C, out_h, out_w) view."""
    h0, w0 = p * dilation[0], q * dilation[1]
    return xp[:, :, h0:h0 + stride[0] * (out_h - 1) + 1:stride[0], w0:w0 + stride[1] * (out_w - 1) + 1:stride[1]]


def conv2d_output_plane(x, weight, stride, padding, dilation) -> tuple[int, int]:
    """Y's (rows, columns) for input ``x`` and filters ``weight``."""
    _, _, h, w = x.shape
    _, _, r, s = weight.shape
    return (conv2d_output_size(h, r, stride[0], padding[0], dilation[0]),
            conv2d_output_size(w, s, stride[1], padding[1], dilation[1]))


def conv2d(x, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1) -> torch.Tensor:
    """Y = the convolution sum above."""
    n = x.shape[0]
    k_out, c_group, r, s = weight.shape
    out_h, out_w = conv2d_output_plane(x, weight, stride, padding, dilation)
    xp = _pad(x, padding)
    k_group = k_out // groups
    y = x.new_zeros(n, k_out, out_h, out_w)
    for k in range(k_out):
        g = k // k_group
        if bias is not None:
            y[:, k] += bias[k]
        for c in range(c_group):
            for p in range(r):
                for q in range(s):
                    y[:, k] += _tap(xp, p, q, out_h, out_w, stride, dilation)[:, g * c_group + c] * weight[k, c, p, q]
    return y


# Its gradients, from ∂L/∂Y, are sums over the same terms:
#
#   ∂L/∂W[k, c, p, q] = Σ_n Σ_i Σ_j ∂L/∂Y[n, k, i, j] · Xp[n, g·C/groups + c, i·stride_h + p·dil_h, j·stride_w + q·dil_w]
#   ∂L/∂b[k]          = Σ_n Σ_i Σ_j ∂L/∂Y[n, k, i, j]
#   ∂L/∂Xp[n, g·C/groups + c, i·stride_h + p·dil_h, j·stride_w + q·dil_w] += ∂L/∂Y[n, k, i, j] · W[k, c, p, q]
#
# the last for every k, i, j, p, q, and ∂L/∂X is ∂L/∂Xp without its padding (pixels no filter
# position reaches get 0).


def conv2d_backward_weight(grad_output, x, weight, stride, padding, dilation, groups) -> torch.Tensor:
    """∂L/∂W."""
    k_out, c_group, r, s = weight.shape
    out_h, out_w = grad_output.shape[2:]
    xp = _pad(x, padding)
    k_group = k_out // groups
    grad_weight = torch.zeros_like(weight)
    for k in range(k_out):
        g = k // k_group
        for c in range(c_group):
            for p in range(r):
                for q in range(s):
                    seen = _tap(xp, p, q, out_h, out_w, stride, dilation)[:, g * c_group + c]
                    grad_weight[k, c, p, q] = (grad_output[:, k] * seen).sum()
    return grad_weight


def conv2d_backward_bias(grad_output) -> torch.Tensor:
    """∂L/∂b."""
    return grad_output.sum(dim=(0, 2, 3))


def conv2d_backward_input(grad_output, x, weight, stride, padding, dilation, groups) -> torch.Tensor:
    """∂L/∂X."""
    k_out, c_group, r, s = weight.shape
    n, _, h, w = x.shape
    out_h, out_w = grad_output.shape[2:]
    grad_xp = _pad(torch.zeros_like(x), padding)
    k_group = k_out // groups
    for k in range(k_out):
        g = k // k_group
        for c in range(c_group):
            for p in range(r):
                for q in range(s):
                    _tap(grad_xp, p, q, out_h, out_w, stride, dilation)[:, g * c_group + c] += \
                        grad_output[:, k] * weight[k, c, p, q]
    return grad_xp[:, :, padding[0]:padding[0] + h, padding[1]:padding[1] + w].clone()


# --------------------------------------------------------------------------------------------
# ReLU: A = max(0, Z), and the gradient passes where Z ≥ 0 — at Z = 0 too (torch's relu passes
# none there). ∂L/∂Z = M ⊙ ∂L/∂A with M = not (Z < 0): NaN, no number below 0, stays NaN and
# passes its gradient, as torch.threshold does.


def relu(z) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, M)."""
    passes = ~(z < 0)
    return torch.where(passes, z, torch.zeros_like(z)), passes


def relu_backward(grad_output, passes) -> torch.Tensor:
    """∂L/∂Z = M ⊙ ∂L/∂A."""
    return torch.where(passes, grad_output, torch.zeros_like(grad_output))


# --------------------------------------------------------------------------------------------
# Max pooling: P[n, c, i, j] = max over the window's taps (p, q) of X[n, c, i·stride_h − pad_h +
# p·dil_h, j·stride_w − pad_w + q·dil_w], taps in the padding left out, with the flat index h·W + w
# of the max in X's plane. The design notes' pool is the 2×2 window of stride 2. Ties keep the
# first tap in row order; NaN wins over any number, and the last NaN over an earlier one (torch's
# rule). The gradient goes to the argmax alone:
#
#   ∂L/∂X[n, c, h, w] = Σ over the windows (i, j) whose argmax is (h, w) of ∂L/∂P[n, c, i, j]


def pool_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int, ceil_mode: bool) -> int:
    """The windows along one side (torch's rule: with ceil_mode a last, partial window counts if it
    starts inside the input or its leading padding)."""
    span = size + 2 * padding - dilation * (kernel - 1) - 1
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


def _first_real(start: int, dilation: int) -> int:
    """The first of the taps start, start + dilation, … that is not in the leading padding."""
    return start if start >= 0 else start + math.ceil(-start / dilation) * dilation


def _window(i: int, j: int, height: int, width: int, kernel_size, stride, padding, dilation):
    """Window (i, j)'s real rows h0, h0 + dil_h, … < h1 and columns w0, w0 + dil_w, … < w1."""
    h_start, w_start = i * stride[0] - padding[0], j * stride[1] - padding[1]
    return (_first_real(h_start, dilation[0]), min(h_start + dilation[0] * (kernel_size[0] - 1) + 1, height),
            _first_real(w_start, dilation[1]), min(w_start + dilation[1] * (kernel_size[1] - 1) + 1, width))


def max_pool2d_with_indices(x, kernel_size, stride, padding=(0, 0), dilation=(1, 1),
                            ceil_mode=False) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, the flat index of each max in X's plane)."""
    n, c, h, w = x.shape
    out_h = pool_output_size(h, kernel_size[0], stride[0], padding[0], dilation[0], ceil_mode)
    out_w = pool_output_size(w, kernel_size[1], stride[1], padding[1], dilation[1], ceil_mode)
    out = x.new_empty(n, c, out_h, out_w)
    indices = torch.empty(n, c, out_h, out_w, dtype=torch.long, device=x.device)
    for i in range(out_h):
        for j in range(out_w):
            h0, h1, w0, w1 = _window(i, j, h, w, kernel_size, stride, padding, dilation)
            # A window of −inf reports its first real pixel; one with no real pixel (dilation can step
            # over the whole input), −inf at h0·W + w0, an index outside the window, as torch does.
            best = x.new_full((n, c), -math.inf)
            best_index = torch.full((n, c), h0 * w + w0, dtype=torch.long, device=x.device)
            for hh in range(h0, h1, dilation[0]):
                for ww in range(w0, w1, dilation[1]):
                    value = x[:, :, hh, ww]
                    larger = (value > best) | value.isnan()
                    best = torch.where(larger, value, best)
                    best_index = torch.where(larger, hh * w + ww, best_index)
            out[:, :, i, j], indices[:, :, i, j] = best, best_index
    return out, indices


def max_pool2d_backward(grad_output, x, indices, kernel_size, stride, padding, dilation, ceil_mode) -> torch.Tensor:
    """∂L/∂X: each window's gradient added at its argmax; a window with no real pixel has none to
    give."""
    n, c, h, w = x.shape
    grad_input = x.new_zeros(n, c, h * w)
    for i in range(indices.shape[2]):
        for j in range(indices.shape[3]):
            h0, h1, w0, w1 = _window(i, j, h, w, kernel_size, stride, padding, dilation)
            if h0 >= h1 or w0 >= w1:
                continue
            grad_input.scatter_add_(2, indices[:, :, i, j, None], grad_output[:, :, i, j, None])
    return grad_input.view(n, c, h, w)


# --------------------------------------------------------------------------------------------
# The fused layers are the compositions: conv2d_relu is relu(conv2d(·)), and conv2d_relu_max_pool2d
# the 2×2, stride-2 max pool of that, with M taken at each window's argmax.


def conv2d_relu(x, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1):
    """(A, M) of relu(conv2d(X, W) + b)."""
    return relu(conv2d(x, weight, bias, stride, padding, dilation, groups))


def conv2d_relu_max_pool2d(x, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1,
                           ceil_mode=False):
    """(P, the argmax's index in Y's plane, M at the argmax) of the pooled relu(conv2d(X, W) + b)."""
    y = conv2d(x, weight, bias, stride, padding, dilation, groups)
    a, passes = relu(y)
    pooled, indices = max_pool2d_with_indices(a, (2, 2), (2, 2), (0, 0), (1, 1), ceil_mode)
    return pooled, indices, passes.flatten(2).gather(2, indices.flatten(2)).view_as(indices)


# --------------------------------------------------------------------------------------------
# The dense layer: z[n, m] = Σ_d W[m, d] · h[n, d] + b[m], and its gradients
#
#   ∂L/∂h[n, d] = Σ_m ∂L/∂z[n, m] · W[m, d],   ∂L/∂W[m, d] = Σ_n ∂L/∂z[n, m] · h[n, d],   ∂L/∂b[m] = Σ_n ∂L/∂z[n, m]


def linear(h, weight, bias=None) -> torch.Tensor:
    z = (h[:, None, :] * weight[None, :, :]).sum(2)
    return z if bias is None else z + bias


def linear_backward(grad_output, h, weight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(∂L/∂h, ∂L/∂W, ∂L/∂b)."""
    grad_h = (grad_output[:, :, None] * weight[None, :, :]).sum(1)
    grad_weight = (grad_output[:, :, None] * h[:, None, :]).sum(0)
    return grad_h, grad_weight, grad_output.sum(0)


# --------------------------------------------------------------------------------------------
# Softmax and cross-entropy over a row of logits z (C classes) with target class t:
#
#   ŷ_c = exp(z_c) / Σ_j exp(z_j) = exp(z_c − lse),   lse = log Σ_j exp(z_j)
#   L = −Σ_j y_j ln ŷ_j = Σ_j y_j (lse − z_j)
#
# with y the one-hot target, or smoothed by ε to y_j = (1 − ε)·[j = t] + ε/C, and each term weighed
# by the class weight w_j (1 without weights): L = (1 − ε)·w_t·(lse − z_t) + ε/C · Σ_j w_j (lse − z_j).
# Its gradient: ∂L/∂z_c = (1 − ε)·w_t·(ŷ_c − [c = t]) + ε/C · (Σ_j w_j · ŷ_c − w_c).
# A row whose target is ignore_index counts for nothing: loss 0, weight 0, gradient 0. Reduced, the
# rows' losses are summed ('sum'), or summed and divided by the total weight Σ_rows w_t ('mean';
# 0/0, NaN, when every row is ignored, as in torch).
# lse is computed stably, shifted by the row's max (by 0 when that max is ±inf).


def opmath(dtype):
    """The precision the sums are taken in: float32 for the half types, else the dtype itself."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def log_sum_exp(z):
    if z.shape[1] == 0:  # no classes: log 0
        return z.new_full(z.shape[:1], -math.inf)
    top = z.detach().max(1).values
    shift = torch.where(top.isinf(), torch.zeros_like(top), top)
    return (z - shift[:, None]).exp().sum(1).log() + shift


def _class_weights(z, target, weight, ignore_index):
    classes = z.shape[1]
    weight = z.new_ones(classes) if weight is None else weight.to(z.dtype)
    ignored = target == ignore_index
    t = target.masked_fill(ignored, 0)
    return weight, ignored, t, torch.where(ignored, torch.zeros_like(weight[t]), weight[t])


def cross_entropy(z, target, weight=None, reduction="mean", ignore_index=-100, label_smoothing=0.0):
    """(L, lse per row, total weight) — as the op returns them: L in z's dtype, the other two in
    the precision the sums are taken in."""
    dtype, z = z.dtype, z.to(opmath(z.dtype))
    classes = z.shape[1]
    weight, ignored, t, w_t = _class_weights(z, target, weight, ignore_index)
    lse = log_sum_exp(z)
    rows = torch.arange(z.shape[0], device=z.device)
    loss = (1 - label_smoothing) * w_t * (lse - z[rows, t])
    if label_smoothing > 0:
        loss = loss + label_smoothing / classes * (weight[None, :] * (lse[:, None] - z)).sum(1)
    loss = torch.where(ignored, torch.zeros_like(loss), loss)
    total_weight = w_t.sum()
    if reduction == "sum":
        loss = loss.sum()
    elif reduction == "mean":
        loss = loss.sum() / total_weight
    return loss.to(dtype), lse, total_weight


def cross_entropy_backward(grad_loss, z, target, weight, log_sum_exp, total_weight, reduction, ignore_index,
                           label_smoothing) -> torch.Tensor:
    """∂L/∂z from the forward's lse and total weight."""
    dtype, z = z.dtype, z.to(opmath(z.dtype))
    classes = z.shape[1]
    weight, ignored, t, w_t = _class_weights(z, target, weight, ignore_index)
    probs = (z - log_sum_exp[:, None]).exp()
    onehot = torch.zeros_like(z).scatter(1, t[:, None], 1.0)
    grad = (1 - label_smoothing) * w_t[:, None] * (probs - onehot)
    if label_smoothing > 0:
        grad = grad + label_smoothing / classes * (weight.sum() * probs - weight[None, :])
    scale = grad_loss / total_weight if reduction == "mean" else grad_loss
    grad = grad * (scale[:, None] if reduction == "none" else scale)
    return torch.where(ignored[:, None], torch.zeros_like(grad), grad).to(dtype)


# --------------------------------------------------------------------------------------------
# Gradient descent: θ ← θ − η ∂L/∂θ.


def sgd_step(theta, grad, lr: float) -> torch.Tensor:
    return theta - lr * grad
