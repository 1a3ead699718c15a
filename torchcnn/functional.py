"""torchcnn's functions, with the names and signatures of ``torch.nn.functional``.

``conv2d``, the fused ``conv2d_relu`` and ``conv2d_relu_max_pool2d``, ``max_pool2d``, ``relu`` and
``cross_entropy`` (with class-index targets) run torchcnn's operators (``torch.ops.torchcnn``, with
their autograd, vmap and autocast rules: :mod:`torchcnn._ops`); ``linear`` and in-place ``relu``
follow docs/math.md with torch's ops, and so do ``cross_entropy``'s other cases: probability
targets, and, through :mod:`torchcnn.reference`'s formula, a weight that takes a gradient.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import reference
from ._ops.routing import call

__all__ = ["conv2d", "conv2d_relu", "conv2d_relu_max_pool2d", "max_pool2d", "relu", "linear", "cross_entropy"]


def _pair(name: str, fn: str, value) -> tuple[int, int]:
    """An int or a sequence of two ints, as torch accepts them; anything else is a TypeError."""
    if type(value) is int:  # the common cases first: this runs on every call
        return value, value
    if type(value) is tuple and len(value) == 2 and type(value[0]) is int and type(value[1]) is int:
        return value
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) == 1:
            value = (value[0], value[0])
        if len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise TypeError(f"{fn}: expected {name} to be an int or a pair of ints but got {value!r}")
        return int(value[0]), int(value[1])
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if isinstance(value, torch.SymInt):
        return value, value
    raise TypeError(f"{fn}: expected {name} to be an int or a pair of ints but got {value!r}")


def _check_tensor(fn: str, name: str, value) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"{fn}: expected {name} to be a Tensor but got {type(value).__name__}")


def _batched(fn: str, input: Tensor) -> bool:
    """Whether input is batched (N, C, H, W); unbatched (C, H, W) is accepted too, as in torch."""
    if input.dim() not in (3, 4):
        raise ValueError(
            f"{fn}: expected input to be 3-D (C, H, W) or 4-D (N, C, H, W) but got a "
            f"{input.dim()}-D tensor of shape {tuple(input.shape)}"
        )
    return input.dim() == 4


def _conv2d_arguments(fn: str, input, weight, bias, stride, padding, dilation, groups) -> tuple:
    """torch.nn.functional.conv2d's arguments, checked, as the ops take them: (batched input, weight,
    bias, stride, padding, dilation, groups), and whether the input was batched. ``'same'``
    padding with an odd total pads the input's bottom/right here, as torch does."""
    _check_tensor(fn, "input", input)
    _check_tensor(fn, "weight", weight)
    if bias is not None:
        _check_tensor(fn, "bias", bias)
    batched = _batched(fn, input)
    stride = _pair("stride", fn, stride)
    dilation = _pair("dilation", fn, dilation)
    if isinstance(groups, bool) or not isinstance(groups, int):
        raise TypeError(f"{fn}: expected groups to be an int but got {groups!r}")
    if not batched:
        input = input.unsqueeze(0)

    if isinstance(padding, str):
        if padding == "valid":
            padding = (0, 0)
        elif padding == "same":
            if stride != (1, 1):
                raise ValueError(f"{fn}: padding='same' is not supported for strided convolutions (stride={stride})")
            if weight.dim() != 4:
                raise ValueError(f"{fn}: expected weight to be 4-D but got {weight.dim()}-D")
            # Total padding d·(k − 1) per dimension; torch puts the odd one on the bottom/right.
            total = [dilation[i] * (weight.shape[2 + i] - 1) for i in range(2)]
            padding = (total[0] // 2, total[1] // 2)
            extra_h, extra_w = total[0] - 2 * padding[0], total[1] - 2 * padding[1]
            if extra_h or extra_w:
                input = torch.nn.functional.pad(input, (0, extra_w, 0, extra_h))
        else:
            raise ValueError(f"{fn}: expected padding to be 'valid', 'same', an int or a pair but got {padding!r}")
    else:
        padding = _pair("padding", fn, padding)
    return (input, weight, bias, stride, padding, dilation, groups), batched


def _unbatch(outputs, batched: bool):
    return outputs if batched else tuple(t.squeeze(0) for t in outputs)


def conv2d(input: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0, dilation=1,
           groups: int = 1) -> Tensor:
    """2-D convolution (cross-correlation), like :func:`torch.nn.functional.conv2d`.

    ``Y[n, k, i, j] = Σ_c Σ_p Σ_q X[n, c, i·s + p·d − pad, j·s + q·d − pad] · W[k, c, p, q] + b[k]``
    over the ``C/groups`` input channels of output channel ``k``'s group. ``padding`` is an int,
    a pair, ``'valid'`` (no padding) or ``'same'`` (output as large as the input; stride 1 only).
    """
    args, batched = _conv2d_arguments("conv2d", input, weight, bias, stride, padding, dilation, groups)
    output = call("conv2d", *args)
    return output if batched else output.squeeze(0)


def conv2d_relu(input: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0, dilation=1,
                groups: int = 1) -> Tensor:
    """``relu(conv2d(input, weight, bias, ...))`` as one op: the design notes' ReLU (gradient 1 where
    the convolution's output is ≥ 0, 0 elsewhere) applied as the convolution's output is made.
    The same values as the composition; the backward needs no copy of the convolution's output.
    Arguments as :func:`conv2d`'s."""
    args, batched = _conv2d_arguments("conv2d_relu", input, weight, bias, stride, padding, dilation, groups)
    output, _ = _unbatch(call("conv2d_relu", *args), batched)
    return output


def conv2d_relu_max_pool2d(input: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0,
                           dilation=1, groups: int = 1, ceil_mode: bool = False, return_indices: bool = False):
    """``max_pool2d(relu(conv2d(input, weight, bias, ...)), 2, ceil_mode=ceil_mode)`` as one op: the
    convolution, the design notes' ReLU and their 2×2, stride-2 max pool. The same values as the
    composition, and with ``return_indices=True`` the same indices (flat positions ``h·W + w`` in
    the convolution's output plane); the backward routes each pooled gradient straight to its
    argmax. Convolution arguments as :func:`conv2d`'s, ``ceil_mode`` as :func:`max_pool2d`'s."""
    args, batched = _conv2d_arguments("conv2d_relu_max_pool2d", input, weight, bias, stride, padding, dilation,
                                      groups)
    output, indices, _ = _unbatch(call("conv2d_relu_max_pool2d", *args, bool(ceil_mode)), batched)
    return (output, indices) if return_indices else output


def max_pool2d(input: Tensor, kernel_size, stride=None, padding=0, dilation=1, ceil_mode: bool = False,
               return_indices: bool = False):
    """2-D max pooling, like :func:`torch.nn.functional.max_pool2d`.

    ``P[n, c, i, j] = max_{p, q} X[n, c, i·s + p·d − pad, j·s + q·d − pad]``; the gradient flows only
    to the element chosen. With ``return_indices=True`` it also returns the flat index ``h·W + w``
    of that element within its plane, identical to torch's. ``stride`` defaults to ``kernel_size``.
    """
    fn = "max_pool2d"
    _check_tensor(fn, "input", input)
    batched = _batched(fn, input)
    kernel_size = _pair("kernel_size", fn, kernel_size)
    stride = kernel_size if stride is None or (isinstance(stride, Sequence) and len(stride) == 0) else _pair(
        "stride", fn, stride)
    padding = _pair("padding", fn, padding)
    dilation = _pair("dilation", fn, dilation)
    if not batched:
        input = input.unsqueeze(0)
    output, indices = call("max_pool2d_with_indices", input, kernel_size, stride, padding, dilation, bool(ceil_mode))
    if not batched:
        output, indices = output.squeeze(0), indices.squeeze(0)
    return (output, indices) if return_indices else output


def relu(input: Tensor, inplace: bool = False) -> Tensor:
    """ReLU(z) = max(0, z), with the design notes' gradient: 1 where z ≥ 0, 0 where z < 0.

    Unlike torch, whose gradient at exactly z = 0 is 0, the gradient passes there: at z = 0
    ``torchcnn`` gives ∂L/∂z = ∂L/∂a. Everywhere else the two agree (NaN propagates).
    """
    _check_tensor("relu", "input", input)
    if not input.is_floating_point():
        raise TypeError(f"relu: expected input to have a floating-point dtype but got {input.dtype}")
    if not inplace:
        # torchcnn's relu op: one pass, and the backward keeps a byte per value (where the gradient
        # passes) instead of the input.
        output, _ = call("relu", input)
        return output
    # In place, torch.threshold_(z, t, 0): z where z > t, else 0, its gradient passing where z > t.
    # With t the largest float below zero (minus the dtype's smallest subnormal), "z > t" is exactly
    # "z ≥ 0": the design notes' ReLU from torch's own kernel, which autograd, vmap, torch.compile
    # and export take in place. (With torch.set_flush_denormal(True) the CPU reads t as 0, and the
    # gradient at z = 0 is torch's.)
    info = torch.finfo(input.dtype)
    return torch.threshold_(input, -info.tiny * info.eps, 0)


def linear(input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """The dense layer z = W h + b over the last dimension of input, like
    :func:`torch.nn.functional.linear` (weight is (out_features, in_features))."""
    fn = "linear"
    _check_tensor(fn, "input", input)
    _check_tensor(fn, "weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"{fn}: expected weight to be 2-D (out_features, in_features) but got shape "
                         f"{tuple(weight.shape)}")
    if input.dim() == 0 or input.shape[-1] != weight.shape[1]:
        raise ValueError(f"{fn}: expected input's last dimension to be in_features={weight.shape[1]} but got "
                         f"input of shape {tuple(input.shape)}")
    if bias is not None:
        _check_tensor(fn, "bias", bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"{fn}: expected bias of shape ({weight.shape[0]},) but got {tuple(bias.shape)}")
        if input.dim() == 2:
            return torch.addmm(bias, input, weight.t())
        return torch.matmul(input, weight.t()) + bias
    return torch.matmul(input, weight.t())


_REDUCTIONS = ("none", "mean", "sum")
_CROSS_ENTROPY = torch.ops.torchcnn.cross_entropy.default


def _cross_entropy_op_applies(weight) -> bool:
    """Whether class-index cross-entropy can take the op, whose gradient is with respect to the
    logits only: not for a weight that takes a gradient or a tangent, nor under torch.func's
    transforms (they differentiate the reference's formula instead)."""
    if torch._C._are_functorch_transforms_active():
        return False
    if weight is None:
        return True
    return not (weight.requires_grad and torch.is_grad_enabled()) and \
        torch.autograd.forward_ad.unpack_dual(weight).tangent is None


def _log_probs(input, class_dim, weight):
    """ln ŷ = z − logsumexp(z) over the class dimension, and the class weights shaped to broadcast
    along it (None without weight)."""
    log_probs = input - torch.logsumexp(input, dim=class_dim, keepdim=True)
    if weight is None:
        return log_probs, None
    class_shape = [1] * input.dim()
    class_shape[class_dim] = input.shape[class_dim]
    return log_probs, weight.to(input.dtype).view(class_shape)


def _legacy_reduction(size_average, reduce) -> str:
    size_average = True if size_average is None else size_average
    reduce = True if reduce is None else reduce
    if not reduce:
        return "none"
    return "mean" if size_average else "sum"


def cross_entropy(input: Tensor, target: Tensor, weight: Tensor | None = None, size_average=None,
                  ignore_index: int = -100, reduce=None, reduction: str = "mean",
                  label_smoothing: float = 0.0) -> Tensor:
    """Softmax followed by cross-entropy, like :func:`torch.nn.functional.cross_entropy`.

    ``ŷ = softmax(z)`` over the class dimension (dim 1, or 0 for an unbatched (C,) input) and
    ``L = −Σ_j y_j · ln ŷ_j``, computed stably as ``ln ŷ = z − logsumexp(z)``; its gradient is
    ``ŷ − y``. ``target`` holds class indices (shape of input without the class dimension) or
    class probabilities (shape of input). ``weight``, ``ignore_index``, ``reduction`` and
    ``label_smoothing`` mean what they mean in torch.
    """
    fn = "cross_entropy"
    _check_tensor(fn, "input", input)
    _check_tensor(fn, "target", target)
    if size_average is not None or reduce is not None:
        reduction = _legacy_reduction(size_average, reduce)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{fn}: expected reduction to be one of {_REDUCTIONS} but got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{fn}: expected label_smoothing to be in [0, 1] but got {label_smoothing}")
    if not input.is_floating_point():
        raise TypeError(f"{fn}: expected input to have a floating-point dtype but got {input.dtype}")
    if input.dim() == 0:
        raise ValueError(f"{fn}: expected input to have a class dimension but got a 0-D tensor")
    class_dim = 1 if input.dim() >= 2 else 0
    classes = input.shape[class_dim]
    if target.device != input.device:
        raise ValueError(f"{fn}: expected target on input's device ({input.device}) but got {target.device}")
    if weight is not None:
        _check_tensor(fn, "weight", weight)
        if weight.shape != (classes,) or not weight.is_floating_point() or weight.device != input.device:
            raise ValueError(f"{fn}: expected weight to be a floating-point tensor of shape ({classes},) on "
                             f"{input.device} but got {weight.dtype} of shape {tuple(weight.shape)} on {weight.device}")

    if target.is_floating_point():
        if target.shape != input.shape:
            raise ValueError(f"{fn}: expected probability targets of input's shape {tuple(input.shape)} but got "
                             f"{tuple(target.shape)}")
        log_probs, class_weight = _log_probs(input, class_dim, weight)
        if label_smoothing > 0:
            target = target * (1 - label_smoothing) + label_smoothing / classes
        terms = log_probs * target
        if class_weight is not None:
            terms = terms * class_weight
        loss = -terms.sum(class_dim)
        if reduction == "mean":
            return loss.sum() / (input.numel() // max(classes, 1))
        return loss.sum() if reduction == "sum" else loss

    if target.dtype is not torch.int64:
        if target.dtype in (torch.bool, torch.complex64, torch.complex128) or target.is_complex():
            raise TypeError(f"{fn}: expected target to hold class indices (an integer dtype) or probabilities "
                            f"(a floating dtype) but got {target.dtype}")
        target = target.long()
    rows_given = input.dim() == 2  # (rows, classes), as the op takes them
    if not (rows_given and target.dim() == 1 and target.shape[0] == input.shape[0]):
        expected = input.shape[:class_dim] + input.shape[class_dim + 1:]
        if target.shape != expected:
            raise ValueError(f"{fn}: expected class-index targets of shape {tuple(expected)} but got "
                             f"{tuple(target.shape)}")
    if rows_given:
        rows, row_targets = input, target
    else:
        rows = input.unsqueeze(0) if class_dim == 0 else input.movedim(1, -1).reshape(-1, classes)
        row_targets = target.reshape(-1)
    if _cross_entropy_op_applies(weight):
        # One op forward, one backward (softmax − y): torch.ops.torchcnn.cross_entropy, over rows.
        loss, _, _ = _CROSS_ENTROPY(rows, row_targets, None if weight is None else weight.to(input.dtype), reduction,
                                    ignore_index, float(label_smoothing))
    else:
        # A weight that takes a gradient, or torch.func's transforms: the reference's formula (the
        # same math as the op's), which autograd and torch.func differentiate.
        _check_class_indices(fn, row_targets, classes, ignore_index, input.device)
        if torch.is_autocast_enabled(rows.device.type) and rows.dtype in (torch.float16, torch.bfloat16):
            rows = rows.float()  # float32 under autocast, as the op's autocast rule and torch's loss give
        loss, _, _ = reference.cross_entropy(rows, row_targets, None if weight is None else weight.to(rows.dtype),
                                             reduction, ignore_index, float(label_smoothing))
    return loss.view(target.shape) if reduction == "none" and not rows_given else loss


def _check_class_indices(fn, target, classes, ignore_index, device):
    """An out-of-range class index is an error, as in torch (the op checks its own)."""
    ignored = target == ignore_index
    if device.type == "cuda":
        # Checked on the device, as torch's nll_loss does: a host synchronisation would stall every
        # training step and break CUDA-graph capture. A bad target is a device-side assert.
        out_of_range = ~ignored & ((target < 0) | (target >= classes))
        torch._assert_async(~out_of_range.any(), f"{fn}: a target is out of bounds for {classes} classes")
    elif not torch.compiler.is_compiling():
        out_of_range = ~ignored & ((target < 0) | (target >= classes))
        if bool(out_of_range.any()):
            bad = int(target[out_of_range].flatten()[0])
            raise IndexError(f"{fn}: target {bad} is out of bounds for {classes} classes "
                             f"(expected 0 ≤ target < {classes}, or ignore_index={ignore_index})")
