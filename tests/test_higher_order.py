"""Gradients of gradients: every backward op has a gradient of its own, so any order works
(gradient penalties, R1 regularisation, Hessian-vector products) and matches torch."""

import pytest
import torch
import torch.nn.functional as TF

import torchcnn.functional as F
from models import ResNetBlock, SmallCNN, twins
from samples import conv2d_samples, make_conv, max_pool2d_samples


def _small(sample, device):
    x, w, b = make_conv(sample, device, torch.float64)
    if w.shape[0] > 16:  # the MNIST-sized samples (groups = 1): fewer channels keep the Jacobians small
        x, w, b = x[..., :2, :, :], w[:4, :2], b[:4]
    return [t.requires_grad_() for t in (x, w, b) if t is not None]


@pytest.mark.parametrize("sample", [s for s in conv2d_samples(full=False) if s.shape[0] != 0], ids=repr)
def test_conv2d_gradgradcheck(sample, device):
    args = _small(sample, device)
    assert torch.autograd.gradgradcheck(lambda *t: F.conv2d(*t, **sample.kwargs), args)


@pytest.mark.parametrize("sample", [s for s in max_pool2d_samples(full=False) if s.shape[0] != 0], ids=repr)
def test_max_pool2d_gradgradcheck(sample, device):
    shape = list(sample.shape)
    shape[-3] = min(shape[-3], 2)
    x = torch.randperm(torch.Size(shape).numel(), dtype=torch.float64, device=device)
    x = (x / x.numel()).view(shape).requires_grad_()  # distinct values: the argmax does not move
    assert torch.autograd.gradgradcheck(lambda t: F.max_pool2d(t, **sample.kwargs), (x,))


def test_third_order_gradients_match_torch(device):
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, device=device, requires_grad=True)

    def third(conv, pool):
        y = pool(conv(x, w, padding=1), 2).pow(3).sum()
        (gx,) = torch.autograd.grad(y, x, create_graph=True)
        (gw,) = torch.autograd.grad(gx.square().sum(), w, create_graph=True)
        return torch.autograd.grad(gw.sum(), (x, w))

    for ours, theirs in zip(third(F.conv2d, F.max_pool2d), third(TF.conv2d, TF.max_pool2d)):
        torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("model_class", [ResNetBlock, SmallCNN])
def test_gradient_penalty_matches_torch(device, model_class):
    """WGAN-GP / R1: the penalty ‖∂D(x)/∂x‖² is part of the loss, so the weights get gradients
    through the input gradient: every layer's gradient of a gradient is used."""
    ours, theirs = twins(model_class, device)
    channels = 3 if model_class is ResNetBlock else 1
    x = torch.randn(3, channels, 12, 12, dtype=torch.float64, device=device)

    def penalised_grads(model):
        real = x.clone().requires_grad_()
        score = model(real).sum()
        (grad_x,) = torch.autograd.grad(score, real, create_graph=True)
        loss = score + 10 * grad_x.flatten(1).norm(dim=1).sub(1).square().mean()
        return loss, torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)

    loss, grads = penalised_grads(ours)
    expected_loss, expected = penalised_grads(theirs)
    torch.testing.assert_close(loss, expected_loss)
    for (name, _), g, e in zip(ours.named_parameters(), grads, expected):
        assert g is not None and e is not None, name
        torch.testing.assert_close(g, e, msg=lambda m: f"{name}: {m}")
        assert g.abs().sum() > 0, name
