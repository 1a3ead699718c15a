"""Property-based tests: random shapes and arguments for conv2d and max_pool2d — valid and invalid,
empty batches, odd sizes, dilation, ceil_mode, string padding, unbatched inputs, both memory
layouts — and torchcnn held to torch: either both raise, or values, indices and gradients agree.

The examples are derandomized (a fixed seed and count), so CI runs the same cases every time;
TORCHCNN_HYPOTHESIS_EXAMPLES raises the count for a longer search.
"""

import os

import pytest
import torch
import torch.nn.functional as TF

pytest.importorskip("hypothesis", reason="the property-based tests need hypothesis (pip install hypothesis)")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import torchcnn.functional as F  # noqa: E402
from samples import conv2d_op_params, max_pool2d_op_params  # noqa: E402

EXAMPLES = int(os.environ.get("TORCHCNN_HYPOTHESIS_EXAMPLES", "150"))
SETTINGS = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

pairs = st.one_of(st.integers(1, 4), st.tuples(st.integers(1, 4), st.integers(1, 4)))


def _outcome(fn):
    """(result, None) or (None, exception)."""
    try:
        return fn(), None
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        return None, e


def _input(draw, device, channels, batched):
    shape = (draw(st.integers(0, 3)), channels, draw(st.integers(1, 9)), draw(st.integers(1, 9)))
    if not batched:
        shape = (max(shape[0], 1), *shape[1:])
    x = torch.randn(shape, dtype=torch.float64, device=device)
    if draw(st.booleans()):
        x = x.to(memory_format=torch.channels_last)
    return x if batched else x[0]


@st.composite
def conv2d_cases(draw, device):
    groups = draw(st.integers(1, 3))
    in_channels = groups * draw(st.integers(1, 3))
    out_channels = groups * draw(st.integers(1, 3)) + draw(st.sampled_from([0, 0, 0, 1]))  # sometimes invalid
    x = _input(draw, device, in_channels + draw(st.sampled_from([0, 0, 0, 0, 1])), draw(st.booleans()))
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    w = torch.randn(out_channels, in_channels // groups, *kernel, dtype=torch.float64, device=device)
    b = torch.randn(out_channels, dtype=torch.float64, device=device) if draw(st.booleans()) else None
    padding = draw(st.one_of(st.integers(0, 3), st.tuples(st.integers(0, 3), st.integers(0, 3)),
                             st.sampled_from(["same", "valid"])))
    kwargs = dict(stride=draw(pairs), padding=padding, dilation=draw(pairs), groups=groups)
    return x, w, b, kwargs


@st.composite
def max_pool2d_cases(draw, device):
    x = _input(draw, device, draw(st.integers(1, 3)), draw(st.booleans()))
    kwargs = dict(kernel_size=draw(pairs), stride=draw(st.one_of(st.none(), pairs)),
                  padding=draw(st.one_of(st.integers(0, 2), st.tuples(st.integers(0, 2), st.integers(0, 2)))),
                  dilation=draw(pairs), ceil_mode=draw(st.booleans()))
    return x, kwargs


def _agree(ours, theirs, case):
    (a, a_err), (b, b_err) = ours, theirs
    assert (a_err is None) == (b_err is None), f"{case}: torchcnn {a_err!r}, torch {b_err!r}"
    return a_err is None


@SETTINGS
@given(data=st.data())
def test_conv2d_agrees_with_torch(device, data):
    x, w, b, kwargs = data.draw(conv2d_cases(device))
    case = f"input {tuple(x.shape)}, weight {tuple(w.shape)}, bias {b is not None}, {kwargs}"
    leaves = [t.requires_grad_() for t in (x, w, b) if t is not None]
    ours, theirs = _outcome(lambda: F.conv2d(x, w, b, **kwargs)), _outcome(lambda: TF.conv2d(x, w, b, **kwargs))
    if not _agree(ours, theirs, case):
        return
    y, expected = ours[0], theirs[0]
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10, msg=lambda m: f"{case}: {m}")
    grad = torch.randn_like(expected)
    for g, e in zip(torch.autograd.grad(y, leaves, grad), torch.autograd.grad(expected, leaves, grad)):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10, msg=lambda m: f"{case}: gradient: {m}")


def _pool_gradient(x, values, indices, grad):
    """∂L/∂X of max pooling from the forward's indices: each output's gradient added at its argmax,
    except where the window held no real pixel (a −inf from finite inputs), which passes nothing.
    (torch's own CPU backward writes those past the buffer, so it cannot be the reference.)"""
    planes = x.new_zeros(x.shape[:-2].numel(), x.shape[-2] * x.shape[-1])
    passes = torch.isfinite(values).reshape(planes.shape[0], values.shape[-2] * values.shape[-1])
    src = torch.where(passes, grad.reshape(passes.shape), 0)
    idx = torch.where(passes, indices.reshape(passes.shape), 0)
    return planes.scatter_add_(1, idx, src).view(x.shape)


@SETTINGS
@given(data=st.data())
def test_max_pool2d_agrees_with_torch(device, data):
    x, kwargs = data.draw(max_pool2d_cases(device))
    case = f"input {tuple(x.shape)}, {kwargs}"
    x.requires_grad_()
    ours = _outcome(lambda: F.max_pool2d(x, **kwargs, return_indices=True))
    theirs = _outcome(lambda: TF.max_pool2d(x, **kwargs, return_indices=True))
    if not _agree(ours, theirs, case):
        return
    (y, idx), (expected, expected_idx) = ours[0], theirs[0]
    torch.testing.assert_close(y, expected, rtol=0, atol=0, msg=lambda m: f"{case}: {m}")
    assert torch.equal(idx, expected_idx), case
    grad = torch.randn_like(expected)
    (g,) = torch.autograd.grad(y, x, grad)
    torch.testing.assert_close(g, _pool_gradient(x.detach(), expected.detach(), expected_idx, grad),
                               msg=lambda m: f"{case}: gradient: {m}")


# --------------------------------------------------------------------------------------------
# The fake kernels (torch.compile's shapes) against the compiled kernels: the same output shapes
# and strides, or the same error. csrc/shapes.h and torchcnn/_ops/schemas.py state the same rules
# twice (C++ for the kernels, SymInt-friendly Python for tracing); these hold them together.


def _error_kind(error):
    """An error's type and message (the first line: the C++ ones go on with a C++ stack trace)."""
    return type(error), str(error).split("\n")[0]


def _fake_agrees(call, tensors, case):
    from torch._subclasses.fake_tensor import FakeTensorMode

    real = _outcome(lambda: call(*tensors))
    mode = FakeTensorMode()
    fakes = [None if t is None else mode.from_tensor(t) for t in tensors]
    with mode:
        fake = _outcome(lambda: call(*fakes))
    assert (real[1] is None) == (fake[1] is None), f"{case}: kernel {real[1]!r}, fake {fake[1]!r}"
    if real[1] is not None:
        assert _error_kind(fake[1]) == _error_kind(real[1]), f"{case}: kernel {real[1]!r}, fake {fake[1]!r}"
        return
    for r, f in zip(torch.utils._pytree.tree_leaves(real[0]), torch.utils._pytree.tree_leaves(fake[0])):
        assert (f.shape, f.dtype) == (r.shape, r.dtype), case
        # Strides of a dimension of size 0 or 1 mean nothing; torch compares the others.
        same, i = torch._prims_common.check_significant_strides(r, f, only_cuda=False)
        assert same, f"{case}: strides {r.stride()} (kernel), {f.stride()} (fake), dimension {i}"


@pytest.mark.no_emulation
@SETTINGS
@given(data=st.data())
def test_conv2d_fake_kernel_agrees_with_the_kernel(device, data):
    x, w, b, kwargs = data.draw(conv2d_cases(device))
    case = f"input {tuple(x.shape)}, weight {tuple(w.shape)}, bias {b is not None}, {kwargs}"
    _fake_agrees(lambda x, w, b: F.conv2d(x, w, b, **kwargs), (x, w, b), case)


@pytest.mark.no_emulation
@SETTINGS
@given(data=st.data())
def test_max_pool2d_fake_kernel_agrees_with_the_kernel(device, data):
    x, kwargs = data.draw(max_pool2d_cases(device))
    case = f"input {tuple(x.shape)}, {kwargs}"
    _fake_agrees(lambda x: F.max_pool2d(x, **kwargs, return_indices=True), (x,), case)


def _perturbed(data, t, device):
    """A gradient like t, or now and then one of the wrong shape, dtype or device."""
    wrong = data.draw(st.sampled_from(["none", "none", "none", "shape", "dtype"]))
    if wrong == "shape":
        return torch.randn(*t.shape[:-1], t.shape[-1] + 1, dtype=t.dtype, device=device)
    return torch.randn(t.shape, dtype=torch.float32 if wrong == "dtype" else t.dtype, device=device)


@pytest.mark.no_emulation
@SETTINGS
@given(data=st.data())
def test_conv2d_gradient_fake_kernels_agree_with_the_kernels(device, data):
    x, w, _, kwargs = data.draw(conv2d_cases(device))
    params = conv2d_op_params(kwargs)
    if x.dim() != 4 or params is None:
        return
    y, error = _outcome(lambda: torch.ops.torchcnn.conv2d(x, w, None, *params))
    grad = _perturbed(data, y if error is None else torch.empty(1, 1, 1, 1, dtype=x.dtype), device)
    case = f"input {tuple(x.shape)}, weight {tuple(w.shape)}, grad_output {tuple(grad.shape)} {grad.dtype}, {kwargs}"
    for op in (torch.ops.torchcnn.conv2d_backward_input, torch.ops.torchcnn.conv2d_backward_weight):
        _fake_agrees(lambda g, x, w: op(g, x, w, *params), (grad, x, w), f"{op}: {case}")


@pytest.mark.no_emulation
@SETTINGS
@given(data=st.data())
def test_max_pool2d_gradient_fake_kernel_agrees_with_the_kernel(device, data):
    x, kwargs = data.draw(max_pool2d_cases(device))
    if x.dim() != 4:
        return
    params = max_pool2d_op_params(kwargs)
    outcome, error = _outcome(lambda: torch.ops.torchcnn.max_pool2d_with_indices(x, *params))
    y, indices = outcome if error is None else (torch.empty(1, 1, 1, 1, dtype=x.dtype), torch.zeros(1, 1, 1, 1).long())
    grad = _perturbed(data, y, device)
    if data.draw(st.sampled_from([False, False, False, True])):
        indices = indices.int()
    case = f"input {tuple(x.shape)}, grad_output {tuple(grad.shape)} {grad.dtype}, indices {indices.dtype}, {kwargs}"
    _fake_agrees(lambda g, x, i: torch.ops.torchcnn.max_pool2d_backward(g, x, i, *params), (grad, x, indices), case)


@pytest.mark.no_emulation
@SETTINGS
@given(data=st.data())
def test_fused_fake_kernels_agree_with_the_kernels(device, data):
    """conv2d_relu and conv2d_relu_max_pool2d over conv2d's draws (ceil_mode drawn too): the fake
    kernels' shapes, strides and errors are the kernels' — the pool's "at least 2×2" included."""
    x, w, b, kwargs = data.draw(conv2d_cases(device))
    ceil_mode = data.draw(st.booleans())
    case = f"input {tuple(x.shape)}, weight {tuple(w.shape)}, bias {b is not None}, {kwargs}, ceil_mode {ceil_mode}"
    _fake_agrees(lambda x, w, b: F.conv2d_relu(x, w, b, **kwargs), (x, w, b), f"conv2d_relu: {case}")
    _fake_agrees(lambda x, w, b: F.conv2d_relu_max_pool2d(x, w, b, **kwargs, ceil_mode=ceil_mode, return_indices=True),
                 (x, w, b), f"conv2d_relu_max_pool2d: {case}")


@SETTINGS
@given(data=st.data())
def test_fused_ops_are_the_composition(device, data):
    """Over conv2d's draws: the fused op raises as the composition does, or gives its values and
    indices exactly."""
    x, w, b, kwargs = data.draw(conv2d_cases(device))
    ceil_mode = data.draw(st.booleans())
    case = f"input {tuple(x.shape)}, weight {tuple(w.shape)}, {kwargs}, ceil_mode {ceil_mode}"
    fused, error = _outcome(lambda: F.conv2d_relu_max_pool2d(x, w, b, **kwargs, ceil_mode=ceil_mode,
                                                             return_indices=True))
    composed, composed_error = _outcome(lambda: F.max_pool2d(F.relu(F.conv2d(x, w, b, **kwargs)), 2,
                                                             ceil_mode=ceil_mode, return_indices=True))
    assert (error is None) == (composed_error is None), f"{case}: fused {error!r}, composed {composed_error!r}"
    if error is None:
        assert torch.equal(fused[0], composed[0]) and torch.equal(fused[1], composed[1]), case
