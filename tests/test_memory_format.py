"""Memory formats: outputs and gradients come back in the format torch gives them (channels_last
in, channels_last out), on every backend. (The fake kernels' memory formats are held to the
kernels' in test_properties.py and by opcheck in test_compile.py.)"""

import itertools

import pytest
import torch
import torch.nn.functional as TF

import torchcnn.functional as F

CL = torch.channels_last


def _format(t):
    if t.is_contiguous():
        return "contiguous"
    return "channels_last" if t.is_contiguous(memory_format=CL) else "strided"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("x_cl,w_cl,g_cl", list(itertools.product([False, True], repeat=3)))
def test_conv2d_keeps_torchs_memory_format(device, x_cl, w_cl, g_cl, dtype):
    x = torch.randn(2, 3, 8, 7, device=device, dtype=dtype)
    w = torch.randn(5, 3, 3, 3, device=device, dtype=dtype)
    x, w = (t.to(memory_format=CL) if cl else t for t, cl in ((x, x_cl), (w, w_cl)))
    x.requires_grad_()
    w.requires_grad_()
    ours, theirs = F.conv2d(x, w, padding=1, stride=(1, 2)), TF.conv2d(x, w, padding=1, stride=(1, 2))
    assert _format(ours) == _format(theirs)
    torch.testing.assert_close(ours, theirs)
    grad = torch.randn_like(theirs, memory_format=CL if g_cl else torch.contiguous_format)
    for a, b in zip(torch.autograd.grad(ours, (x, w), grad), torch.autograd.grad(theirs, (x, w), grad)):
        assert _format(a) == _format(b)
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("x_cl,g_cl", list(itertools.product([False, True], repeat=2)))
@pytest.mark.parametrize("kwargs", [dict(kernel_size=2), dict(kernel_size=3, stride=2, padding=1)], ids=str)
def test_max_pool2d_keeps_torchs_memory_format(device, x_cl, g_cl, kwargs):
    x = torch.randn(2, 3, 8, 8, device=device)
    x = (x.to(memory_format=CL) if x_cl else x).requires_grad_()
    (ours, oi), (theirs, ti) = (f(x, **kwargs, return_indices=True) for f in (F.max_pool2d, TF.max_pool2d))
    assert (_format(ours), _format(oi)) == (_format(theirs), _format(ti))
    assert torch.equal(ours, theirs) and torch.equal(oi, ti)
    grad = torch.randn_like(theirs, memory_format=CL if g_cl else torch.contiguous_format)
    a, b = torch.autograd.grad(ours, x, grad)[0], torch.autograd.grad(theirs, x, grad)[0]
    assert _format(a) == _format(b)
    assert torch.equal(a, b)
