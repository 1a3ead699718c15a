"""Bad input gets a Python exception that names the argument, never a crash or a wrong result."""

import pytest
import torch

import torchcnn.functional as F

X = torch.randn(2, 4, 8, 8)
W = torch.randn(6, 4, 3, 3)

CONV_ERRORS = [
    (dict(input=torch.randn(4, 8)), ValueError, "input to be 3-D"),
    (dict(input=torch.randn(1, 2, 4, 8, 8)), ValueError, "input to be 3-D"),
    (dict(weight=torch.randn(6, 4, 3)), ValueError, "weight to be a 4-D"),
    (dict(weight=torch.randn(6, 3, 3, 3)), ValueError, "expected input to have 3 channels"),
    (dict(weight=torch.randn(5, 2, 3, 3), groups=2), ValueError, "divisible by groups"),
    (dict(weight=torch.randn(6, 1, 3, 3), groups=3), ValueError, "expected input to have 3 channels"),
    (dict(input=X.long()), TypeError, "input to have a floating-point dtype"),
    (dict(weight=W.double()), TypeError, "weight to have the same dtype as input"),
    (dict(bias=torch.randn(5)), ValueError, "bias to be a 1-D tensor of 6"),
    (dict(bias=torch.randn(6).double()), TypeError, "bias to have the same dtype"),
    (dict(stride=0), ValueError, "stride to be positive"),
    (dict(stride=(1, -1)), ValueError, "stride to be positive"),
    (dict(dilation=0), ValueError, "dilation to be positive"),
    (dict(padding=-1), ValueError, "padding to be non-negative"),
    (dict(padding="full"), ValueError, "padding to be 'valid', 'same'"),
    (dict(padding="same", stride=2), ValueError, "padding='same' is not supported for strided"),
    (dict(stride=1.5), TypeError, "stride to be an int or a pair"),
    (dict(stride=(1, 2, 3)), TypeError, "stride to be an int or a pair"),
    (dict(groups=0), ValueError, "groups to be positive"),
    (dict(groups=1.0), TypeError, "groups to be an int"),
    (dict(weight=torch.randn(6, 4, 9, 3)), ValueError, "larger than the padded input"),
    (dict(weight=torch.randn(6, 4, 3, 3), dilation=5), ValueError, "larger than the padded input"),
    (dict(input=[1.0]), TypeError, "input to be a Tensor"),
]


def _on(device, args):
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}


@pytest.mark.parametrize("override,exc,message", CONV_ERRORS, ids=lambda v: str(v)[:40])
def test_conv2d_errors(override, exc, message, device):
    args = dict(input=X, weight=W, bias=None, stride=1, padding=0, dilation=1, groups=1) | override
    with pytest.raises(exc, match=message):
        F.conv2d(**_on(device, args))


def test_conv2d_errors_from_the_op_itself(device):
    x, w = X.to(device), W.to(device)
    with pytest.raises(ValueError, match="stride to have 2 elements"):
        torch.ops.torchcnn.conv2d(x, w, None, [1, 1, 1], [0, 0], [1, 1], 1)
    with pytest.raises(ValueError, match="input to be a 4-D"):
        torch.ops.torchcnn.conv2d(x[0], w)
    with pytest.raises(ValueError, match="grad_output of shape"):
        torch.ops.torchcnn.conv2d_backward_input(torch.randn(2, 6, 5, 5, device=device), x, w, [1, 1], [0, 0], [1, 1], 1)
    with pytest.raises(ValueError, match="grad_output of shape"):
        torch.ops.torchcnn.conv2d_backward_weight(torch.randn(2, 6, 6, 5, device=device), x, w, [1, 1], [0, 0], [1, 1], 1)


POOL_ERRORS = [
    (dict(input=torch.randn(4, 8)), ValueError, "input to be 3-D"),
    (dict(input=X.int()), TypeError, "input to have a floating-point dtype"),
    (dict(kernel_size=0), ValueError, "kernel_size to be positive"),
    (dict(stride=0), ValueError, "stride to be positive"),
    (dict(dilation=(1, 0)), ValueError, "dilation to be positive"),
    (dict(padding=-1), ValueError, "padding to be non-negative"),
    (dict(kernel_size=2, padding=2), ValueError, "padding to be at most half"),
    (dict(kernel_size=3, padding=2), ValueError, "padding to be at most half"),
    (dict(kernel_size=3, padding=2, dilation=2), ValueError, "padding to be at most half"),  # torch's rule
    (dict(kernel_size=9), ValueError, "larger than the padded input"),
    (dict(kernel_size=9, stride=1, ceil_mode=True), ValueError, "larger than the padded input"),
    (dict(kernel_size=3, dilation=5, padding=1), ValueError, "larger than the padded input"),
    (dict(kernel_size="2"), TypeError, "kernel_size to be an int or a pair"),
]


@pytest.mark.parametrize("override,exc,message", POOL_ERRORS, ids=lambda v: str(v)[:40])
def test_max_pool2d_errors(override, exc, message, device):
    args = dict(input=X, kernel_size=2) | override
    with pytest.raises(exc, match=message):
        F.max_pool2d(**_on(device, args))


def test_max_pool2d_backward_checks_indices(device):
    x = X.to(device)
    params = ([2, 2], [2, 2], [0, 0], [1, 1], False)
    out, idx = torch.ops.torchcnn.max_pool2d_with_indices(x, *params[:2])
    with pytest.raises(TypeError, match="indices to be int64"):
        torch.ops.torchcnn.max_pool2d_backward(out, x, idx.int(), *params)
    with pytest.raises(ValueError, match="indices of shape"):
        torch.ops.torchcnn.max_pool2d_backward(out, x, idx[:1], *params)
    with pytest.raises(ValueError, match="grad_output of shape"):
        torch.ops.torchcnn.max_pool2d_backward(out[:, :1], x, idx, *params)


@pytest.mark.parametrize("target,exc,message", [
    (torch.tensor([0, 10]), IndexError, "target 10 is out of bounds for 10 classes"),
    (torch.tensor([-1, 2]), IndexError, "target -1 is out of bounds"),
    (torch.tensor([0, 1, 2]), ValueError, "class-index targets of shape"),
    (torch.rand(2, 9), ValueError, "probability targets of input's shape"),
    (torch.tensor([True, False]), TypeError, "target to hold class indices"),
])
def test_cross_entropy_errors(target, exc, message):
    with pytest.raises(exc, match=message):
        F.cross_entropy(torch.randn(2, 10), target)


def test_cross_entropy_argument_errors():
    z, y = torch.randn(2, 10), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="reduction to be one of"):
        F.cross_entropy(z, y, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing to be in"):
        F.cross_entropy(z, y, label_smoothing=1.5)
    with pytest.raises(ValueError, match="weight to be a floating-point tensor of shape"):
        F.cross_entropy(z, y, weight=torch.ones(3))
    with pytest.raises(TypeError, match="input to have a floating-point dtype"):
        F.cross_entropy(z.long(), y)
    # ignore_index may lie outside [0, C): it is not a class
    assert torch.isfinite(F.cross_entropy(z, torch.tensor([-100, 3])))


def test_linear_errors():
    with pytest.raises(ValueError, match="in_features=5"):
        F.linear(torch.randn(3, 4), torch.randn(2, 5))
    with pytest.raises(ValueError, match="bias of shape"):
        F.linear(torch.randn(3, 5), torch.randn(2, 5), torch.randn(3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for a second device")
def test_mismatched_devices():
    with pytest.raises((ValueError, RuntimeError), match="device"):
        F.conv2d(X.cuda(), W)
