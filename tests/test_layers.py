"""relu, linear, cross_entropy and the torchcnn.nn layers against torch (relu and class-index
cross_entropy are ops of ours; linear, in-place relu and probability targets are built from torch's)."""

import pytest
import torch
import torch.nn.functional as TF

import torchcnn
import torchcnn.functional as F

# Tests of what is built from torch ops: no kernel of ours to emulate.
no_emulation = pytest.mark.no_emulation


# ---------------------------------------------------------------- ReLU: the design notes' convention

def test_relu_forward_matches_torch(device):
    x = torch.randn(3, 4, 5, device=device)
    assert torch.equal(F.relu(x), torch.relu(x))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed"])
def test_relu_keeps_a_byte_per_value_and_the_layout(device, layout):
    """The op's backward keeps where the gradient passes (bool), not the input; dense inputs keep
    their strides."""
    x = torch.randn(2, 3, 4, 5, device=device)
    x = {"contiguous": x, "channels_last": x.contiguous(memory_format=torch.channels_last),
         "transposed": x.transpose(1, 3)}[layout].requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = F.relu(x)  # what autograd keeps for the backward passes through the pack hook
    assert out.stride() == x.stride() and torch.equal(out, torch.relu(x))
    assert len(saved) == 1 and saved[0].dtype == torch.bool and saved[0].shape == x.shape
    (g,) = torch.autograd.grad(out, x, torch.ones_like(out), retain_graph=True)
    assert torch.equal(g, (x >= 0).float())
    # A gradient of another layout (here expanded, as .sum() hands it back) is laid out as the mask.
    (g,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(g, (x >= 0).float()) and g.stride() == x.stride()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_relu_gradient_passes_at_zero_and_above_but_not_below(device, dtype):
    info = torch.finfo(dtype)
    subnormal = info.tiny * info.eps  # the smallest positive value: its negative is the first below 0
    x = torch.tensor([-2.0, -subnormal, -0.0, 0.0, subnormal, 3.0, float("nan"), float("-inf")], dtype=dtype,
                     device=device, requires_grad=True)
    out = F.relu(x)
    torch.testing.assert_close(out, torch.relu(x), equal_nan=True, rtol=0, atol=0)
    (g,) = torch.autograd.grad(out, x, torch.full_like(x, 5.0), create_graph=True)
    assert g[:6].tolist() == [0.0, 0.0, 5.0, 5.0, 5.0, 5.0] and g[7] == 0  # torch's passes 0 at exactly 0
    assert g[6] == 5.0  # NaN propagates, and so does its gradient (as torch.threshold's)
    assert torch.equal(out.signbit(), torch.threshold(x, -subnormal, 0).signbit())  # −0 stays −0


@no_emulation
def test_relu_inplace(device):
    x = torch.randn(10, device=device, requires_grad=True)
    y = x * 1.0
    before = y.detach().clone()
    out = F.relu(y, inplace=True)
    assert out is y and torch.equal(y, before.clamp_min(0))
    (g,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(g, (before >= 0).float())


def test_relu_gradcheck(device):
    x = torch.randn(20, dtype=torch.float64, device=device)
    x = (x + x.sign() * 0.1).requires_grad_()  # stay clear of the kink for finite differences
    assert torch.autograd.gradcheck(F.relu, (x,))


# ---------------------------------------------------------------- Linear

@no_emulation
@pytest.mark.parametrize("shape", [(5, 7), (2, 3, 7), (7,)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_torch(device, shape, bias):
    x = torch.randn(shape, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(4, 7, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, device=device, requires_grad=True) if bias else None
    ours, theirs = F.linear(x, w, b), TF.linear(x, w, b)
    torch.testing.assert_close(ours, theirs)
    inputs = [t for t in (x, w, b) if t is not None]
    grad = torch.randn_like(theirs)
    for a, e in zip(torch.autograd.grad(ours, inputs, grad), torch.autograd.grad(theirs, inputs, grad)):
        torch.testing.assert_close(a, e)


# ---------------------------------------------------------------- softmax + cross-entropy

CE_CASES = [
    dict(),
    dict(reduction="sum"),
    dict(reduction="none"),
    dict(label_smoothing=0.1),
    dict(label_smoothing=0.2, reduction="none"),
    dict(weight=True),
    dict(weight=True, label_smoothing=0.3),
    dict(weight=True, reduction="sum", label_smoothing=0.05),
    dict(ignore_index=1),
    dict(ignore_index=1, weight=True, label_smoothing=0.1),
    dict(ignore_index=2, reduction="none", label_smoothing=0.1),
]


def _ce_args(kwargs, classes, device):
    kwargs = dict(kwargs)
    if kwargs.get("weight"):
        kwargs["weight"] = torch.rand(classes, dtype=torch.float64, device=device) + 0.5
    return kwargs


@no_emulation
@pytest.mark.parametrize("shape", [(6, 5), (3, 5, 2, 3), (5,)], ids=str)
@pytest.mark.parametrize("kwargs", CE_CASES, ids=str)
def test_cross_entropy_class_targets_match_torch(device, shape, kwargs):
    classes = shape[1] if len(shape) > 1 else shape[0]
    z = torch.randn(shape, dtype=torch.float64, device=device, requires_grad=True)
    target_shape = shape[:1] + shape[2:] if len(shape) > 1 else ()
    target = torch.randint(0, classes, target_shape, device=device)
    kwargs = _ce_args(kwargs, classes, device)
    ours, theirs = F.cross_entropy(z, target, **kwargs), TF.cross_entropy(z, target, **kwargs)
    torch.testing.assert_close(ours, theirs, equal_nan=True)  # NaN where every target is ignored
    grad = torch.randn_like(theirs)
    torch.testing.assert_close(torch.autograd.grad(ours, z, grad)[0], torch.autograd.grad(theirs, z, grad)[0],
                               equal_nan=True)


@pytest.mark.parametrize("kwargs", [dict(), dict(reduction="sum"), dict(reduction="none"), dict(label_smoothing=0.2),
                                    dict(weight=True), dict(weight=True, label_smoothing=0.1, reduction="none")], ids=str)
@no_emulation
def test_cross_entropy_probability_targets_match_torch(device, kwargs):
    z = torch.randn(4, 6, 3, dtype=torch.float64, device=device, requires_grad=True)
    target = torch.softmax(torch.randn(4, 6, 3, dtype=torch.float64, device=device), dim=1)
    kwargs = _ce_args(kwargs, 6, device)
    ours, theirs = F.cross_entropy(z, target, **kwargs), TF.cross_entropy(z, target, **kwargs)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(torch.autograd.grad(ours.sum(), z)[0], torch.autograd.grad(theirs.sum(), z)[0])


@no_emulation
def test_cross_entropy_gradient_is_softmax_minus_onehot(device):
    z = torch.randn(4, 10, dtype=torch.float64, device=device, requires_grad=True)
    y = torch.tensor([3, 0, 9, 3], device=device)
    (g,) = torch.autograd.grad(F.cross_entropy(z, y, reduction="sum"), z)
    torch.testing.assert_close(g, torch.softmax(z, 1) - TF.one_hot(y, 10).double())


@no_emulation
def test_cross_entropy_is_stable_for_huge_logits(device):
    z = torch.tensor([[1000.0, 0.0, -1000.0], [-5e4, 5e4, 0.0]], device=device, requires_grad=True)
    y = torch.tensor([0, 0], device=device)
    loss = F.cross_entropy(z, y, reduction="none")
    torch.testing.assert_close(loss, torch.tensor([0.0, 1e5], device=device))
    assert torch.isfinite(torch.autograd.grad(loss.sum(), z)[0]).all()


@no_emulation
def test_cross_entropy_gradcheck(device):
    z = torch.randn(5, 4, dtype=torch.float64, device=device, requires_grad=True)
    y = torch.tensor([0, 3, 1, 1, 2], device=device)
    w = torch.rand(4, dtype=torch.float64, device=device)
    assert torch.autograd.gradcheck(lambda t: F.cross_entropy(t, y, weight=w, label_smoothing=0.1), (z,))


@no_emulation
def test_cross_entropy_empty_batch_is_nan_like_torch(device):
    z = torch.randn(0, 4, device=device)
    y = torch.zeros(0, dtype=torch.long, device=device)
    assert torch.isnan(F.cross_entropy(z, y)) and torch.isnan(TF.cross_entropy(z, y))
    assert F.cross_entropy(z, y, reduction="none").shape == (0,)


# ---------------------------------------------------------------- torchcnn.nn: drop-ins for torch.nn

def _model(nn):
    return torch.nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.ReLU(),
        nn.MaxPool2d(2), torch.nn.Flatten(), nn.Linear(16 * 2 * 2, 10))


def test_same_seed_gives_same_initial_weights():
    torch.manual_seed(3)
    ours = _model(torchcnn.nn)
    torch.manual_seed(3)
    theirs = _model(torch.nn)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for (k, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        assert torch.equal(a, b), k


def test_state_dict_loads_both_ways_and_models_agree(device):
    ours, theirs = _model(torchcnn.nn).to(device), _model(torch.nn).to(device)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(4, 1, 12, 12, device=device)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-5)
    theirs2 = _model(torch.nn).to(device)
    theirs2.load_state_dict(ours.state_dict())
    torch.testing.assert_close(theirs2(x), theirs(x))


def test_layers_honour_torch_constructor_arguments():
    conv = torchcnn.nn.Conv2d(3, 6, (3, 5), stride=2, padding="valid", dilation=(1, 2), groups=3, bias=False)
    reference = torch.nn.Conv2d(3, 6, (3, 5), stride=2, padding="valid", dilation=(1, 2), groups=3, bias=False)
    reference.load_state_dict(conv.state_dict())
    x = torch.randn(2, 3, 9, 13)
    torch.testing.assert_close(conv(x), reference(x))
    pool = torchcnn.nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True, return_indices=True)
    out, idx = pool(torch.randn(1, 2, 7, 7))
    assert out.shape == idx.shape == (1, 2, 4, 4)
    loss = torchcnn.nn.CrossEntropyLoss(label_smoothing=0.1, reduction="sum")
    logits, target = torch.randn(5, 4), torch.randint(0, 4, (5,))
    torch.testing.assert_close(loss(logits, target), torch.nn.CrossEntropyLoss(label_smoothing=0.1, reduction="sum")(
        logits, target))


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
def test_conv_padding_modes_match_torch(device, mode):
    torch.manual_seed(0)
    ours = torchcnn.nn.Conv2d(2, 3, 3, padding=(1, 2), padding_mode=mode).to(device)
    torch.manual_seed(0)
    theirs = torch.nn.Conv2d(2, 3, 3, padding=(1, 2), padding_mode=mode).to(device)
    x = torch.randn(2, 2, 6, 7, device=device)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-5)


def test_a_training_step_matches_torch(device):
    torch.manual_seed(1)
    ours = _model(torchcnn.nn).to(device).double()
    theirs = _model(torch.nn).to(device).double()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(8, 1, 12, 12, dtype=torch.float64, device=device)
    y = torch.randint(0, 10, (8,), device=device)
    for model, loss_fn in ((ours, torchcnn.nn.CrossEntropyLoss()), (theirs, torch.nn.CrossEntropyLoss())):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        loss_fn(model(x), y).backward()
        opt.step()
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b)  # no ReLU input is exactly 0 with random data
