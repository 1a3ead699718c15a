"""The cross_entropy op (softmax + cross-entropy in one forward and one backward kernel) against
torch.nn.functional.cross_entropy, through torchcnn.functional and the layer, on every device's
kernels: every reduction, class weights, ignore_index, label smoothing, input layouts and dtypes;
its errors; the second derivative; and the routes that take the reference's formula instead.
gradcheck, gradgradcheck, opcheck and compile draw from samples.py (test_ops.py, test_compile.py)."""

import pytest
import torch
import torch.nn.functional as TF

import torchcnn
import torchcnn.functional as F
from samples import cross_entropy_sample_inputs

TOLERANCE = {torch.float64: {}, torch.float32: {"rtol": 1e-5, "atol": 1e-6},
             torch.bfloat16: {"rtol": 2e-2, "atol": 1e-2}, torch.float16: {"rtol": 2e-3, "atol": 1e-3}}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_matches_torch_over_the_samples(dtype, device):
    for x, target, weight, reduction, ignore_index, smoothing in cross_entropy_sample_inputs(device, dtype, True):
        kwargs = dict(weight=weight, reduction=reduction, ignore_index=ignore_index, label_smoothing=smoothing)
        loss, expected = F.cross_entropy(x, target, **kwargs), TF.cross_entropy(x, target, **kwargs)
        assert loss.dtype == expected.dtype and loss.shape == expected.shape
        torch.testing.assert_close(loss, expected, equal_nan=True, **TOLERANCE[dtype])
        if x.numel():
            grad = torch.randn_like(expected)
            torch.testing.assert_close(torch.autograd.grad(loss, x, grad)[0], torch.autograd.grad(expected, x, grad)[0],
                                       **TOLERANCE[dtype])


def test_the_op_does_the_work(device):
    """Class-index targets reach torch.ops.torchcnn.cross_entropy (and its backward), whatever the
    input's layout: (C,), (N, C) and (N, C, d1, d2)."""
    for shape, target_shape in [((7,), ()), ((4, 7), (4,)), ((2, 7, 3, 5), (2, 3, 5))]:
        x = torch.randn(shape, dtype=torch.float64, device=device, requires_grad=True)
        target = torch.randint(0, 7, target_shape, device=device)
        for reduction in ("none", "mean", "sum"):
            with torch.profiler.profile() as prof:
                loss = F.cross_entropy(x, target, reduction=reduction, label_smoothing=0.1)
                (grad,) = torch.autograd.grad(loss.sum(), x)
            names = {e.name for e in prof.events()}
            assert any(n.startswith("torchcnn") and n.endswith("::cross_entropy") for n in names), names
            assert any(n.endswith("::cross_entropy_backward") for n in names), names
            expected = TF.cross_entropy(x, target, reduction=reduction, label_smoothing=0.1)
            torch.testing.assert_close(loss, expected)
            torch.testing.assert_close(grad, torch.autograd.grad(expected.sum(), x)[0])


def test_out_of_range_targets_are_refused(device, kernels):
    if device == "cuda":
        pytest.skip("on a GPU a device-side assert, which poisons the process's CUDA context: test_cuda.py checks it "
                    "in a process of its own")
    x = torch.randn(3, 4, device=device)
    message = "target 4 is out of bounds for 4 classes" if kernels == "cpu" else "a target is out of bounds"
    with pytest.raises(IndexError, match=message):
        F.cross_entropy(x, torch.tensor([0, 4, 1], device=device))
    with pytest.raises(IndexError, match="out of bounds"):
        F.cross_entropy(x, torch.tensor([0, -1, 1], device=device), ignore_index=-100)
    assert F.cross_entropy(x, torch.tensor([0, -1, 1], device=device), ignore_index=-1).isfinite()


def test_op_argument_errors_name_the_argument(device):
    ops = torch.ops.torchcnn
    x, t = torch.randn(3, 4, device=device), torch.tensor([0, 1, 2], device=device)
    with pytest.raises(ValueError, match="cross_entropy: expected reduction to be 'none', 'mean' or 'sum' but got 'max'"):
        ops.cross_entropy(x, t, None, "max")
    with pytest.raises(TypeError, match="cross_entropy: expected target to hold class indices as int64 but got Int"):
        ops.cross_entropy(x, t.int())
    with pytest.raises(ValueError, match=r"cross_entropy: expected weight to be a 1-D tensor of 4 elements"):
        ops.cross_entropy(x, t, torch.ones(3, device=device))
    with pytest.raises(ValueError, match=r"cross_entropy: expected label_smoothing to be in \[0, 1\] but got 1.5"):
        ops.cross_entropy(x, t, None, "mean", -100, 1.5)
    loss, lse, total = ops.cross_entropy(x, t)
    with pytest.raises(ValueError, match=r"cross_entropy_backward: expected grad_loss of the loss's shape"):
        ops.cross_entropy_backward(torch.ones(3, device=device), x, t, None, lse, total, "mean", -100, 0.0)


def test_second_derivative_matches_torch(device):
    """A gradient penalty on the logits: the backward, under create_graph, is differentiable."""
    x = torch.randn(5, 6, dtype=torch.float64, device=device, requires_grad=True)
    target = torch.tensor([0, 3, 5, 1, 2], device=device)
    weight = torch.rand(6, dtype=torch.float64, device=device) + 0.5
    results = []
    for fn in (F.cross_entropy, TF.cross_entropy):
        loss = fn(x, target, weight=weight, label_smoothing=0.1)
        (grad,) = torch.autograd.grad(loss, x, create_graph=True)
        results.append(torch.autograd.grad(grad.square().sum(), x)[0])
    torch.testing.assert_close(*results)


def test_forward_mode_and_weight_gradients_match_torch(device):
    x = torch.randn(4, 5, dtype=torch.float64, device=device)
    target = torch.tensor([0, 4, 2, 1], device=device)
    tangent = torch.randn_like(x)
    for reduction in ("none", "mean", "sum"):
        got = torch.func.jvp(lambda z: F.cross_entropy(z, target, reduction=reduction), (x,), (tangent,))
        want = torch.func.jvp(lambda z: TF.cross_entropy(z, target, reduction=reduction), (x,), (tangent,))
        torch.testing.assert_close(got, want)
        with torch.autograd.forward_ad.dual_level():
            dual = torch.autograd.forward_ad.make_dual(x, tangent)
            got = torch.autograd.forward_ad.unpack_dual(F.cross_entropy(dual, target, reduction=reduction)).tangent
        torch.testing.assert_close(got, want[1])
    # A weight that takes a gradient (torch's refuses one): the reference's formula computes it.
    weight = torch.rand(5, dtype=torch.float64, device=device, requires_grad=True)
    got = torch.autograd.grad(F.cross_entropy(x, target, weight=weight), weight)[0]
    nll = -torch.log_softmax(x, 1).gather(1, target[:, None]).squeeze(1)
    by_hand = (weight[target] * nll).sum() / weight[target].sum()
    torch.testing.assert_close(got, torch.autograd.grad(by_hand, weight)[0])


def test_the_raw_ops_refuse_what_they_cannot_differentiate(device):
    x = torch.randn(3, 4, device=device, requires_grad=True)
    t = torch.tensor([0, 1, 2], device=device)
    weight = torch.rand(4, device=device, requires_grad=True)
    loss, _, _ = torch.ops.torchcnn.cross_entropy(x, t, weight)
    with pytest.raises(NotImplementedError, match="no gradient with respect to weight"):
        loss.backward()
    loss, lse, total = torch.ops.torchcnn.cross_entropy(x.detach(), t)
    with pytest.raises(NotImplementedError, match="cross_entropy_backward is not differentiable itself"):
        torch.ops.torchcnn.cross_entropy_backward(torch.ones((), device=device, requires_grad=True), x, t, None, lse,
                                                  total, "mean", -100, 0.0)


def test_autocast_computes_the_loss_in_float32():
    x = torch.randn(4, 5)
    target = torch.tensor([0, 1, 2, 3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(x.bfloat16(), target)
        expected = TF.cross_entropy(x.bfloat16(), target)
    assert loss.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(loss, expected)


def test_layer_runs_the_op():
    layer = torchcnn.nn.CrossEntropyLoss(label_smoothing=0.05, ignore_index=3)
    x, target = torch.randn(6, 4), torch.tensor([0, 3, 1, 2, 3, 0])
    torch.testing.assert_close(layer(x, target), TF.cross_entropy(x, target, label_smoothing=0.05, ignore_index=3))


def test_forward_over_reverse_matches_torch(device):
    """A tangent on the logits carried through the (first-order) backward: a Hessian-vector product."""
    x = torch.randn(4, 5, dtype=torch.float64, device=device, requires_grad=True)
    target = torch.tensor([0, 4, 2, 1], device=device)
    tangent = torch.randn_like(x)
    results = []
    for fn in (F.cross_entropy, TF.cross_entropy):
        with torch.autograd.forward_ad.dual_level():
            dual = torch.autograd.forward_ad.make_dual(x, tangent)
            (grad,) = torch.autograd.grad(fn(dual, target, label_smoothing=0.1), dual)
            results.append(torch.autograd.forward_ad.unpack_dual(grad).tangent)
    assert results[0] is not None
    torch.testing.assert_close(*results)


def test_a_tracked_call_records_the_cpp_node_and_tangents_take_the_python_function(device):
    """On CPU and CUDA tensors the op's Autograd kernel is C++ (csrc/autograd): a C++ node records
    the backward. A tangent on the logits needs the Python Function's jvp, which the C++ kernel
    hands the call to."""
    torchcnn.load()  # the C++ kernel comes with the compiled library; the very first call precedes it
    x = torch.randn(4, 5, dtype=torch.float64, device=device, requires_grad=True)
    target = torch.tensor([0, 4, 2, 1], device=device)
    loss = F.cross_entropy(x, target)
    assert "CppNode" in loss.grad_fn.name() and "CrossEntropy" in loss.grad_fn.name(), loss.grad_fn.name()
    tangent = torch.randn_like(x)
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x, tangent)
        loss = F.cross_entropy(dual, target)
        assert "CppNode" not in loss.grad_fn.name()
        got = torch.autograd.forward_ad.unpack_dual(loss).tangent
    torch.testing.assert_close(got, torch.func.jvp(lambda z: TF.cross_entropy(z, target), (x,), (tangent,))[1])


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_the_cpp_backward_carries_a_tangent_on_the_incoming_gradient(device, reduction):
    """The C++ node's backward, given a gradient with a tangent (forward-over-reverse with the
    tangent on the cotangent), takes the differentiable formula: the tangent comes out as the
    backward applied to it."""
    x = torch.randn(6, 5, dtype=torch.float64, device=device, requires_grad=True)
    target = torch.tensor([0, 4, 2, 1, -100, 3], device=device)
    kwargs = dict(reduction=reduction, label_smoothing=0.2, weight=torch.rand(5, dtype=torch.float64, device=device))
    shape = (6,) if reduction == "none" else ()
    v, v_tangent = torch.randn(shape, dtype=x.dtype, device=device), torch.randn(shape, dtype=x.dtype, device=device)
    results = []
    for fn in (F.cross_entropy, TF.cross_entropy):
        loss = fn(x, target, **kwargs)
        with torch.autograd.forward_ad.dual_level():
            (grad,) = torch.autograd.grad(loss, x, torch.autograd.forward_ad.make_dual(v, v_tangent))
            results.append((grad, torch.autograd.forward_ad.unpack_dual(grad).tangent))
    assert results[0][1] is not None
    torch.testing.assert_close(results[0], results[1])


def test_the_softmax_exp_is_correctly_rounded_to_an_ulp_over_floats_range():
    """The CPU kernels' float exp (vectorised where the CPU has AVX-512), read through the backward:
    with log Σ exp set to 0, ∂L/∂z_c = exp(z_c) for a class c other than the target. Within one
    ulp of exp in double across float's range; 0 below it, inf above it, NaN for NaN."""
    z = torch.cat([torch.linspace(-104, 89, 400_001), torch.tensor([float("inf"), -float("inf"), float("nan")])])
    logits = torch.stack([z, torch.zeros_like(z)], 1)
    rows = len(z)
    got = torch.ops.torchcnn.cross_entropy_backward(
        torch.ones(rows), logits, torch.ones(rows, dtype=torch.long), None, torch.zeros(rows), torch.tensor(1.0),
        "none", -100, 0.0)[:, 0]
    expected = torch.exp(z.double())
    normal = (expected >= torch.finfo(torch.float32).tiny) & (expected <= torch.finfo(torch.float32).max)
    ulp = expected[normal].float().double().abs() * 2.0 ** -23
    assert ((got.double()[normal] - expected[normal]).abs() / ulp).max() <= 1.0
    subnormal = expected < torch.finfo(torch.float32).tiny
    assert ((got.double()[subnormal] - expected[subnormal]).abs() <= 2.0 ** -149).all()
    assert torch.equal(got.isinf(), torch.exp(z).isinf()) and torch.equal(got.isnan(), z.isnan())


def test_compiled_autograd_takes_the_cpp_node():
    """torch.compile's compiled autograd runs the C++ node's backward (which therefore marks no
    output non-differentiable: log Σ exp and the total weight leave it as plain tensors)."""
    torchcnn.load()
    x = torch.randn(8, 5, requires_grad=True)
    target = torch.randint(0, 5, (8,))
    loss, lse, total = torch.ops.torchcnn.cross_entropy(x, target)
    assert loss.requires_grad and not lse.requires_grad and not total.requires_grad

    @torch.compile(backend="eager")
    def step(x):
        loss = F.cross_entropy(x, target)
        loss.backward()
        return loss

    torch._dynamo.reset()
    with torch._dynamo.config.patch(compiled_autograd=True):
        step(x)
    torch._dynamo.reset()
    torch.testing.assert_close(x.grad, torch.autograd.grad(TF.cross_entropy(x, target), x)[0])
