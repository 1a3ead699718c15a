"""Automatic mixed precision: inside torch.autocast, conv2d runs in the autocast dtype and
max_pool2d in its input's dtype, as torch's layers do, so each output has torch's dtype."""

import torch
import torch.nn.functional as TF

import torchcnn.functional as F
from models import ResNetBlock, twins

AUTOCAST_DTYPES = {"cpu": [torch.bfloat16], "cuda": [torch.float16, torch.bfloat16]}


def _autocast(device, dtype):
    return torch.autocast("cuda" if device == "cuda" else "cpu", dtype=dtype)


def test_each_op_has_torchs_dtype(device):
    for dtype in AUTOCAST_DTYPES["cuda" if device == "cuda" else "cpu"]:
        x = torch.randn(2, 3, 8, 8, device=device)
        w = torch.randn(4, 3, 3, 3, device=device)
        b = torch.randn(4, device=device)
        low = x.to(dtype)  # an activation already in the low precision, with float32 weights
        with _autocast(device, dtype):
            for args in ((x, w, b), (low, w, b), (low, w, None)):
                ours, theirs = F.conv2d(*args, padding=1), TF.conv2d(*args, padding=1)
                assert ours.dtype == theirs.dtype == dtype
                torch.testing.assert_close(ours, theirs, rtol=2e-2, atol=5e-2)
            raw = torch.ops.torchcnn.conv2d(x, w, b)
            assert raw.dtype == dtype
            for t in (x, low):
                assert F.max_pool2d(t, 2).dtype == TF.max_pool2d(t, 2).dtype == t.dtype


def test_the_loss_is_float32_whichever_formula_computes_it(device):
    """The op (its autocast rule), and the reference's formula where the op does not apply (a class
    weight that takes a gradient), give torch's float32 loss from low-precision logits."""
    for dtype in AUTOCAST_DTYPES["cuda" if device == "cuda" else "cpu"]:
        logits = torch.randn(6, 5, device=device).to(dtype)
        target = torch.tensor([0, 4, 2, 2, 1, 3], device=device)
        weight = torch.rand(5, device=device, requires_grad=True)
        with _autocast(device, dtype):
            theirs = TF.cross_entropy(logits, target, weight=weight.detach())
            for w in (None, weight.detach(), weight):
                ours = F.cross_entropy(logits, target, weight=w)
                assert ours.dtype == theirs.dtype == torch.float32, w
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        assert torch.autograd.grad(ours, weight)[0].dtype == torch.float32


def test_a_mixed_precision_training_step_matches_torch(device):
    dtype = AUTOCAST_DTYPES["cuda" if device == "cuda" else "cpu"][0]
    ours, theirs = twins(ResNetBlock, device, dtype=torch.float32)
    x, y = torch.randn(4, 3, 16, 16, device=device), torch.randint(0, 5, (4,), device=device)
    results = []
    for model in (ours, theirs):
        with _autocast(device, dtype):
            logits = model(x)
            loss = TF.cross_entropy(logits, y)
        grads = torch.autograd.grad(loss, list(model.parameters()))
        results.append((logits, loss, grads))
    (logits, loss, grads), (e_logits, e_loss, e_grads) = results
    assert logits.dtype == e_logits.dtype
    torch.testing.assert_close(loss, e_loss, rtol=3e-2, atol=3e-2)
    for g, e in zip(grads, e_grads):
        assert g.dtype == e.dtype == torch.float32
        torch.testing.assert_close(g, e, rtol=0.1, atol=0.05)


def test_float64_is_left_alone(device):
    """Autocast casts only float32 (and lower): float64 stays float64, as in torch."""
    x = torch.randn(2, 3, 8, 8, device=device, dtype=torch.float64)
    w = torch.randn(4, 3, 3, 3, device=device, dtype=torch.float64)
    dtype = AUTOCAST_DTYPES["cuda" if device == "cuda" else "cpu"][0]
    with _autocast(device, dtype):
        ours, theirs = F.conv2d(x, w), TF.conv2d(x, w)
        raw = torch.ops.torchcnn.conv2d(x, w)
    assert ours.dtype == theirs.dtype == raw.dtype == torch.float64
    torch.testing.assert_close(ours, theirs)
