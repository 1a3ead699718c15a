"""The CPU conv2d's algorithms (csrc/cpu/conv2d.cpp): the rule picks the one intended for each
shape, and every algorithm, forced wherever it applies and with either GEMM (torchcnn's AVX-512
one or BLAS), gives torch's values and gradients; the GEMM itself matches torch.mm."""

import pytest
import torch
import torch.nn.functional as TF

import torchcnn.functional as F
from samples import CPU_STRATEGY_SAMPLES, Sample, conv2d_samples, make_conv
from torchcnn.testing import (CPU_CONV2D_STRATEGIES, cpu_conv2d_strategy, cpu_has_avx512_gemm, forced_cpu_conv2d_strategy,
                               forced_cpu_gemm)

NO_AVX512 = pytest.mark.skipif(not cpu_has_avx512_gemm(), reason="no AVX-512 on this CPU")
GEMMS = [pytest.param("avx512", marks=NO_AVX512), "blas"]
DTYPE_GEMMS = [pytest.param(torch.float64, "blas", id="float64"),
               pytest.param(torch.float32, "avx512", marks=NO_AVX512, id="float32-avx512"),
               pytest.param(torch.float32, "blas", id="float32-blas")]

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-4)}


def strategy_of(sample):
    x, w, _ = make_conv(sample, "meta", torch.float32)
    if x.dim() == 3:
        x = x.unsqueeze(0)
    padding = sample.kwargs.get("padding", 0)
    if isinstance(padding, str):
        return None  # 'same'/'valid' are resolved in torchcnn.functional
    return cpu_conv2d_strategy(x, w, sample.kwargs.get("stride", 1), padding, sample.kwargs.get("dilation", 1),
                               sample.kwargs.get("groups", 1))


@pytest.mark.parametrize("sample,expected", CPU_STRATEGY_SAMPLES, ids=repr)
def test_the_rule_picks_the_intended_strategy(sample, expected):
    assert strategy_of(sample) == expected


@pytest.mark.parametrize("shape,weight,kwargs,expected", [
    ((64, 1, 28, 28), (32, 1, 3, 3), {}, "gemm_batched"),  # the MNIST model's first layer: 288 filter values
    ((32, 1, 28, 28), (8, 1, 3, 3), {"padding": 1}, "depthwise"),  # one channel, 72 filter values
    ((128, 1, 28, 28), (16, 1, 5, 5), {"padding": 2}, "gemm_batched"),  # a Fashion-MNIST model's first layer
    ((8, 128, 15, 15), (16, 128, 1, 1), {}, "gemm_per_image"),  # SqueezeNet's squeeze: pointwise, no columns
    ((32, 256, 8, 8), (64, 256, 1, 1), {}, "gemm_per_image"),  # a bottleneck's pointwise at 8×8
    ((32, 512, 4, 4), (128, 512, 1, 1), {}, "gemm_batched"),  # 16 pixels: the images' columns together
    ((32, 64, 16, 16), (128, 64, 1, 1), {"stride": 2}, "gemm_batched"),  # a strided 1×1 is not pointwise
    ((64, 32, 26, 26), (64, 32, 3, 3), {}, "winograd"),  # … and its second
    ((32, 256, 8, 8), (256, 256, 3, 3), {"padding": 1}, "winograd"),  # ResNet-18's layer3 on CIFAR
    ((32, 512, 4, 4), (512, 512, 3, 3), {"padding": 1}, "winograd"),  # … its layer4: 512 output pixels
    ((16, 512, 2, 2), (512, 512, 3, 3), {"padding": 1}, "gemm_batched"),  # layer4 at 64×64: 64 pixels
    ((32, 64, 32, 32), (128, 64, 3, 3), {"stride": 2, "padding": 1}, "gemm_batched"),  # 16×16 plane
    ((16, 3, 64, 64), (64, 3, 7, 7), {"stride": 2, "padding": 3}, "gemm_per_image"),  # ResNet stem, 32×32 plane
    ((8, 4, 16, 16), (8, 4, 3, 3), {"padding": 1}, "direct"),  # too few channels for Winograd
    ((8, 16, 16, 16), (16, 16, 3, 3), {"padding": 1, "dilation": 2}, "direct"),  # dilated, few channels
    ((8, 32, 16, 16), (32, 32, 3, 3), {"padding": 2, "dilation": 2}, "gemm_batched"),  # dilated, 32 channels
    ((8, 16, 16, 16), (16, 8, 3, 3), {"padding": 1, "groups": 2}, "direct"),  # grouped
    ((32, 64, 16, 16), (64, 8, 3, 3), {"padding": 1, "groups": 8}, "direct"),  # RegNet-like
    ((8, 16, 16, 16), (16, 16, 3, 3), {"padding": 3}, "gemm_batched"),  # padding > 2: no Winograd or direct ∂X
    ((128, 16, 14, 14), (32, 16, 3, 3), {"padding": 1}, "direct"),  # a Fashion-MNIST model's second layer
    ((256, 24, 12, 12), (32, 24, 3, 3), {}, "winograd"),  # the fast recipe's second: 24 channels
    ((16, 64, 16, 16), (64, 64, 5, 5), {"padding": 2}, "direct"),  # 5×5: direct whatever the channels
    ((8, 3, 56, 56), (32, 3, 7, 7), {"padding": 3}, "direct"),
    ((8, 3, 224, 224), (64, 3, 3, 3), {"padding": 1}, "gemm_per_image"),  # VGG's first: planes too large
    ((8, 64, 7, 7), (192, 64, 5, 5), {"padding": 2}, "gemm_batched"),  # AlexNet's second on 64×64: lanes idle
    ((8, 32, 56, 56), (32, 1, 3, 3), {"padding": 1, "groups": 32}, "depthwise"),
])
def test_the_rule_on_model_layers(shape, weight, kwargs, expected):
    assert cpu_conv2d_strategy(shape, weight, kwargs.get("stride", 1), kwargs.get("padding", 0),
                               kwargs.get("dilation", 1), kwargs.get("groups", 1)) == expected


def _check_against_torch(sample, dtype):
    x, w, b = make_conv(sample, "cpu", dtype, requires_grad=True)
    ours, theirs = F.conv2d(x, w, b, **sample.kwargs), TF.conv2d(x, w, b, **sample.kwargs)
    torch.testing.assert_close(ours, theirs, **TOL[dtype])
    grad = torch.randn_like(theirs)
    inputs = [t for t in (x, w, b) if t is not None]
    for mine, expected, name in zip(torch.autograd.grad(ours, inputs, grad),
                                    torch.autograd.grad(theirs, inputs, grad), ("input", "weight", "bias")):
        torch.testing.assert_close(mine, expected, **TOL[dtype], msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("dtype,gemm", DTYPE_GEMMS)
@pytest.mark.parametrize("strategy", CPU_CONV2D_STRATEGIES)
def test_every_strategy_matches_torch_on_every_sample(strategy, dtype, gemm):
    """Each algorithm, forced wherever it applies, over the whole conv2d sample sweep."""
    applied = 0
    with forced_cpu_conv2d_strategy(strategy), forced_cpu_gemm(gemm):
        for sample in conv2d_samples(full=True):
            applied += strategy_of(sample) == strategy
            _check_against_torch(sample, dtype)
    assert applied >= 3  # the sweep exercises it (the rule's own choice elsewhere)


# Small enough for gradcheck; forcing makes each take every algorithm that applies to it.
GRADCHECK_SAMPLES = [
    Sample((2, 4, 5, 5), {"stride": 2, "padding": 1}, (3, 4, 3, 3)),
    Sample((2, 4, 5, 6), {"stride": 2}, (3, 4, 1, 1), bias=False),
    Sample((1, 3, 7, 6), {"padding": 1}, (2, 3, 3, 3)),
    Sample((1, 2, 5, 6), {"padding": 2}, (3, 2, 3, 3)),
    Sample((2, 3, 5, 6), {"padding": 1, "groups": 3}, (6, 1, 3, 3)),
    Sample((2, 8, 2, 2), {"padding": 1}, (8, 8, 3, 3)),  # Winograd ∂W over the whole batch at once
]


@pytest.mark.parametrize("strategy", CPU_CONV2D_STRATEGIES)
@pytest.mark.parametrize("sample", GRADCHECK_SAMPLES, ids=repr)
def test_every_strategy_passes_gradcheck(sample, strategy):
    inputs = tuple(t for t in make_conv(sample, "cpu", torch.float64, requires_grad=True) if t is not None)
    conv = (lambda x, w, b=None: F.conv2d(x, w, b, **sample.kwargs))
    with forced_cpu_conv2d_strategy(strategy):
        assert torch.autograd.gradcheck(conv, inputs)
        assert torch.autograd.gradgradcheck(conv, inputs)


def test_forcing_an_unknown_strategy_is_refused():
    with pytest.raises(ValueError, match="expected name to be one of"):
        with forced_cpu_conv2d_strategy("fft"):
            pass
    with pytest.raises(ValueError, match="_cpu_conv2d_force_strategy: expected name"):
        torch.ops.torchcnn._cpu_conv2d_force_strategy("fft")


def test_forcing_is_undone_on_exit():
    sample, intended = CPU_STRATEGY_SAMPLES[0]
    with forced_cpu_conv2d_strategy("gemm_per_image"):
        assert strategy_of(sample) == "gemm_per_image"
    assert strategy_of(sample) == intended


# (m, k, n): edges of the 8 × 32 register tile, several blocks of the shared dimension (256) and
# of C's columns (3072), products split between threads by columns (130 × 3100) and by rows
# (700 × 100), an empty shared dimension.
GEMM_SHAPES = [(1, 1, 1), (7, 5, 3), (8, 256, 32), (9, 257, 33), (16, 17, 40), (130, 300, 3100), (700, 300, 100),
               (64, 576, 1024), (3, 0, 5)]


@pytest.mark.parametrize("layout", ["nn", "tn", "nt", "tt", "strided"])
@pytest.mark.parametrize("m,k,n", GEMM_SHAPES, ids=str)
@pytest.mark.parametrize("gemm", GEMMS)
def test_gemm_matches_torch_mm(m, k, n, layout, gemm):
    gen = torch.Generator().manual_seed(m * 1000 + n)
    a = torch.randn(k, m, generator=gen).t() if layout[0] == "t" else torch.randn(m, 2 * k if layout == "strided" else k, generator=gen)
    if layout == "strided":
        a = a[:, ::2]  # neither row- nor column-major: copied first
    b = torch.randn(n, k, generator=gen).t() if layout.endswith("t") and layout != "strided" else torch.randn(k, n, generator=gen)
    with forced_cpu_gemm(gemm):
        c = torch.ops.torchcnn._cpu_matmul(a, b)
    torch.testing.assert_close(c, a.double().mm(b.double()).float(), rtol=1e-5, atol=1e-4)


def test_gemm_knob_refuses_unknown_names():
    with pytest.raises(ValueError, match="expected name to be 'avx512' or 'blas'"):
        torch.ops.torchcnn._cpu_set_gemm("mkl")
    with pytest.raises(ValueError, match="_cpu_matmul: expected matrices"):
        torch.ops.torchcnn._cpu_matmul(torch.ones(2, 3), torch.ones(2, 3))


@pytest.mark.parametrize("strategy", CPU_CONV2D_STRATEGIES)
@pytest.mark.parametrize("kwargs,weight", [({}, (1, 1, 1, 3)), ({"groups": 4}, (4, 1, 2, 3)),
                                           ({"groups": 2, "padding": 1, "dilation": 2}, (4, 1, 3, 3)),
                                           ({"groups": 2, "padding": 1}, (4, 3, 3, 3))], ids=str)
def test_non_finite_inputs_give_torchs_gradients(strategy, kwargs, weight):
    """Where an inf or a NaN reaches a gradient is torch's business, not an algorithm's: the
    depthwise and direct kernels' wide rows must not multiply a dropped column's zero by an inf."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, kwargs.get("groups", 1) * weight[1], 6, 6, dtype=torch.float64, generator=gen)
    x[0, ..., -1] = float("inf")
    x[-1, 0, 0, 0] = float("nan")
    x.requires_grad_()
    w = torch.randn(weight, dtype=torch.float64, generator=gen, requires_grad=True)
    with forced_cpu_conv2d_strategy(strategy):
        ours = F.conv2d(x, w, **kwargs)
        grads = torch.autograd.grad(ours, (x, w), torch.ones_like(ours))
    theirs = TF.conv2d(x, w, **kwargs)
    expected = torch.autograd.grad(theirs, (x, w), torch.ones_like(theirs))
    if strategy == "winograd" and strategy_of_args(x, w, kwargs) == "winograd":
        return  # Winograd mixes inf − inf into NaN by design (see conv2d_winograd.cpp)
    torch.testing.assert_close(ours, theirs, equal_nan=True)
    for mine, exp in zip(grads, expected):
        torch.testing.assert_close(mine, exp, equal_nan=True)


def strategy_of_args(x, w, kwargs):
    return cpu_conv2d_strategy(x, w, kwargs.get("stride", 1), kwargs.get("padding", 0), kwargs.get("dilation", 1),
                               kwargs.get("groups", 1))
