import pytest
import torch
import torch.nn.functional as TF

import torchcnn.functional as F
from conftest import cuda_ops, cuda_route
from samples import Sample, conv2d_samples, make_conv

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-4),
       torch.bfloat16: dict(rtol=2e-2, atol=5e-2)}


def reference_conv2d(x, w, b, stride, padding, dilation, groups):
    """The design notes' sum, written plainly: the oracle the fast path is held to."""
    n, c, h, wd = x.shape
    m, cg, kh, kw = w.shape
    xp = torch.zeros(n, c, h + 2 * padding, wd + 2 * padding, dtype=x.dtype)
    xp[:, :, padding:padding + h, padding:padding + wd] = x
    oh = (h + 2 * padding - dilation * (kh - 1) - 1) // stride + 1
    ow = (wd + 2 * padding - dilation * (kw - 1) - 1) // stride + 1
    y = torch.zeros(n, m, oh, ow, dtype=x.dtype)
    mg = m // groups
    for k in range(m):
        g = k // mg
        for i in range(oh):
            for j in range(ow):
                acc = b[k].clone() if b is not None else torch.zeros((n,), dtype=x.dtype)
                for cc in range(cg):
                    for p in range(kh):
                        for q in range(kw):
                            acc = acc + xp[:, g * cg + cc, i * stride + p * dilation, j * stride + q * dilation] * w[k, cc, p, q]
                y[:, k, i, j] = acc
    return y


@pytest.mark.parametrize("stride,padding,dilation,groups", [(1, 0, 1, 1), (2, 1, 1, 1), (1, 2, 2, 2), (3, 1, 2, 1)])
def test_matches_the_design_notes_sum(stride, padding, dilation, groups):
    x = torch.randn(2, 4, 7, 8, dtype=torch.float64)
    w = torch.randn(4, 4 // groups, 3, 2, dtype=torch.float64)
    b = torch.randn(4, dtype=torch.float64)
    expected = reference_conv2d(x, w, b, stride, padding, dilation, groups)
    torch.testing.assert_close(F.conv2d(x, w, b, stride, padding, dilation, groups), expected, **TOL[torch.float64])


def _check_against_torch(sample, device, dtype):
    x, w, b = make_conv(sample, device, dtype, requires_grad=True)
    ours = F.conv2d(x, w, b, **sample.kwargs)
    theirs = TF.conv2d(x, w, b, **sample.kwargs)
    torch.testing.assert_close(ours, theirs, **TOL[dtype])
    grad = torch.randn_like(theirs)
    inputs = [t for t in (x, w, b) if t is not None]
    for g_ours, g_theirs, name in zip(torch.autograd.grad(ours, inputs, grad), torch.autograd.grad(theirs, inputs, grad),
                                      ("input", "weight", "bias")):
        torch.testing.assert_close(g_ours, g_theirs, **TOL[dtype], msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("sample", conv2d_samples(), ids=repr)
def test_matches_torch(sample, device, dtype):
    _check_against_torch(sample, device, dtype)


# Significant bits: a result rounded once from the exact value is within 2^-bits of it, relatively.
HALF_BITS = {torch.bfloat16: 8, torch.float16: 11}


@pytest.mark.parametrize("dtype", HALF_BITS, ids=str)
@pytest.mark.parametrize("sample", conv2d_samples(full=False), ids=repr)
def test_half_types_accumulate_in_float(sample, device, dtype):
    """bfloat16/float16 results equal the float64 result on the same values, rounded once."""
    x, w, b = make_conv(sample, device, dtype, requires_grad=True)
    x64, w64, b64 = (t.detach().double().requires_grad_() if t is not None else None for t in (x, w, b))
    ours, exact = F.conv2d(x, w, b, **sample.kwargs), TF.conv2d(x64, w64, b64, **sample.kwargs)
    assert ours.dtype == dtype
    grad = torch.randn_like(ours)
    inputs = [t for t in (x, w, b) if t is not None]
    inputs64 = [t for t in (x64, w64, b64) if t is not None]
    pairs = [(ours, exact)] + list(zip(torch.autograd.grad(ours, inputs, grad),
                                       torch.autograd.grad(exact, inputs64, grad.double())))
    for a, e in pairs:
        # One rounding of the exact value to the half type; atol leaves room for the float
        # accumulator's own error where a sum of ~300 terms of size ~1 cancels to near zero.
        torch.testing.assert_close(a.double(), e, rtol=2.0 ** -HALF_BITS[dtype], atol=1e-4)


@pytest.mark.parametrize("sample", conv2d_samples(full=False), ids=repr)
def test_gradcheck(sample, device):
    if sample.shape[0] == 0:
        pytest.skip("gradcheck needs at least one element")
    x, w, b = make_conv(sample, device, torch.float64, requires_grad=True)
    # Keep gradcheck quick: shrink the big samples' channel counts (ungrouped ones).
    if sample.kwargs.get("groups", 1) == 1 and (w.shape[0] > 8 or w.shape[1] > 8):
        c = min(4, x.shape[-3])
        x = x[..., :c, :, :].detach().requires_grad_()
        w = w[:4, :c].detach().requires_grad_()
        b = None if b is None else b[:4].detach().requires_grad_()
    inputs = tuple(t for t in (x, w, b) if t is not None)
    assert torch.autograd.gradcheck(lambda x, w, b=None: F.conv2d(x, w, b, **sample.kwargs), inputs)


def test_each_gradient_only_when_needed(device):
    x = torch.randn(2, 3, 6, 6, device=device, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, device=device)
    b = torch.randn(4, device=device, requires_grad=True)
    y = F.conv2d(x, w, b)
    with torch.profiler.profile() as prof:
        gx, gb = torch.autograd.grad(y.sum(), (x, b))
    ran = {e.name for e in prof.events()}
    assert "torchcnn::conv2d_backward_input" in ran and "torchcnn::conv2d_backward_weight" not in ran
    torch.testing.assert_close(gb, torch.full((4,), 2.0 * 16, device=device))
    torch.testing.assert_close(gx, torch.nn.grad.conv2d_input(x.shape, w, torch.ones_like(y)))


@pytest.mark.parametrize("layout", ["channels_last", "transposed", "sliced"])
def test_non_contiguous_inputs(device, layout):
    x = torch.randn(2, 6, 10, 12, device=device)
    w = torch.randn(4, 6, 3, 3, device=device)
    if layout == "channels_last":
        x, w = x.to(memory_format=torch.channels_last), w.to(memory_format=torch.channels_last)
    elif layout == "transposed":
        x = x.transpose(2, 3)
    else:
        x, w = x[:, ::2, 1:, ::2], w[:, ::2]
    x.requires_grad_()
    w.requires_grad_()
    ours, theirs = F.conv2d(x, w, padding=1), TF.conv2d(x, w, padding=1)
    torch.testing.assert_close(ours, theirs, **TOL[torch.float32])
    grad = torch.randn_like(theirs).to(memory_format=torch.channels_last)
    for a, b in zip(torch.autograd.grad(ours, (x, w), grad), torch.autograd.grad(theirs, (x, w), grad)):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


def test_empty_batch_gives_empty_result(device):
    x = torch.randn(0, 3, 8, 8, device=device, requires_grad=True)
    w = torch.randn(5, 3, 3, 3, device=device, requires_grad=True)
    y = F.conv2d(x, w)
    assert y.shape == (0, 5, 6, 6)
    gx, gw = torch.autograd.grad(y.sum(), (x, w))
    assert gx.shape == x.shape and torch.count_nonzero(gw) == 0


def test_op_takes_its_schema_defaults(device):
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, device=device, requires_grad=True)
    y = torch.ops.torchcnn.conv2d(x, w)  # schema defaults: no bias, stride 1, padding 0
    torch.testing.assert_close(y, TF.conv2d(x, w))
    (gx, gw), (ex, ew) = torch.autograd.grad(y.sum(), (x, w)), torch.autograd.grad(TF.conv2d(x, w).sum(), (x, w))
    torch.testing.assert_close((gx, gw), (ex, ew))


@pytest.mark.cuda_kernels
def test_chunks_hold_half_the_l2_cache_by_default(request, device):
    """Without a budget set, a chunk's columns fill at most half the L2 cache (50 MB emulated, an
    H100's), or 16 MiB: a batch of 2 chunks' worth and one image more runs as 3 GEMMs."""
    ops = cuda_ops(request)
    previous = ops._cuda_set_chunk_budget(0)  # the default
    l2 = torch.cuda.get_device_properties(0).L2_cache_size if device == "cuda" else 50 << 20
    one_image = 32 * 3 * 3 * 28 * 28 * 4  # a 32-channel 3×3 conv's columns at 28×28, float32
    per_chunk = max(l2 // 2, 16 << 20) // one_image
    x = torch.randn(2 * per_chunk + 1, 32, 28, 28, device=device)
    w, b = torch.randn(4, 32, 3, 3, device=device), torch.randn(4, device=device)
    try:
        with cuda_route(ops, "gemm"), torch.profiler.profile() as prof:
            y = F.conv2d(x, w, b, padding=1)
    finally:
        ops._cuda_set_chunk_budget(previous)
    assert sum(e.name == "aten::baddbmm_" for e in prof.events()) == 3
    torch.testing.assert_close(y, TF.conv2d(x, w, b, padding=1), rtol=1e-4, atol=1e-4)


@pytest.mark.cuda_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("sample", [Sample((5, 3, 9, 9), {"padding": 1, "groups": 1}, (4, 3, 3, 3)),
                                    Sample((5, 4, 6, 7), {"groups": 2}, (6, 2, 1, 1)),  # pointwise: no im2col
                                    Sample((3, 4, 8, 8), {"stride": 2, "dilation": 2, "groups": 2}, (4, 2, 2, 3))],
                         ids=repr)
def test_many_chunks_give_the_same_result(request, device, dtype, sample):
    """The CUDA conv works through the batch in chunks that keep its buffers within a byte budget;
    a budget of about one image's columns makes every op run chunk by chunk."""
    ops = cuda_ops(request)
    x, w, b = make_conv(sample, device, dtype, requires_grad=True)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    out_plane = TF.conv2d(x.detach(), w.detach(), **sample.kwargs)[0, 0].numel()
    one_image = x.shape[1] * w.shape[2] * w.shape[3] * out_plane * x.element_size()  # its im2col columns
    previous = ops._cuda_set_chunk_budget(one_image)
    try:
        with cuda_route(ops, "gemm"), torch.profiler.profile() as prof:
            y = F.conv2d(x, w, b, **sample.kwargs)
            grads = torch.autograd.grad(y, (x, w, b), torch.ones_like(y))
    finally:
        ops._cuda_set_chunk_budget(previous)
    gemms = sum(e.name in ("aten::bmm", "aten::baddbmm_", "aten::baddbmm") for e in prof.events())
    assert gemms >= 3 * len(x) * sample.kwargs["groups"]  # one image per chunk, in all three ops
    y64 = TF.conv2d(x64, w64, b64, **sample.kwargs)
    expected = (y64, *torch.autograd.grad(y64, (x64, w64, b64), torch.ones_like(y64)))
    bits = HALF_BITS.get(dtype, 20)
    for got, want in zip((y, *grads), expected):
        torch.testing.assert_close(got.double(), want, rtol=2.0 ** -bits, atol=1e-3)
