"""The CUDA forward's three routes (csrc/cuda/conv2d_tiled.cu's forward_route): the direct kernel,
the tiled kernel with the ReLU and the pool in its epilogue, and im2col + cuBLAS. Each is forced on
every conv sample and held to torch; the rule's picks and the tiled kernel's 64-bit indices are
checked too. Runs on the CUDA kernels only (a GPU, or emulated)."""

import pytest
import torch
import torch.nn.functional as TF

import torchcnn.functional as F
from conftest import cuda_ops, cuda_route
from samples import Sample, conv2d_samples, make_conv

pytestmark = pytest.mark.cuda_kernels

ROUTES = ["direct", "tiled", "gemm"]
TOLERANCE = {torch.float64: {"rtol": 1e-12, "atol": 1e-12}, torch.float32: {"rtol": 1e-5, "atol": 1e-5},
             torch.float16: {"rtol": 2e-3, "atol": 2e-3}, torch.bfloat16: {"rtol": 1.6e-2, "atol": 1.6e-2}}


def route_taken(ops, x, w, sample) -> str:
    return ops._cuda_conv2d_route(x, w, *sample.conv2d_params())


def _pools(y, ceil_mode):
    return min(y.shape[-2:]) >= (1 if ceil_mode else 2)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sample", [s for s in conv2d_samples() if s.op_compatible and s.shape[0] > 0], ids=repr)
def test_every_route_gives_torchs_results(request, device, route, dtype, sample):
    """conv2d (and its ∂X and ∂W), conv2d_relu and conv2d_relu_max_pool2d on one forced route (the
    direct kernel only where each group has one input channel; elsewhere the rule decides)."""
    x, w, b = make_conv(sample, device, dtype)
    x.requires_grad_()
    w.requires_grad_()
    kwargs = sample.kwargs
    ops = cuda_ops(request)
    with cuda_route(ops, route):
        applies = route != "direct" or x.shape[1] == kwargs.get("groups", 1)
        if applies:
            assert route_taken(ops, x, w, sample) == route
        y = F.conv2d(x, w, b, **kwargs)
        grad_y = torch.randn_like(y)
        # The tiled route's ∂X (stride 1) and ∂W are kernels of their own.
        grad_x, grad_w = torch.autograd.grad(y, (x, w), grad_y)
        y = y.detach()
        x = x.detach()
        w = w.detach()
        a = F.conv2d_relu(x, w, b, **kwargs)
        pooled = {c: F.conv2d_relu_max_pool2d(x, w, b, **kwargs, ceil_mode=c, return_indices=True)
                  for c in (False, True) if _pools(y, c)}
        separate = {c: F.max_pool2d(F.relu(y), 2, ceil_mode=c, return_indices=True) for c in pooled}
    x64 = x.double().requires_grad_()
    w64 = w.double().requires_grad_()
    y64 = TF.conv2d(x64, w64, None if b is None else b.double(), **kwargs)
    grad_x64, grad_w64 = torch.autograd.grad(y64, (x64, w64), grad_y.double())
    y64 = y64.detach()
    tolerance = dict(TOLERANCE[dtype])  # sums of many terms: rounding at the scale of the largest
    tolerance["atol"] *= max(1.0, float(y64.abs().max()))
    torch.testing.assert_close(y.double(), y64, **tolerance)
    for grad, grad64 in ((grad_x, grad_x64), (grad_w, grad_w64)):
        tolerance_grad = dict(TOLERANCE[dtype])
        tolerance_grad["atol"] *= max(1.0, float(grad64.abs().max()))
        torch.testing.assert_close(grad.double(), grad64, **tolerance_grad)
    torch.testing.assert_close(a, F.relu(y), rtol=0, atol=0)  # the same sums, rounded once
    for c, (out, indices) in pooled.items():
        # The fused pool scans the same rounded Y as the separate ops do: the same max and index.
        assert torch.equal(out, separate[c][0]) and torch.equal(indices, separate[c][1])
        torch.testing.assert_close(out.double(), TF.max_pool2d(torch.relu(y64), 2, ceil_mode=c), **tolerance)


@pytest.mark.parametrize("sample", [
    Sample((3, 5, 21, 37), {"padding": 1}, (20, 5, 3, 3)),  # several row and column tiles, partial ones
    Sample((2, 3, 19, 18), {"stride": 2, "padding": 3, "dilation": 2}, (17, 3, 7, 7)),
    Sample((2, 40, 9, 9), {"padding": 2}, (18, 40, 5, 5)),  # many input-channel chunks
    Sample((5, 2, 20, 20), {}, (4, 2, 3, 3)),  # one tile of ∂W: 3 slices of many stages each, emulated
], ids=repr)
def test_the_tiled_kernels_with_64_bit_indices_give_the_same_results(request, device, sample):
    x, w, b = make_conv(sample, device, torch.float32)
    x.requires_grad_()
    w.requires_grad_()
    ops = cuda_ops(request)
    results = []
    for bits64 in (False, True):
        with cuda_route(ops, "tiled", bits64):
            assert route_taken(ops, x, w, sample) == ("tiled64" if bits64 else "tiled")
            y = F.conv2d(x, w, b, **sample.kwargs)
            grad_x, grad_w = torch.autograd.grad(y, (x, w), torch.ones_like(y))
            results.append((y, grad_x, grad_w, F.conv2d_relu(x, w, b, **sample.kwargs),
                            *F.conv2d_relu_max_pool2d(x, w, b, **sample.kwargs, ceil_mode=True, return_indices=True)))
    for got32, got64 in zip(*results):
        assert torch.equal(got32, got64)
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    y64 = TF.conv2d(x64, w64, b.double(), **sample.kwargs)
    grad_x64, grad_w64 = torch.autograd.grad(y64, (x64, w64), torch.ones_like(y64))
    torch.testing.assert_close(results[0][0].double(), y64, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(results[0][1].double(), grad_x64, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(results[0][2].double(), grad_w64, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("route", ["direct", "gemm"])
@pytest.mark.parametrize("sample", [
    Sample((2, 3, 11, 13), {"stride": 2, "padding": 2, "dilation": 2}, (6, 3, 3, 3)),
    Sample((3, 4, 9, 8), {"padding": 1, "groups": 4}, (8, 1, 3, 3)),  # one input channel per group
], ids=repr)
def test_every_kernel_gives_the_same_results_with_64_bit_indices(request, device, route, sample):
    """The kernels outside the tiled route (im2col, col2im, the direct convolution, the pools and
    their backward, the fused ReLU-pool) index in 32 bits wherever the tensors allow it, in 64 bits
    elsewhere: both give the same bits."""
    x, w, b = make_conv(sample, device, torch.float32)
    x.requires_grad_()
    w.requires_grad_()
    odd = torch.randn(2, 3, 9, 7, device=device, requires_grad=True)  # the 2×2 pool's unaligned rows
    ops = cuda_ops(request)
    results, grad_y = [], None
    for bits64 in (False, True):
        with cuda_route(ops, route, bits64):
            y = F.conv2d(x, w, b, **sample.kwargs)
            grad_y = torch.randn_like(y) if grad_y is None else grad_y
            got = [y, *torch.autograd.grad(y, (x, w), grad_y, retain_graph=True)]
            got += F.conv2d_relu_max_pool2d(x, w, b, **sample.kwargs, ceil_mode=True, return_indices=True)
            for source, pool in ((y, {"kernel_size": 2}), (odd, {"kernel_size": 2}),
                                 (y, {"kernel_size": 3, "stride": 2, "padding": 1, "dilation": 1, "ceil_mode": True}),
                                 (odd, {"kernel_size": 2, "stride": 1, "dilation": 2})):
                pooled, indices = F.max_pool2d(source, **pool, return_indices=True)
                got += [pooled, indices, *torch.autograd.grad(pooled, source, torch.ones_like(pooled) * 0.5,
                                                               retain_graph=True)]
        results.append(got)
    for got32, got64 in zip(*results):
        assert torch.equal(got32, got64)


@pytest.mark.parametrize("shape, weight_shape, groups, route", [
    ((4, 1, 28, 28), (32, 1, 3, 3), 1, "tiled"),   # the MNIST model's first layer
    ((4, 32, 14, 14), (64, 32, 3, 3), 1, "tiled"),  # … and its second (C·KH·KW = 288)
    ((4, 64, 8, 8), (64, 64, 3, 3), 1, "gemm"),     # C·KH·KW = 576
    ((4, 8, 8, 8), (8, 1, 3, 3), 8, "direct"),      # depthwise
    ((4, 8, 8, 8), (128, 1, 3, 3), 8, "tiled"),     # one input channel, 16 outputs per group
])
def test_the_rule_sends_thin_products_to_the_tiled_kernel(request, device, shape, weight_shape, groups, route):
    """The fused layer on the tiled route is one kernel: no GEMM, no column buffer."""
    ops = cuda_ops(request)
    x, w = torch.randn(shape, device=device), torch.randn(weight_shape, device=device)
    assert ops._cuda_conv2d_route(x, w, [1, 1], [1, 1], [1, 1], groups) == route
    emulated = request.node.callspec.params["device"] == "emulated"
    launched = ops._emulated_launches() if emulated else 0
    with torch.profiler.profile() as prof:
        out = F.conv2d_relu_max_pool2d(x, w, None, padding=1, groups=groups)
    # The GEMM route: im2col's kernel on a GPU (float32 GEMMs call cuBLAS directly, so no aten op
    # shows them), aten's bmm in the emulator.
    ran_gemm = any("im2col_kernel" in e.name or "bmm" in e.name for e in prof.events())
    assert ran_gemm == (route == "gemm")
    if emulated:  # the emulator counts grids: the tiled route is one; the others, a convolution and a pool
        assert (ops._emulated_launches() - launched == 1) == (route == "tiled")
    expected = TF.max_pool2d(torch.relu(TF.conv2d(x, w, None, padding=1, groups=groups)), 2)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("weight_shape, padding, stride, tiled", [
    ((32, 16, 3, 3), 1, 1, True),    # ∂X's own convolution: 32 · 3 · 3 = 288 deep
    ((64, 32, 3, 3), 1, 1, False),   # the MNIST conv2's ∂X: 64 · 3 · 3 = 576, past the rule's 512
    ((32, 16, 3, 3), 1, 2, False),   # strided: columns
    ((32, 16, 3, 3), 3, 1, False),   # padding beyond d·(KH − 1): columns
])
def test_dx_takes_the_tiled_kernel_by_the_rule_on_its_own_convolution(request, device, weight_shape, padding,
                                                                      stride, tiled):
    cuda_ops(request)  # the CUDA kernels loaded
    x = torch.randn(2, weight_shape[1], 12, 12, device=device, requires_grad=True)
    w = torch.randn(weight_shape, device=device)
    y = F.conv2d(x, w, None, stride=stride, padding=padding)
    grad_y = torch.randn_like(y)
    with torch.profiler.profile() as prof:
        grad_x, = torch.autograd.grad(y, x, grad_y)
    # The columns route: cuBLAS (aten's bmm in the emulator) and col2im's kernel (on a GPU).
    through_columns = any("col2im_kernel" in e.name or "bmm" in e.name for e in prof.events())
    assert through_columns != tiled
    x64 = x.detach().double().requires_grad_()
    expected, = torch.autograd.grad(TF.conv2d(x64, w.double(), None, stride=stride, padding=padding), x64,
                                    grad_y.double())
    torch.testing.assert_close(grad_x.double(), expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_forcing_an_unknown_route_is_refused(request, device):
    ops = cuda_ops(request)
    with pytest.raises(ValueError, match="expected name to be 'direct', 'tiled', 'gemm' or ''"):
        ops._cuda_conv2d_force_route("winograd")
    assert ops._cuda_conv2d_force_route("") == ""


def tf32_rounded(x):
    """float32 rounded to TF32's 10-bit mantissa, to nearest, ties to even (finite values)."""
    bits = x.float().contiguous().view(torch.int32)
    bits = (bits + 0xFFF + ((bits >> 13) & 1)) & ~0x1FFF
    return bits.view(torch.float32)


@pytest.mark.parametrize("allow_tf32", [False, True])
def test_float32_gemms_follow_cudnns_tf32_flag(request, device, allow_tf32):
    """The GEMM route's three products (Y, ∂X, ∂W) multiply in TF32 exactly when
    torch.backends.cudnn.allow_tf32 is on, as torch's convolutions do, whatever
    torch.backends.cuda.matmul.allow_tf32 says (set the other way here)."""
    sample = Sample((2, 8, 12, 12), {"padding": 1}, (16, 8, 3, 3))
    x, w, b = make_conv(sample, device, torch.float32)
    x.requires_grad_()
    w.requires_grad_()
    ops = cuda_ops(request)
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = allow_tf32, not allow_tf32
    try:
        with cuda_route(ops, "gemm"):
            assert route_taken(ops, x, w, sample) == "gemm"
            y = F.conv2d(x, w, b, **sample.kwargs)
            grad_y = torch.randn_like(y)
            got = (y, *torch.autograd.grad(y, (x, w), grad_y))
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved

    def reference(round_):
        x64, w64 = (round_(t.detach()).double().requires_grad_() for t in (x, w))
        y64 = TF.conv2d(x64, w64, b.double(), **sample.kwargs)
        return (y64.detach(), *torch.autograd.grad(y64, (x64, w64), round_(grad_y).double()))

    exact = reference(lambda t: t)
    for g, e in zip(got, exact):
        scale = max(1.0, float(e.abs().max()))
        if allow_tf32:  # 10-bit products: about 2⁻¹¹ relative error each
            torch.testing.assert_close(g.double(), e, rtol=1e-2, atol=1e-2 * scale)
        else:
            torch.testing.assert_close(g.double(), e, rtol=1e-5, atol=1e-5 * scale)
    if allow_tf32 and request.node.callspec.params["device"] == "emulated":
        # The emulator rounds the operands to TF32 (to nearest even), so its result is the exact
        # product of the rounded operands, and visibly not the float32 one.
        for g, r, e in zip(got, reference(tf32_rounded), exact):
            scale = max(1.0, float(e.abs().max()))
            torch.testing.assert_close(g.double(), r, rtol=1e-5, atol=1e-5 * scale)
            assert (g.double() - e).abs().max() > 1e-4 * scale
