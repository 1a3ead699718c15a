"""torchcnn.reference, the plain math of every op, as a second oracle beside torch's built-ins.

First the reference itself is held to torch (so that it is the math torch computes, with the
design notes' ReLU gradient at 0 as the one intended difference); then every op of
torch.ops.torchcnn, each of its gradients, each forced CPU convolution algorithm and the emulated
CUDA kernels are held to the reference over the sample sweep (tests/samples.py).
"""

import pytest
import torch
import torch.nn.functional as TF

import torchcnn.functional as F
from samples import (CPU_STRATEGY_SAMPLES, SAMPLE_INPUTS, conv2d_samples, cross_entropy_sample_inputs, make_conv,
                     max_pool2d_samples)
from torchcnn import reference
from torchcnn.testing import CPU_CONV2D_STRATEGIES, forced_cpu_conv2d_strategy

TOL = {torch.float64: dict(rtol=1e-9, atol=1e-9), torch.float32: dict(rtol=1e-4, atol=1e-4)}
DTYPES = [torch.float64, torch.float32]


def batched_conv_samples(full=False):
    return [s for s in conv2d_samples(full) if s.op_compatible]


def batched_pool_samples(full=False):
    return [s for s in max_pool2d_samples(full) if s.op_compatible]


# --------------------------------------------------------------------------------------------
# The reference is torch's math.


@pytest.mark.parametrize("sample", batched_conv_samples(), ids=repr)
def test_reference_conv2d_and_its_gradients_are_torchs(sample):
    x, w, b = make_conv(sample, "cpu", torch.float64, requires_grad=True)
    params = sample.conv2d_params()
    expected = TF.conv2d(x, w, b, *params)
    torch.testing.assert_close(reference.conv2d(x, w, b, *params), expected, **TOL[torch.float64])
    grad = torch.randn_like(expected)
    inputs = [t for t in (x, w, b) if t is not None]
    expected_grads = torch.autograd.grad(expected, inputs, grad)
    with torch.no_grad():
        ours = [reference.conv2d_backward_input(grad, x, w, *params), reference.conv2d_backward_weight(grad, x, w, *params),
                reference.conv2d_backward_bias(grad)]
    for mine, theirs, name in zip(ours, expected_grads, ("input", "weight", "bias")):
        torch.testing.assert_close(mine, theirs, **TOL[torch.float64], msg=lambda m: f"∂L/∂{name}: {m}")


@pytest.mark.parametrize("sample", batched_pool_samples(full=True), ids=repr)
def test_reference_max_pool2d_and_its_gradient_are_torchs(sample):
    (x,) = sample.inputs("cpu", torch.float64, requires_grad=True)
    params = sample.max_pool2d_params()
    expected, expected_indices = TF.max_pool2d(x, *params, return_indices=True)
    out, indices = reference.max_pool2d_with_indices(x.detach(), *params)
    torch.testing.assert_close(out, expected.detach(), rtol=0, atol=0)
    assert torch.equal(indices, expected_indices)
    grad = torch.randn_like(expected)
    (expected_grad,) = torch.autograd.grad(expected, x, grad)
    torch.testing.assert_close(reference.max_pool2d_backward(grad, x.detach(), indices, *params), expected_grad)


def test_reference_max_pool2d_takes_torchs_ties_nans_and_infinities():
    x = torch.tensor([[[[1.0, 1.0, -float("inf"), -float("inf")],
                        [0.0, 1.0, -float("inf"), -float("inf")],
                        [float("nan"), 2.0, 3.0, float("nan")],
                        [5.0, float("nan"), float("nan"), 4.0]]]])
    out, indices = reference.max_pool2d_with_indices(x, (2, 2), (2, 2))
    expected, expected_indices = TF.max_pool2d(x, 2, return_indices=True)
    torch.testing.assert_close(out, expected, equal_nan=True)
    assert indices.tolist() == expected_indices.tolist() == [[[[0, 2], [13, 14]]]]  # first tie, first −inf, last NaN


def test_reference_relu_passes_its_gradient_at_zero():
    """The design notes' ReLU: gradient 1 for z ≥ 0 (torch's is 0 at z = 0); NaN stays NaN and passes."""
    z = torch.tensor([-2.0, -0.0, 0.0, 3.0, float("nan")], requires_grad=True)
    a, passes = reference.relu(z.detach())
    torch.testing.assert_close(a, torch.relu(z).detach(), equal_nan=True)
    assert passes.tolist() == [False, True, True, True, True]
    (torchs,) = torch.autograd.grad(torch.relu(z).sum(), z)
    assert reference.relu_backward(torch.ones(5), passes).tolist() == [0, 1, 1, 1, 1]
    assert torchs.tolist()[:4] == [0, 0, 0, 1]  # the difference is at zero alone


CROSS_ENTROPY_CASES = len(list(cross_entropy_sample_inputs("cpu", torch.float64)))


@pytest.mark.parametrize("index", range(CROSS_ENTROPY_CASES))
def test_reference_cross_entropy_and_its_gradient_are_torchs(index):
    x, target, weight, reduction, ignore_index, smoothing = list(cross_entropy_sample_inputs("cpu", torch.float64))[index]
    x.requires_grad_()
    expected = TF.cross_entropy(x, target, weight, ignore_index=ignore_index, reduction=reduction,
                                label_smoothing=smoothing)
    loss, lse, total_weight = reference.cross_entropy(x.detach(), target, weight, reduction, ignore_index, smoothing)
    torch.testing.assert_close(loss, expected.detach(), equal_nan=True)
    torch.testing.assert_close(lse, torch.logsumexp(x.detach(), 1))
    grad = torch.randn_like(expected)
    (expected_grad,) = torch.autograd.grad(expected, x, grad)
    ours = reference.cross_entropy_backward(grad, x.detach(), target, weight, lse, total_weight, reduction,
                                            ignore_index, smoothing)
    torch.testing.assert_close(ours, expected_grad, equal_nan=True)


def test_reference_linear_and_its_gradients_are_torchs():
    h = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    expected = TF.linear(h, w, b)
    torch.testing.assert_close(reference.linear(h, w, b), expected)
    grad = torch.randn_like(expected)
    for mine, theirs in zip(reference.linear_backward(grad, h.detach(), w.detach()),
                            torch.autograd.grad(expected, (h, w, b), grad)):
        torch.testing.assert_close(mine, theirs)


def test_reference_sgd_step_is_torchs():
    theta = torch.randn(4, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(4, dtype=torch.float64)
    expected = reference.sgd_step(theta.detach(), grad, 0.5)
    theta.grad = grad
    torch.optim.SGD([theta], lr=0.5).step()
    torch.testing.assert_close(theta.detach(), expected)


# --------------------------------------------------------------------------------------------
# Every op, and every gradient, is the reference's: the CPU kernels over the full sample sweep, the
# emulated CUDA kernels over the short one (test_conv2d and test_max_pool2d sweep them fully).


def _assert_outputs_equal(ours, expected, dtype, what):
    """Values within the dtype's tolerance; indices and masks exactly."""
    ours = ours if isinstance(ours, tuple) else (ours,)
    expected = expected if isinstance(expected, tuple) else (expected,)
    assert len(ours) == len(expected), what
    for i, (mine, theirs) in enumerate(zip(ours, expected)):
        assert mine.dtype == theirs.dtype, f"{what}: output {i} is {mine.dtype}, not {theirs.dtype}"
        if theirs.dtype in (torch.bool, torch.long):
            assert torch.equal(mine, theirs), f"{what}: output {i} differs"
        else:
            torch.testing.assert_close(mine, theirs, **TOL[dtype], equal_nan=True,
                                       msg=lambda m: f"{what}: output {i}: {m}")


def _assert_decisions_within_tolerance(op, args, ours, dtype, what):
    """In float32 the kernel's Y and the reference's differ in the last bits, so a Y within rounding
    of 0 may pass the ReLU in one and not the other, and two near-equal values may swap a window's
    argmax. What must hold: every mask agrees wherever |Y| is clear of 0, and every index names a
    value of its window within rounding of the window's max."""
    tol = TOL[dtype]["atol"] + TOL[dtype]["rtol"]
    y = reference.conv2d(*args[:7])
    scale = max(1.0, y.abs().max().item()) if y.numel() else 1.0
    if op == "conv2d_relu":
        clear = y.abs() > tol * scale
        assert torch.equal(ours[1][clear], (y >= 0)[clear]), f"{what}: mask"
        return
    _, indices, passes = ours
    a = reference.relu(y)[0]
    pooled = reference.max_pool2d_with_indices(a, (2, 2), (2, 2), (0, 0), (1, 1), args[7])[0]
    chosen = a.flatten(2).gather(2, indices.flatten(2)).view_as(indices)
    assert (chosen >= pooled - tol * scale).all(), f"{what}: an index names no max of its window"
    y_chosen = y.flatten(2).gather(2, indices.flatten(2)).view_as(indices)
    clear = y_chosen.abs() > tol * scale
    assert torch.equal(passes[clear], (y_chosen >= 0)[clear]), f"{what}: mask"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", SAMPLE_INPUTS)
def test_every_op_is_the_reference(op, device, kernels, dtype):
    checked = 0
    for args in SAMPLE_INPUTS[op](device, dtype, full=kernels == "cpu"):
        ours = getattr(torch.ops.torchcnn, op)(*args)
        expected = getattr(reference, op)(*args)
        what = f"{op}{[tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in args]}"
        if dtype == torch.float32 and op in ("conv2d_relu", "conv2d_relu_max_pool2d"):
            _assert_decisions_within_tolerance(op, args, ours, dtype, what)
            ours, expected = ours[0], expected[0]  # the values: the pooled ones at indices within rounding
        _assert_outputs_equal(ours, expected, dtype, what)
        checked += 1
    assert checked >= 5


@pytest.mark.parametrize("shape", [(1, 1, 1, 3), (1, 2, 3, 1)], ids=str)
def test_pool_windows_with_no_pixel_are_the_reference(shape, device):
    """A dilated window in the padding holds no pixel: −inf, an index outside it, and no gradient."""
    x = torch.randn(shape, dtype=torch.float64)
    params = ([2, 2], [1, 1], [1, 1], [2, 2], False)
    ours = torch.ops.torchcnn.max_pool2d_with_indices(x, *params)
    _assert_outputs_equal(ours, reference.max_pool2d_with_indices(x, *params), torch.float64, "forward")
    assert ours[0].isinf().any()
    grad = torch.randn_like(ours[0])
    _assert_outputs_equal(torch.ops.torchcnn.max_pool2d_backward(grad, x, ours[1], *params),
                          reference.max_pool2d_backward(grad, x, ours[1], *params), torch.float64, "backward")


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_backward_is_the_reference(device, dtype):
    for x, target, weight, reduction, ignore_index, smoothing in cross_entropy_sample_inputs(device, dtype):
        loss, lse, total_weight = torch.ops.torchcnn.cross_entropy(x, target, weight, reduction, ignore_index, smoothing)
        grad = torch.randn_like(loss)
        args = (grad, x, target, weight, lse, total_weight, reduction, ignore_index, smoothing)
        _assert_outputs_equal(torch.ops.torchcnn.cross_entropy_backward(*args), reference.cross_entropy_backward(*args),
                              dtype, f"cross_entropy_backward {tuple(x.shape)} {reduction}")


def _reference_conv_gradients(grad_y, x, w, b, params):
    return (reference.conv2d_backward_input(grad_y, x, w, *params), reference.conv2d_backward_weight(grad_y, x, w, *params),
            reference.conv2d_backward_bias(grad_y) if b is not None else None)


def _autograd(outputs, inputs, grad):
    grads = torch.autograd.grad(outputs, [t for t in inputs if t is not None], grad)
    it = iter(grads)
    return [next(it) if t is not None else None for t in inputs]


def _assert_gradients(ours, expected, dtype, what):
    for mine, theirs, name in zip(ours, expected, ("input", "weight", "bias")):
        assert (mine is None) == (theirs is None), f"{what}: ∂L/∂{name}"
        if theirs is not None:
            torch.testing.assert_close(mine, theirs, **TOL[dtype], msg=lambda m: f"{what}: ∂L/∂{name}: {m}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layer", ["conv2d", "conv2d_relu", "conv2d_relu_max_pool2d"])
def test_every_layer_backward_is_the_reference(layer, device, kernels, dtype):
    """Through autograd (the route each layer takes: the sparse pooled backward on the CPU
    included), against the reference's chain: ∂L/∂Y from the pooled or ReLU gradient, then
    ∂L/∂X, ∂L/∂W and ∂L/∂b from ∂L/∂Y."""
    for args in SAMPLE_INPUTS[layer](device, dtype, full=kernels == "cpu"):
        x, w, b = (t.detach().requires_grad_() if t is not None else None for t in args[:3])
        params = args[3:7]
        out = getattr(torch.ops.torchcnn, layer)(x, w, b, *args[3:])
        first = out[0] if isinstance(out, tuple) else out
        grad = torch.randn_like(first)
        ours = _autograd(first, (x, w, b), grad)
        with torch.no_grad():  # the forward's masks and indices are the op's (held to the reference above)
            if layer == "conv2d":
                grad_y = grad
            elif layer == "conv2d_relu":
                grad_y = reference.relu_backward(grad, out[1])
            else:
                y = x.new_empty(x.shape[0], w.shape[0], *reference.conv2d_output_plane(x, w, *params[:3]))  # ∂L/∂Y's shape
                grad_y = reference.max_pool2d_backward(reference.relu_backward(grad, out[2]), y, out[1], (2, 2), (2, 2),
                                                       (0, 0), (1, 1), args[7])
            expected = _reference_conv_gradients(grad_y, x, w, b, params)
        _assert_gradients(ours, expected, dtype, f"{layer} {tuple(x.shape)} {tuple(w.shape)} {params}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", ["max_pool2d_with_indices", "relu", "cross_entropy"])
def test_every_other_backward_is_the_reference(op, device, kernels, dtype):
    for args in SAMPLE_INPUTS[op](device, dtype, full=kernels == "cpu"):
        x = args[0].detach().requires_grad_()
        if x.numel() == 0:
            continue
        out = getattr(torch.ops.torchcnn, op)(x, *args[1:])
        grad = torch.randn_like(out[0])
        (ours,) = torch.autograd.grad(out[0], x, grad)
        with torch.no_grad():
            if op == "max_pool2d_with_indices":
                expected = reference.max_pool2d_backward(grad, x, out[1], *args[1:])
            elif op == "relu":
                expected = reference.relu_backward(grad, reference.relu(x)[1])
            else:
                _, lse, total_weight = reference.cross_entropy(x, *args[1:])
                expected = reference.cross_entropy_backward(grad, x, args[1], args[2], lse, total_weight, *args[3:])
        torch.testing.assert_close(ours, expected, **TOL[dtype], msg=lambda m: f"{op} {tuple(x.shape)}: {m}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("strategy", CPU_CONV2D_STRATEGIES)
def test_every_cpu_strategy_is_the_reference(strategy, dtype):
    """Each CPU algorithm, forced wherever it applies, forward and gradients."""
    samples = [s for s, _ in CPU_STRATEGY_SAMPLES] + batched_conv_samples()
    with forced_cpu_conv2d_strategy(strategy):
        for sample in samples:
            x, w, b = make_conv(sample, "cpu", dtype, requires_grad=True)
            params = sample.conv2d_params()
            out = F.conv2d(x, w, b, *params)
            with torch.no_grad():
                torch.testing.assert_close(out, reference.conv2d(x, w, b, *params), **TOL[dtype])
            grad = torch.randn_like(out)
            ours = _autograd(out, (x, w, b), grad)
            with torch.no_grad():
                _assert_gradients(ours, _reference_conv_gradients(grad, x, w, b, params), dtype,
                                  f"{strategy} {sample}")
