"""The fused ops conv2d_relu and conv2d_relu_max_pool2d against the composition of torchcnn's
separate ops (values and indices exactly, gradients to float tolerance) and against torch, on every
device's kernels; the ReLU's convention at zero; every workflow (vmap, forward AD, higher-order
gradients, autocast, channels_last); the layers' weights interchange; and the MNIST model, fused
and not, step for step. gradcheck, opcheck and compile draw from samples.py (test_ops.py,
test_compile.py)."""

import platform
import warnings

import pytest
import torch

import torchcnn
import torchcnn.functional as F
from samples import conv2d_samples, make_conv
from torchcnn.mnist.model import MnistNet
from torchcnn.testing import cpu_capability, forced_fused_backward_route

TOLERANCE = {torch.float64: {}, torch.float32: {"rtol": 1e-5, "atol": 1e-5}}


def _composed(x, w, b, kwargs, ceil_mode=None):
    """relu(conv2d(...)), pooled 2×2 when ceil_mode is given, from torchcnn's separate ops."""
    a = F.relu(F.conv2d(x, w, b, **kwargs))
    return a if ceil_mode is None else F.max_pool2d(a, 2, ceil_mode=ceil_mode, return_indices=True)


def _pools(sample, ceil_mode):
    x, w, _ = make_conv(sample, "meta", torch.float32)
    with warnings.catch_warnings():  # torch's note on padding='same' with an even kernel
        warnings.simplefilter("ignore")
        y = torch.nn.functional.conv2d(x, w, None, **sample.kwargs)
    return ceil_mode or min(y.shape[-2:]) >= 2


def _grads(outputs, inputs, grad):
    inputs = [t for t in inputs if t is not None and t.requires_grad]
    return torch.autograd.grad(outputs, inputs, grad)


@pytest.mark.parametrize("ceil_mode", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("sample", [s for s in conv2d_samples() if s.shape[0] != 0], ids=repr)
def test_conv2d_relu_max_pool2d_is_the_composition(sample, dtype, ceil_mode, device):
    if not _pools(sample, ceil_mode):
        pytest.skip("the convolution's output is smaller than the pool")
    x, w, b = make_conv(sample, device, dtype, requires_grad=True)
    out, indices = F.conv2d_relu_max_pool2d(x, w, b, **sample.kwargs, ceil_mode=ceil_mode, return_indices=True)
    expected, expected_indices = _composed(x, w, b, sample.kwargs, ceil_mode)
    assert torch.equal(out, expected) and torch.equal(indices, expected_indices)
    grad = torch.randn_like(out)
    for got, want in zip(_grads(out, (x, w, b), grad), _grads(expected, (x, w, b), grad)):
        # On the CPU the fused backward sums the non-zeros of ∂L/∂Y alone, in another order than the
        # composition's GEMMs: float32 sums of many terms agree to rounding at their scale.
        tolerance = dict(TOLERANCE[dtype])
        if tolerance and want.numel():
            tolerance["atol"] *= max(1.0, float(want.abs().max()))
        torch.testing.assert_close(got, want, **tolerance)
    # ... and torch's own layers give the same values.
    reference = torch.nn.functional.max_pool2d(torch.relu(torch.nn.functional.conv2d(x, w, b, **sample.kwargs)), 2,
                                               ceil_mode=ceil_mode)
    torch.testing.assert_close(out, reference, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("sample", [s for s in conv2d_samples() if s.shape[0] != 0], ids=repr)
def test_conv2d_relu_is_the_composition(sample, dtype, device):
    x, w, b = make_conv(sample, device, dtype, requires_grad=True)
    out = F.conv2d_relu(x, w, b, **sample.kwargs)
    expected = _composed(x, w, b, sample.kwargs)
    assert torch.equal(out, expected)
    grad = torch.randn_like(out)
    for got, want in zip(_grads(out, (x, w, b), grad), _grads(expected, (x, w, b), grad)):
        torch.testing.assert_close(got, want, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types_round_the_convolution_before_the_relu(dtype, device):
    """Y is rounded to the half type before the ReLU and the pool see it, as in the composition:
    the same values, indices and sign of zero."""
    x = torch.randn(3, 8, 13, 11, dtype=dtype, device=device)
    w = torch.randn(16, 8, 3, 3, dtype=dtype, device=device) / 8
    b = torch.randn(16, dtype=dtype, device=device)
    for ceil_mode in (False, True):
        out, indices = F.conv2d_relu_max_pool2d(x, w, b, padding=1, ceil_mode=ceil_mode, return_indices=True)
        expected, expected_indices = _composed(x, w, b, {"padding": 1}, ceil_mode)
        assert torch.equal(out, expected) and torch.equal(indices, expected_indices)
        assert torch.equal(out.signbit(), expected.signbit())
    assert torch.equal(F.conv2d_relu(x, w, b, padding=1), _composed(x, w, b, {"padding": 1}))


def test_the_relu_passes_its_gradient_at_zero(device):
    """An image that is zero in places and a conv without bias give Y = 0 exactly there: the design
    notes' ReLU passes the gradient at Y = 0, so those pixels' windows (all zero: the first tap is
    the argmax) send it on — unlike torch's ReLU. Where Y < 0 it is blocked."""
    x = torch.zeros(2, 2, 8, 8, dtype=torch.float64, device=device)
    x[:, :, 4:, 4:] = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, device=device, requires_grad=True)
    x.requires_grad_()
    out, indices = F.conv2d_relu_max_pool2d(x, w, None, padding=1, return_indices=True)
    y = torch.nn.functional.conv2d(x, w, padding=1)
    assert (y == 0).any() and (y < 0).any()
    grad = torch.ones_like(out)
    got = torch.autograd.grad(out, (x, w), grad)
    want = _grads(_composed(x, w, None, {"padding": 1}, False)[0], (x, w), grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    # ∂L/∂Y by hand: 1 at each window's argmax where Y there is ≥ 0.
    at_argmax = y.flatten(2).gather(2, indices.flatten(2)).view_as(out)
    grad_y = torch.zeros_like(y).flatten(2).scatter_(2, indices.flatten(2), (at_argmax >= 0).to(y.dtype).flatten(2))
    (grad_w,) = torch.autograd.grad(y, w, grad_y.view_as(y), retain_graph=True)
    torch.testing.assert_close(got[1], grad_w)
    # conv2d_relu: the same convention without the pool.
    a = F.conv2d_relu(x, w, None, padding=1)
    torch.testing.assert_close(torch.autograd.grad(a.sum(), w)[0],
                               torch.autograd.grad(y, w, (y >= 0).to(y.dtype))[0])


def test_nan_and_ties(device):
    """NaN propagates (and passes its gradient), ties keep the first tap — as in the composition."""
    x = torch.randn(1, 1, 6, 6, dtype=torch.float64, device=device)
    x[0, 0, 1, 1] = float("nan")
    w = torch.ones(2, 1, 1, 1, dtype=torch.float64, device=device)
    w[1] = -1  # every window of channel 1 is all ≤ 0 but the NaN's: ties everywhere
    x.requires_grad_()
    out, indices = F.conv2d_relu_max_pool2d(x, w, return_indices=True)
    expected, expected_indices = _composed(x, w, None, {}, False)
    assert torch.equal(out.isnan(), expected.isnan()) and torch.equal(out.nan_to_num(), expected.nan_to_num())
    assert torch.equal(indices, expected_indices)
    grad = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, x, grad)[0], torch.autograd.grad(expected, x, grad)[0],
                               equal_nan=True)


@pytest.mark.parametrize("width", [70, 37])
def test_nan_and_ties_in_rows_of_many_float_windows(device, width):
    """The float row kernels (8 or 16 windows a step, and the tail): the ReLU's zeros tie (−0 among
    them), NaN wins and passes its gradient — values, indices and ∂X as composed."""
    x = torch.randint(-3, 4, (2, 1, 9, width), device=device).float()  # few distinct values: many ties
    x.view(-1)[::29] = float("nan")
    x.view(-1)[7::23] = -0.0
    w = torch.tensor([1.0, -1.0], device=device).view(2, 1, 1, 1)
    x.requires_grad_()
    out, indices = F.conv2d_relu_max_pool2d(x, w, return_indices=True)
    expected, expected_indices = _composed(x, w, None, {}, False)
    torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(indices, expected_indices)
    grad = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, x, grad)[0], torch.autograd.grad(expected, x, grad)[0],
                               equal_nan=True)


def test_errors_name_the_op_and_the_argument(device):
    x, w = torch.randn(1, 2, 3, 3, device=device), torch.randn(4, 2, 3, 3, device=device)
    with pytest.raises(ValueError, match=r"conv2d_relu_max_pool2d: the 2×2 max pool needs a convolution output of "
                                         r"at least 2×2 \(1×1 with ceil_mode\) but the convolution gives 1×1"):
        F.conv2d_relu_max_pool2d(x, w)
    assert F.conv2d_relu_max_pool2d(x, w, ceil_mode=True).shape == (1, 4, 1, 1)
    with pytest.raises(ValueError, match="conv2d_relu: expected input to have 2 channels"):
        F.conv2d_relu(torch.randn(1, 4, 5, 5, device=device), w)
    with pytest.raises(TypeError, match="conv2d_relu_max_pool2d: expected stride to be an int or a pair"):
        F.conv2d_relu_max_pool2d(x, w, stride="2")


@pytest.mark.no_emulation
def test_fake_kernel_raises_as_the_kernel():
    x, w = torch.randn(1, 2, 3, 3), torch.randn(4, 2, 3, 3)
    with torch._subclasses.FakeTensorMode() as mode:
        fx, fw = mode.from_tensor(x), mode.from_tensor(w)
        with pytest.raises(ValueError, match="the 2×2 max pool needs a convolution output of at least 2×2"):
            torch.ops.torchcnn.conv2d_relu_max_pool2d(fx, fw)
        out, indices, passes = torch.ops.torchcnn.conv2d_relu_max_pool2d(fx, fw, ceil_mode=True)
    assert out.shape == indices.shape == passes.shape == (1, 4, 1, 1)
    assert (indices.dtype, passes.dtype) == (torch.long, torch.bool)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_memory_format_follows_the_convolution(memory_format, device):
    x = torch.randn(2, 4, 8, 8, device=device).contiguous(memory_format=memory_format).requires_grad_()
    w = torch.randn(6, 4, 3, 3, device=device).requires_grad_()
    out, indices = F.conv2d_relu_max_pool2d(x, w, padding=1, return_indices=True)
    expected, expected_indices = _composed(x, w, None, {"padding": 1}, False)
    assert out.is_contiguous(memory_format=memory_format) and indices.is_contiguous(memory_format=memory_format)
    assert torch.equal(out, expected) and torch.equal(indices, expected_indices)
    grad_x, = torch.autograd.grad(out, x, torch.ones_like(out))
    assert grad_x.is_contiguous(memory_format=memory_format)
    assert F.conv2d_relu(x, w, padding=1).is_contiguous(memory_format=memory_format)


def test_gradients_of_any_order_and_forward_mode(device):
    """gradgradcheck through both fused ops (the ReLU mask and indices are constants of the
    gradient), and forward-mode AD against the composition."""
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, device=device, requires_grad=True)
    pooled = lambda *t: F.conv2d_relu_max_pool2d(*t, padding=1, ceil_mode=True)  # noqa: E731
    relu = lambda *t: F.conv2d_relu(*t, padding=1)  # noqa: E731
    for function in (pooled, relu):
        assert torch.autograd.gradgradcheck(function, (x, w, b), fast_mode=True)
    tangents = tuple(torch.randn_like(t) for t in (x, w, b))
    for function, composed in ((pooled, lambda *t: _composed(*t, {"padding": 1}, True)[0]),
                               (relu, lambda *t: _composed(*t, {"padding": 1}))):
        _, got = torch.func.jvp(function, (x, w, b), tangents)
        _, want = torch.func.jvp(composed, (x, w, b), tangents)
        torch.testing.assert_close(got, want)


def _fused_block(nn):
    return torch.nn.Sequential(nn.Conv2dReLUMaxPool2d(2, 4, 3, padding=1), nn.Conv2dReLU(4, 3, 3),
                               torch.nn.Flatten(), torch.nn.Linear(3 * 2 * 2, 5))


def _unfused_block(nn):
    return torch.nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 3, 3),
                               nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(3 * 2 * 2, 5))


def test_per_sample_gradients_and_vmap_over_weights(device):
    torch.manual_seed(0)
    fused = _fused_block(torchcnn.nn).to(device).double()
    unfused = _unfused_block(torchcnn.nn).to(device).double()
    unfused[0].load_state_dict(fused[0].state_dict())
    unfused[3].load_state_dict(fused[1].state_dict())
    unfused[6].load_state_dict(fused[3].state_dict())
    x = torch.randn(5, 2, 8, 8, dtype=torch.float64, device=device)
    y = torch.randint(0, 5, (5,), device=device)

    def per_sample(model):
        params = dict(model.named_parameters())

        def loss(p, xi, yi):
            logits = torch.func.functional_call(model, p, (xi[None],))
            return torch.nn.functional.cross_entropy(logits, yi[None])

        return torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)

    got, want = per_sample(fused), per_sample(unfused)
    names = {"0.weight": "0.weight", "0.bias": "0.bias", "1.weight": "3.weight", "1.bias": "3.bias",
             "3.weight": "6.weight", "3.bias": "6.bias"}
    for name, other in names.items():
        torch.testing.assert_close(got[name], want[other])
    # vmap over a stack of weights (folded into the channels as groups).
    ws = torch.randn(3, 4, 2, 3, 3, dtype=torch.float64, device=device)
    bs = torch.randn(3, 4, dtype=torch.float64, device=device)
    got = torch.func.vmap(lambda w, b: F.conv2d_relu_max_pool2d(x, w, b, padding=1))(ws, bs)
    want = torch.stack([_composed(x, w, b, {"padding": 1}, False)[0] for w, b in zip(ws, bs)])
    torch.testing.assert_close(got, want)


def test_layers_share_conv2d_weights_both_ways():
    torch.manual_seed(0)
    reference = torch.nn.Conv2d(3, 5, 3, padding=1, bias=True)
    for layer in (torchcnn.nn.Conv2dReLU(3, 5, 3, padding=1), torchcnn.nn.Conv2dReLUMaxPool2d(3, 5, 3, padding=1)):
        assert layer.state_dict().keys() == reference.state_dict().keys()
        layer.load_state_dict(reference.state_dict())
        reference.load_state_dict(layer.state_dict())
    # The same seed, the same initial weights as torch.nn.Conv2d, and torch's values from them.
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(3, 5, 3)
    torch.manual_seed(1)
    fused = torchcnn.nn.Conv2dReLUMaxPool2d(3, 5, 3, ceil_mode=True)
    assert torch.equal(fused.weight, conv.weight) and torch.equal(fused.bias, conv.bias)
    x = torch.randn(2, 3, 9, 9)
    torch.testing.assert_close(fused(x), torch.nn.functional.max_pool2d(torch.relu(conv(x)), 2, ceil_mode=True))
    assert "ceil_mode=True" in repr(fused)


def test_autocast_runs_the_fused_ops_in_the_autocast_dtype():
    x = torch.randn(2, 3, 8, 8)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = F.conv2d_relu_max_pool2d(x, w, padding=1)
        expected = _composed(x, w, None, {"padding": 1}, False)[0]
        relu_out = F.conv2d_relu(x, w, padding=1)
    assert out.dtype == relu_out.dtype == torch.bfloat16
    assert torch.equal(out, expected)
    out.float().sum().backward()
    assert w.grad.dtype == torch.float32


@pytest.mark.no_emulation
def test_compiled_fused_model_matches_eager(device):
    torch.manual_seed(0)
    model = _fused_block(torchcnn.nn).to(device)
    x = torch.randn(3, 2, 8, 8, device=device)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), model(x))
    torch.testing.assert_close(torch.autograd.grad(compiled(x).sum(), list(model.parameters())),
                               torch.autograd.grad(model(x).sum(), list(model.parameters())))


def test_mnist_model_fused_and_unfused_train_alike(device):
    """Same seed, same weights, same state_dict keys; three SGD steps give the same losses and
    weights to float tolerance."""
    torch.manual_seed(0)
    fused = MnistNet("torchcnn", dropout=0.0).to(device)
    torch.manual_seed(0)
    unfused = MnistNet("torchcnn", dropout=0.0, fuse=False).to(device)
    assert fused.state_dict().keys() == unfused.state_dict().keys()
    for a, b in zip(fused.state_dict().values(), unfused.state_dict().values()):
        assert torch.equal(a, b)
    assert any(isinstance(m, torchcnn.nn.Conv2dReLUMaxPool2d) for m in fused.modules())
    assert not any(isinstance(m, torchcnn.nn.Conv2dReLUMaxPool2d) for m in unfused.modules())
    loss_fn = torchcnn.nn.CrossEntropyLoss()
    x = torch.randn(16, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (16,), device=device)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (fused, unfused)]
    for _ in range(3):
        losses = []
        for model, optimizer in zip((fused, unfused), optimizers):
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[0], losses[1])
    for a, b in zip(fused.parameters(), unfused.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # A torch.nn model's weights load into the fused one and give its outputs.
    reference = MnistNet("torch", dropout=0.0).to(device).eval()
    fused.load_state_dict(reference.state_dict())
    torch.testing.assert_close(fused.eval()(x), reference(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("width", [64, 75, 5])
def test_relu_pool_over_many_windows_matches_torch(width, device):
    """The fused pool's rows (vector steps of 16 and their tails, and ceil_mode's partial windows)
    against torch's own ops: the design notes' ReLU as torch.threshold, then torch's max pool —
    values and indices exactly, with ties (zeros after the ReLU), NaN and −inf."""
    x = torch.randint(-3, 4, (2, 1, 11, width), device=device).float()
    x.view(-1)[::29] = float("nan")
    x.view(-1)[3::31] = float("-inf")
    w = torch.ones(3, 1, 1, 1, device=device)
    w[1] = -1
    for ceil_mode in (False, True):
        out, indices = F.conv2d_relu_max_pool2d(x, w, ceil_mode=ceil_mode, return_indices=True)
        relu = torch.threshold(torch.nn.functional.conv2d(x, w), -torch.finfo(x.dtype).tiny * torch.finfo(x.dtype).eps, 0)
        expected, expected_indices = torch.nn.functional.max_pool2d(relu, 2, ceil_mode=ceil_mode, return_indices=True)
        torch.testing.assert_close(out, expected, equal_nan=True)
        assert torch.equal(indices, expected_indices)


def test_an_empty_batch_gives_empty_results_and_gradients(device):
    x = torch.randn(0, 3, 8, 8, device=device, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, device=device, requires_grad=True)
    b = torch.randn(4, device=device, requires_grad=True)
    out, indices = F.conv2d_relu_max_pool2d(x, w, b, padding=1, return_indices=True)
    assert out.shape == indices.shape == (0, 4, 4, 4)
    grads = torch.autograd.grad(out.sum() + F.conv2d_relu(x, w, b).sum(), (x, w, b))
    assert grads[0].shape == x.shape and torch.equal(grads[1], torch.zeros_like(w))
    assert torch.equal(grads[2], torch.zeros_like(b))


# --------------------------------------------------------------------------------------------
# The CPU's sparse backward of conv2d_relu_max_pool2d (torch.ops.torchcnn._cpu_conv2d_relu_max_pool2d_backward),
# which takes ∂L/∂Y's non-zeros alone, against the dense route (max_pool2d_backward, then conv2d's
# gradient ops) that the GPU, create_graph and torch.func take.

SPARSE_OP = torch.ops.torchcnn._cpu_conv2d_relu_max_pool2d_backward


def _backward_by(route, x, w, b, kwargs, ceil_mode, grad):
    out = F.conv2d_relu_max_pool2d(x, w, b, **kwargs, ceil_mode=ceil_mode)
    with forced_fused_backward_route(route), torch.profiler.profile() as prof:
        grads = _grads(out, (x, w, b), grad)
    assert any(e.name.endswith("_cpu_conv2d_relu_max_pool2d_backward") for e in prof.events()) == (route == "sparse")
    return grads


@pytest.mark.parametrize("ceil_mode", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sample", [s for s in conv2d_samples() if s.shape[0] != 0], ids=repr)
def test_the_sparse_cpu_backward_is_the_dense_one(sample, dtype, ceil_mode):
    if not _pools(sample, ceil_mode):
        pytest.skip("the convolution's output is smaller than the pool")
    x, w, b = make_conv(sample, "cpu", dtype, requires_grad=True)
    grad = torch.randn_like(F.conv2d_relu_max_pool2d(x, w, b, **sample.kwargs, ceil_mode=ceil_mode))
    sparse = _backward_by("sparse", x, w, b, sample.kwargs, ceil_mode, grad)
    dense = _backward_by("dense", x, w, b, sample.kwargs, ceil_mode, grad)
    for got, want in zip(sparse, dense):
        assert got.shape == want.shape and got.stride() == want.stride() and got.dtype == want.dtype
        scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
        tolerance = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2)}[dtype]
        torch.testing.assert_close(got, want, rtol=tolerance[0], atol=tolerance[1] * scale)


def test_the_sparse_backward_serves_wide_filters_and_not_what_differentiates_it_again():
    """The route the CPU backward takes: the sparse op where a filter row is ≥ 16 values (the
    MNIST model's second layer) and, for ∂W alone in float (a network's first layer), where a
    filter is a few short rows (one channel, 3×3 to 7×7) and the CPU has AVX2 or AVX-512; no
    sparse route at x86's baseline tier; the dense route for short rows that
    need ∂X, for double's, for filters of more than eight pieces, and whenever the backward is
    itself differentiated (create_graph)."""
    torchcnn.load()  # before the first call: the C++ node, which takes the sparse op, serves only calls after it

    def takes_sparse(channels, create_graph=False, first_layer=False, dtype=torch.float64, kernel=3, groups=1):
        x = torch.randn(2, channels, 12, 12, dtype=dtype, requires_grad=not first_layer)
        w = torch.randn(8, channels // groups, kernel, kernel, dtype=dtype, requires_grad=True)
        out = F.conv2d_relu_max_pool2d(x, w, None, padding=1, groups=groups)
        with torch.profiler.profile() as prof:
            torch.autograd.grad(out.sum(), [t for t in (x, w) if t.requires_grad], create_graph=create_graph)
        return any(e.name.endswith("_cpu_conv2d_relu_max_pool2d_backward") for e in prof.events())

    x86_baseline = cpu_capability() == "default" and platform.machine() in ("x86_64", "AMD64")
    assert takes_sparse(32) == (not x86_baseline)  # slower than the dense route at x86's baseline tier
    assert not takes_sparse(1) and not takes_sparse(32, create_graph=True)
    pays_off = cpu_capability() in ("avx512", "avx2")  # the short rows' kernel: spills at x86's baseline tier
    for kernel in (3, 5, 7):
        assert takes_sparse(1, first_layer=True, dtype=torch.float32, kernel=kernel) == pays_off
    assert takes_sparse(2, first_layer=True, dtype=torch.float32, kernel=7) == pays_off  # seven rows of 14
    assert not takes_sparse(1, first_layer=True, dtype=torch.float32, kernel=9)  # nine rows
    assert not takes_sparse(1, first_layer=True, dtype=torch.float64)
    assert not takes_sparse(1, dtype=torch.float32)  # ∂X wanted too
    assert not takes_sparse(8, first_layer=True, dtype=torch.float32, groups=4)  # nine taps of two channels


# Filters the sparse op's ∂W sums in registers all at once (at most eight pieces of at most 16
# values: csrc/cpu/sparse_pieces.h) — filter rows of 1 to 16 values, taps of a few channels when
# grouped or dilated — and one just past each limit, against the dense route.
SHORT_PIECES = [
    ((5, 1, 13, 11), (6, 1, 1, 1), {}),
    ((5, 1, 14, 15), (6, 1, 3, 3), {"padding": 1}),
    ((5, 1, 16, 16), (6, 1, 5, 5), {}),
    ((3, 1, 17, 18), (4, 1, 7, 7), {"padding": 3, "stride": 2}),
    ((3, 2, 15, 15), (4, 2, 8, 8), {"padding": 2}),  # eight rows of 16 values: two vectors each
    ((3, 3, 12, 13), (5, 3, 5, 3), {"padding": (2, 1)}),  # rows of 9
    ((3, 1, 20, 20), (4, 1, 9, 9), {}),  # nine rows: the general loop
    ((3, 17, 9, 9), (4, 17, 1, 1), {}),  # one row of 17: the general loop
    ((3, 4, 12, 12), (6, 2, 2, 2), {"groups": 2}),  # four taps of two channels
    ((3, 3, 14, 14), (4, 3, 2, 2), {"dilation": 2, "padding": 1}),  # four taps of three channels
]


@pytest.mark.parametrize("input_grad", [False, True])
@pytest.mark.parametrize("shape,weight_shape,kwargs", SHORT_PIECES, ids=repr)
def test_the_sparse_op_sums_short_filter_pieces_as_the_dense_route(shape, weight_shape, kwargs, input_grad):
    x = torch.randn(shape, requires_grad=input_grad)
    w = torch.randn(weight_shape, requires_grad=True)
    b = torch.randn(weight_shape[0], requires_grad=True)
    grad = torch.randn_like(F.conv2d_relu_max_pool2d(x, w, b, **kwargs))
    _, _, passes = torch.ops.torchcnn.conv2d_relu_max_pool2d(x, w, b, kwargs.get("stride", 1), kwargs.get("padding", 0),
                                                             kwargs.get("dilation", 1), kwargs.get("groups", 1), False)
    grad[~passes] = float("nan")  # where the ReLU did not pass: no part of any gradient
    sparse = _backward_by("sparse", x, w, b, kwargs, False, grad)
    dense = _backward_by("dense", x, w, b, kwargs, False, grad)
    assert len(sparse) == len(dense) == (3 if input_grad else 2)
    assert all(not t.isnan().any() for t in sparse)
    for got, want in zip(sparse, dense):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * max(1.0, float(want.abs().max())))


def _sparse_op_arguments(batch=3, channels=16, dtype=torch.float32, memory_format=torch.contiguous_format):
    x = torch.randn(batch, channels, 9, 11, dtype=dtype).to(memory_format=memory_format)
    w = torch.randn(6, channels, 3, 3, dtype=dtype)
    conv = ((1, 1), (1, 1), (1, 1), 1)
    out, indices, passes = torch.ops.torchcnn.conv2d_relu_max_pool2d(x, w, None, *conv, True)
    return (torch.randn_like(out), x, w, indices, passes, *conv, True)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_the_sparse_op_computes_what_its_mask_asks_for_in_the_fake_kernels_layout(memory_format):
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = _sparse_op_arguments(memory_format=memory_format)
    full = SPARSE_OP(*args, [True, True, True])
    for mask in ([True, False, False], [False, True, False], [False, False, True], [False, True, True]):
        got = SPARSE_OP(*args, mask)
        with FakeTensorMode(allow_non_fake_inputs=True):
            fake = SPARSE_OP(*args, mask)
        for wanted, g, f, whole in zip(mask, got, fake, full):
            assert g.shape == f.shape and g.stride() == f.stride() and g.dtype == f.dtype
            if wanted:
                torch.testing.assert_close(g, whole, rtol=0, atol=0)
            else:
                assert g.numel() == 0


def test_the_sparse_op_on_an_empty_batch_and_with_bad_indices():
    grad, x, w, indices, passes, *rest = _sparse_op_arguments(batch=0)
    grad_x, grad_w, grad_b = SPARSE_OP(grad, x, w, indices, passes, *rest, [True, True, True])
    assert grad_x.shape == x.shape and not grad_w.any() and not grad_b.any() and grad_w.shape == w.shape
    grad, x, w, indices, passes, *rest = _sparse_op_arguments()
    with pytest.raises(IndexError, match="index 99 is outside the convolution's 9×11 output plane"):
        SPARSE_OP(grad, x, w, indices.clone().fill_(99), passes, *rest, [True, True, True])
    with pytest.raises(TypeError, match="expected passes to be a bool tensor"):
        SPARSE_OP(grad, x, w, indices, passes.float(), *rest, [True, True, True])


def test_the_sparse_ops_sums_do_not_depend_on_the_thread_count():
    args = _sparse_op_arguments(batch=8, channels=32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = SPARSE_OP(*args, [True, True, True])
        torch.set_num_threads(max(2, threads))
        more = SPARSE_OP(*args, [True, True, True])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, more))


def test_the_fake_kernel_of_the_sparse_op_refuses_what_the_kernel_refuses():
    from torch._subclasses.fake_tensor import FakeTensorMode

    grad, x, w, indices, passes, *rest = _sparse_op_arguments()
    for bad in ((grad, x, w, indices.int(), passes), (grad, x, w, indices, passes.float()),
                (grad, x, w, indices, passes[:1])):
        with pytest.raises(TypeError) as real:
            SPARSE_OP(*bad, *rest, [True, True, True])
        with FakeTensorMode(allow_non_fake_inputs=True), pytest.raises(TypeError) as fake:
            SPARSE_OP(*bad, *rest, [True, True, True])
        assert str(fake.value) == str(real.value).split("\n")[0]
