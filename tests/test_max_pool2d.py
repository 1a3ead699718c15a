import pytest
import torch
import torch.nn.functional as TF

import torchcnn.functional as F
from samples import max_pool2d_samples

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def reference_max_pool2d(x, k, s):
    """The design notes' pooling, written plainly: P[i, j] = max over the k×k window at (i·s, j·s)."""
    n, c, h, w = x.shape
    oh, ow = (h - k) // s + 1, (w - k) // s + 1
    out = torch.empty(n, c, oh, ow, dtype=x.dtype)
    for i in range(oh):
        for j in range(ow):
            out[:, :, i, j] = x[:, :, i * s:i * s + k, j * s:j * s + k].amax((2, 3))
    return out


def test_matches_the_design_notes_pooling():
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64)
    torch.testing.assert_close(F.max_pool2d(x, 2), reference_max_pool2d(x, 2, 2), rtol=0, atol=0)
    torch.testing.assert_close(F.max_pool2d(x, 3, 1), reference_max_pool2d(x, 3, 1), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sample", max_pool2d_samples(), ids=repr)
def test_matches_torch_exactly(sample, device, kernels, dtype):
    """Values, indices and gradients are exactly torch's: max picks, no arithmetic."""
    x = torch.randn(sample.shape, device=device, dtype=dtype, requires_grad=True)
    ours, ours_idx = F.max_pool2d(x, **sample.kwargs, return_indices=True)
    theirs, theirs_idx = TF.max_pool2d(x, **sample.kwargs, return_indices=True)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert torch.equal(ours_idx, theirs_idx)
    grad = torch.randn_like(theirs)
    if dtype in (torch.float16, torch.bfloat16) and kernels == "cuda":
        # Where windows overlap, a pixel's gradient is a sum. The CUDA kernels (ours and torch's)
        # add in float and round once; torch's CPU kernel rounds after every addition. So the
        # reference is the exact sum, rounded once.
        x64 = x.detach().double().requires_grad_()
        expected = torch.autograd.grad(TF.max_pool2d(x64, **sample.kwargs), x64, grad.double())[0].to(dtype)
    else:
        expected = torch.autograd.grad(theirs, x, grad)[0]
    torch.testing.assert_close(torch.autograd.grad(ours, x, grad)[0], expected, rtol=0, atol=0)


@pytest.mark.parametrize("sample", max_pool2d_samples(full=False), ids=repr)
def test_gradcheck(sample, device):
    if sample.shape[0] == 0:
        pytest.skip("gradcheck needs at least one element")
    shape = list(sample.shape)
    shape[-3] = min(shape[-3], 3)  # gradcheck's Jacobian is numel² : keep it small
    # Distinct values, so that no finite-difference step changes which element is the max.
    x = torch.randperm(torch.Size(shape).numel(), dtype=torch.float64, device=device)
    x = (x / x.numel()).view(shape).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: F.max_pool2d(t, **sample.kwargs), (x,), eps=1e-6 / x.numel())


@pytest.mark.parametrize("kwargs", [dict(kernel_size=2), dict(kernel_size=3, stride=1, padding=1)])
def test_ties_nan_and_infinity_resolve_as_torch(device, kwargs):
    x = torch.tensor([[1.0, 1.0, 0.0, 5.0, 5.0, 2.0],
                      [1.0, 1.0, 5.0, 0.0, 2.0, 5.0],
                      [float("nan"), 3.0, float("-inf"), float("-inf"), 3.0, float("nan")],
                      [float("nan"), 9.0, float("-inf"), float("-inf"), float("nan"), 1.0]], device=device)
    x = x.repeat(1, 2, 1, 1).requires_grad_()
    ours, oi = F.max_pool2d(x, **kwargs, return_indices=True)
    theirs, ti = TF.max_pool2d(x, **kwargs, return_indices=True)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(oi, ti)
    grad = torch.arange(float(ours.numel()), device=device).view_as(ours)
    assert torch.equal(torch.autograd.grad(ours, x, grad)[0], torch.autograd.grad(theirs, x, grad)[0])


def test_gradient_goes_to_the_argmax_only(device):
    x = torch.tensor([[[[1.0, 4.0], [3.0, 2.0]]]], device=device, requires_grad=True)
    y = F.max_pool2d(x, 2)
    (g,) = torch.autograd.grad(y, x, torch.tensor([[[[7.0]]]], device=device))
    assert g.tolist() == [[[[0.0, 7.0], [0.0, 0.0]]]]


@pytest.mark.parametrize("layout", ["channels_last", "transposed", "sliced"])
def test_non_contiguous_inputs(device, layout):
    x = torch.randn(2, 4, 10, 12, device=device)
    x = {"channels_last": x.to(memory_format=torch.channels_last), "transposed": x.transpose(2, 3),
         "sliced": x[:, ::2, 1:, ::2]}[layout].requires_grad_()
    ours, oi = F.max_pool2d(x, 2, return_indices=True)
    theirs, ti = TF.max_pool2d(x.contiguous(), 2, return_indices=True)
    assert torch.equal(ours, theirs) and torch.equal(oi, ti)
    grad = torch.randn_like(theirs).transpose(2, 3).contiguous().transpose(2, 3)
    torch.testing.assert_close(torch.autograd.grad(ours, x, grad)[0], torch.autograd.grad(theirs, x, grad)[0])


def test_empty_batch_gives_empty_result(device):
    x = torch.randn(0, 3, 6, 6, device=device, requires_grad=True)
    y = F.max_pool2d(x, 2)
    assert y.shape == (0, 3, 3, 3)
    assert torch.autograd.grad(y.sum(), x)[0].shape == x.shape


@pytest.mark.parametrize("where,index", [((0, 1, 1, 1), 16), ((0, 1, 1, 1), 0), ((0, 1, 1, 1), 4),
                                         ((0, 0, 0, 1), -1)],
                         ids=["past the plane", "another window's pixel", "a row's pixel left of the window",
                              "negative"])
@pytest.mark.parametrize("window", [([2, 2], [2, 2], [0, 0]), ([3, 3], [2, 2], [1, 1]), ([3, 2], [2, 1], [1, 0])],
                         ids=["2x2", "3x3 stride 2 padded", "3x2"])
def test_backward_rejects_indices_outside_their_window(device, where, index, window):
    if device == "cuda":
        pytest.skip("on a GPU a device-side assert, which poisons the process's CUDA context: test_cuda.py checks it "
                    "in a process of its own")
    x = torch.randn(1, 2, 4, 4, device=device)
    out, idx = torch.ops.torchcnn.max_pool2d_with_indices(x, *window)
    idx[where] = index
    with pytest.raises(IndexError, match="not a pixel of its pooling window"):
        torch.ops.torchcnn.max_pool2d_backward(out, x, idx, *window, [1, 1], False)


# Dilated windows that hold no real pixel: every tap of a width-2, dilation-2 window that starts
# at column −1 (padding 1) falls outside a width-1 input. torch's forward gives −inf and an index
# h0·W + w0 outside the window (here pixels of other rows, and one past the plane); its CPU backward
# then adds the gradient to those pixels or writes past the end of the buffer.
EMPTY_WINDOWS = [
    dict(shape=(2, 3, 4, 1), kernel_size=2, stride=1, padding=1, dilation=(1, 2)),
    dict(shape=(2, 2, 1, 5), kernel_size=(2, 3), stride=(1, 2), padding=1, dilation=(2, 1), ceil_mode=True),
]


@pytest.mark.parametrize("case", EMPTY_WINDOWS, ids=str)
def test_windows_with_no_real_pixel_pass_no_gradient(device, case):
    kwargs = dict(case)
    x = torch.randn(kwargs.pop("shape"), device=device, dtype=torch.float64, requires_grad=True)
    ours, ours_idx = F.max_pool2d(x, **kwargs, return_indices=True)
    theirs, theirs_idx = TF.max_pool2d(x, **kwargs, return_indices=True)
    assert torch.isinf(theirs).all()  # the case is what it says
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert torch.equal(ours_idx, theirs_idx)
    (grad,) = torch.autograd.grad(ours, x, torch.randn_like(ours))
    assert torch.equal(grad, torch.zeros_like(x))


def test_ceil_mode_accepts_a_kernel_longer_than_the_input_as_torch(device):
    """With ceil_mode, a window may overhang the padded input as long as it starts inside it."""
    x = torch.randn(2, 3, 3, 1, device=device, requires_grad=True)
    for kwargs in (dict(kernel_size=3, ceil_mode=True), dict(kernel_size=(2, 3), stride=(2, 3), ceil_mode=True)):
        ours, oi = F.max_pool2d(x, **kwargs, return_indices=True)
        theirs, ti = TF.max_pool2d(x, **kwargs, return_indices=True)
        assert ours.shape == theirs.shape and ours.shape[-1] == 1
        assert torch.equal(ours, theirs) and torch.equal(oi, ti)
        grad = torch.randn_like(ours)
        assert torch.equal(torch.autograd.grad(ours, x, grad)[0], torch.autograd.grad(theirs, x, grad)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("width,offset", [(8, 0), (8, 1), (7, 0), (7, 1), (2, 1)])
def test_2x2_pool_at_any_alignment(device, dtype, width, offset):
    """The 2×2 fast path loads row pairs as vectors when rows start aligned: even widths at an even
    offset take the vector loads, the rest the scalar ones; both must give torch's result."""
    shape = (2, 3, 6, width)
    buffer = torch.randn(offset + torch.Size(shape).numel(), device=device, dtype=dtype)
    x = buffer[offset:].view(shape).requires_grad_()  # contiguous, starting `offset` elements in
    ours, oi = F.max_pool2d(x, 2, return_indices=True)
    theirs, ti = TF.max_pool2d(x, 2, return_indices=True)
    assert torch.equal(ours, theirs) and torch.equal(oi, ti)
    grad = torch.randn_like(ours)
    assert torch.equal(torch.autograd.grad(ours, x, grad)[0], torch.autograd.grad(theirs, x, grad)[0])


@pytest.mark.parametrize("width", [64, 75, 2])
def test_2x2_rows_of_many_windows_match_torch(device, width):
    """The 2×2 fast path over rows of 1 to 37 windows (vector steps of 16 and their tails), with
    ties, NaN and −inf sprinkled in: torch's values and indices (first max, NaN wins)."""
    x = torch.randint(-3, 4, (2, 3, 9, width), device=device).float()  # few distinct values: many ties
    x.view(-1)[::37] = float("nan")
    x.view(-1)[5::41] = float("-inf")
    out, idx = F.max_pool2d(x, 2, return_indices=True)
    expected, expected_idx = TF.max_pool2d(x, 2, return_indices=True)
    torch.testing.assert_close(out, expected, equal_nan=True)
    assert torch.equal(idx, expected_idx)
