"""The contract of every torchcnn op: its schema, and its fake kernel (output shapes, dtypes and
memory formats for tracing), whose shape rules and checks are csrc/shapes.h's.

The schemas are defined here rather than in C++ so that the ops exist as soon as ``torchcnn`` is
imported: ``torch.compile``, ``torch.export`` and fake tensors need no compiled code, and nothing is
compiled until a kernel is first needed (:func:`install_loader`). The compiled libraries register
kernels for these ops (and define a few private ops of their own, knobs for the tests and
benchmarks: ``_cuda_set_chunk_budget``, ``_cuda_conv2d_route``, ``_cuda_conv2d_force_route`` and
``_cuda_force_64bit_indices`` in csrc/cuda (``_emulated_launches`` in the emulated library alone),
``_cpu_conv2d_strategy``,
``_cpu_conv2d_force_strategy``, ``_cpu_set_gemm``, ``_cpu_matmul`` and ``_cpu_capability`` in csrc/cpu,
``_cpu_fused_backward_route`` in csrc/autograd; see
:mod:`torchcnn.testing`): csrc/cpu and csrc/cuda for ``torchcnn``, and the emulated CUDA test
library for the same schemas in ``torchcnn_emulated``.
"""

from __future__ import annotations

import torch
from torch._prims_common import suggest_memory_format

try:
    from torch._prims_common import is_non_overlapping_and_dense_or_false
except ImportError:  # older torch: symbolic shapes answer "not dense" less often there
    from torch._prims_common import is_non_overlapping_and_dense as is_non_overlapping_and_dense_or_false

from .. import _extension
from .params import fused_pool

SCHEMAS = {
    # Y[n, k, i, j] = Σ_c Σ_p Σ_q X[n, c, i·s + p·d − pad, j·s + q·d − pad] · W[k, c, p, q] + b[k]
    "conv2d": "(Tensor input, Tensor weight, Tensor? bias=None, int[2] stride=1, int[2] padding=0, "
              "int[2] dilation=1, int groups=1) -> Tensor",
    # ∂L/∂X: the transposed convolution of grad_output with W. `input` only supplies the shape.
    "conv2d_backward_input": "(Tensor grad_output, Tensor input, Tensor weight, int[2] stride, int[2] padding, "
                             "int[2] dilation, int groups) -> Tensor",
    # ∂L/∂W[k, c, p, q] = Σ_n Σ_i Σ_j ∂L/∂Y[n, k, i, j] · X[n, c, i·s + p·d − pad, j·s + q·d − pad].
    # `weight` only supplies the shape.
    "conv2d_backward_weight": "(Tensor grad_output, Tensor input, Tensor weight, int[2] stride, int[2] padding, "
                              "int[2] dilation, int groups) -> Tensor",
    # A = relu(conv2d(...)) with the design notes' ReLU, and where its gradient passes (Y ≥ 0): the
    # backward needs that, not A (A = 0 holds Y = 0, where the gradient passes, and Y < 0).
    "conv2d_relu": "(Tensor input, Tensor weight, Tensor? bias=None, int[2] stride=1, int[2] padding=0, "
                   "int[2] dilation=1, int groups=1) -> (Tensor, Tensor)",
    # P = the design notes' 2×2, stride-2 max pool of relu(conv2d(...)), the flat index of each max in
    # the convolution's output plane, and whether the gradient passes at it.
    "conv2d_relu_max_pool2d": "(Tensor input, Tensor weight, Tensor? bias=None, int[2] stride=1, int[2] padding=0, "
                              "int[2] dilation=1, int groups=1, bool ceil_mode=False) -> (Tensor, Tensor, Tensor)",
    # conv2d_relu_max_pool2d's gradients (input, weight, bias; each only if its output_mask entry is
    # set, else an empty tensor) from the pooled gradient, its indices and passes: the sparse ∂L/∂Y
    # (one value per window) taken as it is. CPU only: the backward's route there
    # (csrc/autograd/conv2d_function.cpp).
    "_cpu_conv2d_relu_max_pool2d_backward": "(Tensor grad_output, Tensor input, Tensor weight, Tensor indices, "
                                            "Tensor passes, int[2] stride, int[2] padding, int[2] dilation, "
                                            "int groups, bool ceil_mode, bool[3] output_mask) -> (Tensor, Tensor, Tensor)",
    # A = relu(Z) with the design notes' ReLU, and where its gradient passes (Z ≥ 0), for the backward.
    "relu": "(Tensor input) -> (Tensor, Tensor)",
    # ∂L/∂Z = ∂L/∂A where the ReLU passes (the mask relu and the fused ops return), else 0.
    "relu_backward": "(Tensor grad_output, Tensor passes) -> Tensor",
    # softmax + cross-entropy over rows of logits (rows, classes) with class-index targets: the loss
    # (per row for reduction='none'), and, for the backward, each row's log Σ exp and Σ w_target.
    "cross_entropy": "(Tensor input, Tensor target, Tensor? weight=None, str reduction='mean', "
                     "int ignore_index=-100, float label_smoothing=0.0) -> (Tensor, Tensor, Tensor)",
    # ∂L/∂input = (softmax(input) − y) · w, scaled by grad_loss and the reduction.
    "cross_entropy_backward": "(Tensor grad_loss, Tensor input, Tensor target, Tensor? weight, Tensor log_sum_exp, "
                              "Tensor total_weight, str reduction, int ignore_index, float label_smoothing) -> Tensor",
    # P[n, c, i, j] = max over the window, and the flat index h·W + w of that max in its plane.
    "max_pool2d_with_indices": "(Tensor input, int[2] kernel_size, int[2] stride, int[2] padding=0, "
                               "int[2] dilation=1, bool ceil_mode=False) -> (Tensor, Tensor)",
    # Routes each output gradient to its argmax; `input` only supplies the shape.
    "max_pool2d_backward": "(Tensor grad_output, Tensor input, Tensor indices, int[2] kernel_size, int[2] stride, "
                           "int[2] padding, int[2] dilation, bool ceil_mode) -> Tensor",
}

NAMESPACE = "torchcnn"


def define(namespace: str) -> torch.library.Library:
    """Define the ops in `namespace`; the returned Library keeps them alive."""
    library = torch.library.Library(namespace, "DEF")
    for name, schema in SCHEMAS.items():
        library.define(name + schema)
    return library


_DEFINITIONS = define(NAMESPACE)
# cross_entropy_backward's formula in torch's ops, which autograd can differentiate again: the
# gradient of cross_entropy when the backward is itself differentiated. A composite of torch ops
# (torchcnn._ops.registration registers it) for the C++ Autograd kernel of cross_entropy
# (csrc/autograd/cross_entropy_function.cpp) to call; no compiled kernel, no loader.
_DEFINITIONS.define("_cross_entropy_gradient(Tensor grad_loss, Tensor input, Tensor target, Tensor? weight, "
                    "Tensor total_weight, str reduction, int ignore_index, float label_smoothing) -> Tensor")
ops = torch.ops.torchcnn
_LOADER = torch.library.Library(NAMESPACE, "IMPL")


def install_loader() -> None:
    """The first call of any op on a real tensor loads the compiled kernels (building them if need
    be), then goes on to them. The trigger is a kernel for BackendSelect, a key every call passes
    just above its backend's, which nothing else uses for these ops; it removes itself once the
    kernels are in, so later calls pay nothing. Meta tensors (shapes only) never load anything."""
    select = torch._C.DispatchKey.BackendSelect
    for name in SCHEMAS:
        op = getattr(ops, name).default

        def load_then_run(keyset, *args, _op=op):
            if not keyset.has(torch._C.DispatchKey.Meta):
                _extension.load()
            return _op.redispatch(keyset.remove(select), *args)

        _LOADER.impl(name, load_then_run, "BackendSelect", with_keyset=True)
    _extension._on_load.append(_loaded)


_MISSING = torch.library.Library(NAMESPACE, "IMPL")


def _loaded(extension) -> None:
    """Once the kernels are in: the trigger goes, and if the CUDA kernels were left out, CUDA
    tensors get an error that says why, instead of the dispatcher's "could not run"."""
    _LOADER._destroy()
    if extension.with_cuda:
        return
    for name in SCHEMAS:
        def missing(*args, _name=name):
            raise NotImplementedError(
                f"torch.ops.torchcnn.{_name}: this torchcnn has no CUDA kernels ({extension.reason}). "
                "Build them: TORCHCNN_CUDA=1 for the just-in-time build, or pip install --no-build-isolation -e . "
                "with a CUDA toolkit")
        _MISSING.impl(name, missing, "CUDA")


# --------------------------------------------------------------------------------------------
# Fake kernels: csrc/shapes.h's checks and output sizes, written for SymInts, with the same
# messages (tests/test_properties.py holds the two together). Arguments left at their schema defaults may be left out of the call,
# hence the defaults here.


def dilated_extent(kernel, dilation):
    """A kernel of k taps spaced d apart spans (k − 1)·d + 1 input pixels."""
    return (kernel - 1) * dilation + 1


def window_output_size(size, kernel, stride, pad, dilation, ceil_mode=False):
    """torch's pooling_output_shape (shapes.h: window_output_size); ``//`` rounds towards −∞ as
    shapes.h's floor_div does. May be ≤ 0: the callers reject that."""
    span = size + 2 * pad - dilated_extent(kernel, dilation) + (stride - 1 if ceil_mode else 0)
    out = span // stride + 1
    if ceil_mode and (out - 1) * stride >= size + pad:
        out = out - 1
    return out


KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _c10(dtype) -> str:
    """A dtype as the C++ messages print it (c10's ScalarType names: Float, Long, ...)."""
    names = {torch.float16: "Half", torch.bfloat16: "BFloat16", torch.float32: "Float", torch.float64: "Double",
             torch.int64: "Long", torch.int32: "Int", torch.int16: "Short", torch.int8: "Char", torch.uint8: "Byte",
             torch.bool: "Bool", torch.complex64: "ComplexFloat", torch.complex128: "ComplexDouble"}
    return names.get(dtype, str(dtype).removeprefix("torch."))


def _pair(op, name, value):
    torch._check_value(len(value) == 2,
                       lambda: f"{op}: expected {name} to have 2 elements (height, width) but got {len(value)}")
    return value


def _positive(op, name, value):
    _pair(op, name, value)
    torch._check_value(value[0] > 0 and value[1] > 0, lambda: f"{op}: expected {name} to be positive but got {list(value)}")


def _non_negative(op, name, value):
    _pair(op, name, value)
    torch._check_value(value[0] >= 0 and value[1] >= 0,
                       lambda: f"{op}: expected {name} to be non-negative but got {list(value)}")


def _batched_image(op, name, t):
    torch._check_value(t.dim() == 4, lambda: f"{op}: expected {name} to be a 4-D (N, C, H, W) tensor but got a "
                                             f"{t.dim()}-D tensor of shape {list(t.shape)}")
    torch._check_value(t.shape[1] > 0 and t.shape[2] > 0 and t.shape[3] > 0,
                       lambda: f"{op}: expected {name} to have non-zero channels, height and width but got shape "
                               f"{list(t.shape)}")
    torch._check_type(t.dtype in KERNEL_DTYPES,
                      lambda: f"{op}: expected {name} to have a floating-point dtype (float16, bfloat16, float32 or "
                              f"float64) but got {_c10(t.dtype)}")


def _like(op, name, t, input):
    torch._check_value(t.device == input.device, lambda: f"{op}: expected {name} to be on the same device as input "
                                                         f"({input.device}) but got {t.device}")
    torch._check_type(t.dtype == input.dtype, lambda: f"{op}: expected {name} to have the same dtype as input "
                                                      f"({_c10(input.dtype)}) but got {_c10(t.dtype)}")


def conv2d_output_shape(op, input, weight, bias, stride, padding, dilation, groups):
    """shapes.h's conv2d_geometry: the checks, then (N, K, out_h, out_w)."""
    _batched_image(op, "input", input)
    torch._check_value(weight.dim() == 4, lambda: f"{op}: expected weight to be a 4-D (out_channels, "
                                                  f"in_channels/groups, kH, kW) tensor but got a {weight.dim()}-D "
                                                  f"tensor of shape {list(weight.shape)}")
    _like(op, "weight", weight, input)
    _positive(op, "stride", stride)
    _non_negative(op, "padding", padding)
    _positive(op, "dilation", dilation)
    torch._check_value(groups > 0, lambda: f"{op}: expected groups to be positive but got {groups}")
    k, c, kh, kw = weight.shape
    torch._check_value(k > 0 and kh > 0 and kw > 0 and c > 0,
                       lambda: f"{op}: expected weight to have non-zero sizes but got shape {list(weight.shape)}")
    torch._check_value(k % groups == 0, lambda: f"{op}: expected out_channels (weight.size(0) = {k}) to be divisible "
                                                f"by groups ({groups})")
    torch._check_value(c * groups == input.shape[1],
                       lambda: f"{op}: expected input to have {c * groups} channels (weight.size(1) = {c} × groups = "
                               f"{groups}) but got {input.shape[1]} channels (input of shape {list(input.shape)})")
    if bias is not None:
        _like(op, "bias", bias, input)
        torch._check_value(bias.dim() == 1 and bias.shape[0] == k,
                           lambda: f"{op}: expected bias to be a 1-D tensor of {k} elements but got shape "
                                   f"{list(bias.shape)}")
    h, w = input.shape[2], input.shape[3]
    extent = [dilated_extent(kh, dilation[0]), dilated_extent(kw, dilation[1])]
    torch._check_value(extent[0] <= h + 2 * padding[0] and extent[1] <= w + 2 * padding[1],
                       lambda: f"{op}: kernel size ({extent[0]}, {extent[1]}) after dilation is larger than the "
                               f"padded input ({h + 2 * padding[0]}, {w + 2 * padding[1]})")
    return (input.shape[0], k, window_output_size(h, kh, stride[0], padding[0], dilation[0]),
            window_output_size(w, kw, stride[1], padding[1], dilation[1]))


def conv2d_relu_max_pool2d_output_shape(op, input, weight, bias, stride, padding, dilation, groups, ceil_mode):
    """shapes.h's conv2d_relu_max_pool2d_geometry: the convolution's checks and shape, then the 2×2,
    stride-2 pool's over it."""
    n, k, h, w = conv2d_output_shape(op, input, weight, bias, stride, padding, dilation, groups)
    pool = fused_pool(ceil_mode)
    out = [window_output_size(size, *window, ceil_mode)
           for size, *window in zip((h, w), pool.kernel_size, pool.stride, pool.padding, pool.dilation)]
    torch._check_value(out[0] > 0 and out[1] > 0,
                       lambda: f"{op}: the 2×2 max pool needs a convolution output of at least 2×2 (1×1 with "
                               f"ceil_mode) but the convolution gives {h}×{w}")
    return (n, k, out[0], out[1])


def _grad_output(op, grad_output, input, expected):
    _like(op, "grad_output", grad_output, input)
    torch._check_value(tuple(grad_output.shape) == tuple(expected),
                       lambda: f"{op}: expected grad_output of shape {list(expected)} but got {list(grad_output.shape)}")


def max_pool2d_output_shape(op, input, kernel_size, stride, padding, dilation, ceil_mode):
    """shapes.h's max_pool2d_geometry: the checks, then (N, C, out_h, out_w)."""
    _batched_image(op, "input", input)
    _positive(op, "kernel_size", kernel_size)
    _positive(op, "stride", stride)
    _non_negative(op, "padding", padding)
    _positive(op, "dilation", dilation)
    torch._check_value(2 * padding[0] <= kernel_size[0] and 2 * padding[1] <= kernel_size[1],
                       lambda: f"{op}: expected padding to be at most half of kernel_size, but got "
                               f"padding={list(padding)} and kernel_size={list(kernel_size)}")
    h, w = input.shape[2], input.shape[3]
    out = [window_output_size(size, kernel_size[i], stride[i], padding[i], dilation[i], ceil_mode)
           for i, size in enumerate((h, w))]
    torch._check_value(out[0] > 0 and out[1] > 0,
                       lambda: f"{op}: the (dilated) kernel ({dilated_extent(kernel_size[0], dilation[0])}, "
                               f"{dilated_extent(kernel_size[1], dilation[1])}) is larger than the padded input "
                               f"({h + 2 * padding[0]}, {w + 2 * padding[1]}); the output would be empty")
    return (input.shape[0], input.shape[1], out[0], out[1])


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
    shape = conv2d_output_shape("conv2d", input, weight, bias, stride, padding, dilation, groups)
    return _empty(input, shape, conv2d_memory_format(input, weight))


@torch.library.register_fake("torchcnn::conv2d_relu")
def _conv2d_relu_fake(input, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1):
    shape = conv2d_output_shape("conv2d_relu", input, weight, bias, stride, padding, dilation, groups)
    memory_format = conv2d_memory_format(input, weight)
    return _empty(input, shape, memory_format), _empty(input, shape, memory_format, dtype=torch.bool)


@torch.library.register_fake("torchcnn::conv2d_relu_max_pool2d")
def _conv2d_relu_max_pool2d_fake(input, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1,
                                 ceil_mode=False):
    shape = conv2d_relu_max_pool2d_output_shape("conv2d_relu_max_pool2d", input, weight, bias, stride, padding,
                                                dilation, groups, ceil_mode)
    memory_format = conv2d_memory_format(input, weight)
    return (_empty(input, shape, memory_format), _empty(input, shape, memory_format, dtype=torch.long),
            _empty(input, shape, memory_format, dtype=torch.bool))


@torch.library.register_fake("torchcnn::_cpu_conv2d_relu_max_pool2d_backward")
def _conv2d_relu_max_pool2d_backward_fake(grad_output, input, weight, indices, passes, stride, padding, dilation,
                                          groups, ceil_mode, output_mask):
    op = "_cpu_conv2d_relu_max_pool2d_backward"
    shape = conv2d_relu_max_pool2d_output_shape(op, input, weight, None, stride, padding, dilation, groups, ceil_mode)
    _grad_output(op, grad_output, input, shape)
    for name, tensor, dtype in (("indices", indices, torch.long), ("passes", passes, torch.bool)):
        kind = "an int64" if dtype == torch.long else "a bool"
        torch._check_type(tensor.dtype == dtype and tensor.device == input.device and tuple(tensor.shape) == tuple(shape),
                          lambda name=name, tensor=tensor, kind=kind:
                          f"{op}: expected {name} to be {kind} tensor of shape {list(shape)} on {input.device} but "
                          f"got {_c10(tensor.dtype)} of shape {list(tensor.shape)} on {tensor.device}")
    memory_format = conv2d_memory_format(input, weight)
    nothing = input.new_empty((0,))
    return (_empty(input, input.shape, memory_format) if output_mask[0] else nothing,
            _empty(input, weight.shape, memory_format) if output_mask[1] else nothing,
            input.new_empty((weight.shape[0],)) if output_mask[2] else nothing)


def _conv2d_gradient_fake(op, grad_output, input, weight, stride, padding, dilation, groups):
    _grad_output(op, grad_output, input,
                 conv2d_output_shape(op, input, weight, None, stride, padding, dilation, groups))
    return conv2d_memory_format(input, weight)


@torch.library.register_fake("torchcnn::conv2d_backward_input")
def _conv2d_backward_input_fake(grad_output, input, weight, stride, padding, dilation, groups):
    memory_format = _conv2d_gradient_fake("conv2d_backward_input", grad_output, input, weight, stride, padding,
                                          dilation, groups)
    return _empty(input, input.shape, memory_format)


@torch.library.register_fake("torchcnn::conv2d_backward_weight")
def _conv2d_backward_weight_fake(grad_output, input, weight, stride, padding, dilation, groups):
    memory_format = _conv2d_gradient_fake("conv2d_backward_weight", grad_output, input, weight, stride, padding,
                                          dilation, groups)
    return _empty(weight, weight.shape, memory_format)


@torch.library.register_fake("torchcnn::max_pool2d_with_indices")
def _max_pool2d_fake(input, kernel_size, stride, padding=(0, 0), dilation=(1, 1), ceil_mode=False):
    shape = max_pool2d_output_shape("max_pool2d", input, kernel_size, stride, padding, dilation,
                                    ceil_mode)
    memory_format = suggest_memory_format(input)
    return _empty(input, shape, memory_format), _empty(input, shape, memory_format, dtype=torch.long)


@torch.library.register_fake("torchcnn::max_pool2d_backward")
def _max_pool2d_backward_fake(grad_output, input, indices, kernel_size, stride, padding, dilation, ceil_mode):
    op = "max_pool2d_backward"
    shape = max_pool2d_output_shape(op, input, kernel_size, stride, padding, dilation, ceil_mode)
    _grad_output(op, grad_output, input, shape)
    torch._check_value(indices.device == input.device, lambda: f"{op}: expected indices to be on the same device as "
                                                               f"input ({input.device}) but got {indices.device}")
    torch._check_type(indices.dtype == torch.long, lambda: f"{op}: expected indices to be int64 but got "
                                                           f"{_c10(indices.dtype)}")
    torch._check_value(tuple(indices.shape) == tuple(shape),
                       lambda: f"{op}: expected indices of shape {list(shape)} but got {list(indices.shape)}")
    return _empty(input, input.shape, suggest_memory_format(input))


def cross_entropy_checks(op, input, target, weight, reduction, label_smoothing):
    """shapes.h's cross_entropy_geometry."""
    torch._check_value(input.dim() == 2 and input.shape[1] > 0,
                       lambda: f"{op}: expected input to be a 2-D (rows, classes) tensor with at least one class but "
                               f"got shape {list(input.shape)}")
    torch._check_type(input.dtype in KERNEL_DTYPES,
                      lambda: f"{op}: expected input to have a floating-point dtype (float16, bfloat16, float32 or "
                              f"float64) but got {_c10(input.dtype)}")
    torch._check_value(target.device == input.device, lambda: f"{op}: expected target to be on the same device as "
                                                               f"input ({input.device}) but got {target.device}")
    torch._check_type(target.dtype == torch.long, lambda: f"{op}: expected target to hold class indices as int64 but "
                                                          f"got {_c10(target.dtype)}")
    torch._check_value(target.dim() == 1 and target.shape[0] == input.shape[0],
                       lambda: f"{op}: expected target of shape [{input.shape[0]}] but got {list(target.shape)}")
    if weight is not None:
        _like(op, "weight", weight, input)
        torch._check_value(weight.dim() == 1 and weight.shape[0] == input.shape[1],
                           lambda: f"{op}: expected weight to be a 1-D tensor of {input.shape[1]} elements but got "
                                   f"shape {list(weight.shape)}")
    torch._check_value(0.0 <= label_smoothing <= 1.0,
                       lambda: f"{op}: expected label_smoothing to be in [0, 1] but got {label_smoothing}")
    torch._check_value(reduction in ("none", "mean", "sum"),
                       lambda: f"{op}: expected reduction to be 'none', 'mean' or 'sum' but got '{reduction}'")


def _opmath(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


@torch.library.register_fake("torchcnn::cross_entropy")
def _cross_entropy_fake(input, target, weight=None, reduction="mean", ignore_index=-100, label_smoothing=0.0):
    cross_entropy_checks("cross_entropy", input, target, weight, reduction, label_smoothing)
    rows = input.shape[0]
    loss = input.new_empty((rows,) if reduction == "none" else ())
    acc = _opmath(input.dtype)
    return loss, input.new_empty((rows,), dtype=acc), input.new_empty((), dtype=acc)


@torch.library.register_fake("torchcnn::cross_entropy_backward")
def _cross_entropy_backward_fake(grad_loss, input, target, weight, log_sum_exp, total_weight, reduction, ignore_index,
                                 label_smoothing):
    op = "cross_entropy_backward"
    cross_entropy_checks(op, input, target, weight, reduction, label_smoothing)
    _like(op, "grad_loss", grad_loss, input)
    expected = (input.shape[0],) if reduction == "none" else ()
    torch._check_value(tuple(grad_loss.shape) == tuple(expected),
                       lambda: f"{op}: expected grad_loss of the loss's shape "
                               f"({'[rows]' if reduction == 'none' else 'a scalar'}) but got {list(grad_loss.shape)}")
    acc = _opmath(input.dtype)
    torch._check_value(log_sum_exp.device == input.device and log_sum_exp.dtype == acc and log_sum_exp.dim() == 1
                       and log_sum_exp.shape[0] == input.shape[0],
                       lambda: f"{op}: expected log_sum_exp as the forward returned it ({input.shape[0]} values of "
                               f"{_c10(acc)}) but got {_c10(log_sum_exp.dtype)} of shape {list(log_sum_exp.shape)}")
    torch._check_value(total_weight.device == input.device and total_weight.dtype == acc and total_weight.dim() == 0,
                       lambda: f"{op}: expected total_weight as the forward returned it (a scalar of {_c10(acc)}) but "
                               f"got {_c10(total_weight.dtype)} of shape {list(total_weight.shape)}")
    return torch.empty_like(input, memory_format=torch.contiguous_format)


@torch.library.register_fake("torchcnn::relu")
def _relu_fake(input):
    torch._check_type(input.dtype in KERNEL_DTYPES,
                      lambda: f"relu: expected input to have a floating-point dtype (float16, bfloat16, float32 or "
                              f"float64) but got {_c10(input.dtype)}")
    dense = input if is_non_overlapping_and_dense_or_false(input) else input.contiguous()
    return torch.empty_like(dense), torch.empty_like(dense, dtype=torch.bool)


@torch.library.register_fake("torchcnn::relu_backward")
def _relu_backward_fake(grad_output, passes):
    op = "relu_backward"
    torch._check_type(grad_output.dtype in KERNEL_DTYPES,
                      lambda: f"{op}: expected grad_output to have a floating-point dtype (float16, bfloat16, float32 "
                              f"or float64) but got {_c10(grad_output.dtype)}")
    torch._check_type(passes.dtype == torch.bool, lambda: f"{op}: expected passes to be a bool tensor but got "
                                                          f"{_c10(passes.dtype)}")
    torch._check_value(passes.device == grad_output.device,
                       lambda: f"{op}: expected passes to be on the same device as grad_output ({grad_output.device}) "
                               f"but got {passes.device}")
    torch._check_value(tuple(passes.shape) == tuple(grad_output.shape),
                       lambda: f"{op}: expected passes of grad_output's shape {list(grad_output.shape)} but got "
                               f"{list(passes.shape)}")
    if is_non_overlapping_and_dense_or_false(passes):  # laid out as the mask (shapes.h)
        return torch.empty_like(passes, dtype=grad_output.dtype)
    return torch.empty(grad_output.shape, dtype=grad_output.dtype, device=grad_output.device)
