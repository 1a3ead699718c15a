"""torch.library.opcheck for every op, and torch.compile(fullgraph=True) of a torchcnn model."""

import pytest
import torch

import torchcnn
from samples import conv2d_samples, make_conv, max_pool2d_samples
from torchcnn.functional import _pair

# Tracing and the fake kernels, not the kernels: the emulated CUDA kernels add nothing here.
pytestmark = pytest.mark.no_emulation


def _needs_expecttest():
    pytest.importorskip("expecttest", reason="torch.library.opcheck imports expecttest (pip install expecttest)")


def _conv_args(sample, device):
    x, w, b = make_conv(sample, device, torch.float64, requires_grad=True)
    k = sample.kwargs
    padding = k.get("padding", 0)
    padding = (0, 0) if padding in ("valid", "same") else _pair("padding", "t", padding)
    return x, w, b, list(_pair("stride", "t", k.get("stride", 1))), list(padding), \
        list(_pair("dilation", "t", k.get("dilation", 1))), k.get("groups", 1)


def _batched(samples):
    return [s for s in samples if len(s.shape) == 4 and s.shape[0] > 0 and s.kwargs.get("padding") != "same"]


@pytest.mark.parametrize("sample", _batched(conv2d_samples(full=False)), ids=repr)
def test_opcheck_conv2d(sample, device):
    _needs_expecttest()
    x, w, b, *params = _conv_args(sample, device)
    torch.library.opcheck(torch.ops.torchcnn.conv2d.default, (x, w, b, *params))
    y = torch.ops.torchcnn.conv2d(x, w, b, *params).detach()
    go = torch.randn_like(y).requires_grad_()  # the backward ops are differentiable too
    torch.library.opcheck(torch.ops.torchcnn.conv2d_backward_input.default, (go, x, w, *params))
    torch.library.opcheck(torch.ops.torchcnn.conv2d_backward_weight.default, (go, x, w, *params))


@pytest.mark.parametrize("sample", _batched(max_pool2d_samples(full=False)), ids=repr)
def test_opcheck_max_pool2d(sample, device):
    _needs_expecttest()
    k = sample.kwargs
    kernel = list(_pair("k", "t", k["kernel_size"]))
    stride = kernel if k.get("stride") is None else list(_pair("s", "t", k["stride"]))
    params = (kernel, stride, list(_pair("p", "t", k.get("padding", 0))), list(_pair("d", "t", k.get("dilation", 1))),
              k.get("ceil_mode", False))
    x = torch.randn(sample.shape, dtype=torch.float64, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.torchcnn.max_pool2d_with_indices.default, (x, *params))
    out, idx = torch.ops.torchcnn.max_pool2d_with_indices(x.detach(), *params)
    torch.library.opcheck(torch.ops.torchcnn.max_pool2d_backward.default,
                          (torch.randn_like(out).requires_grad_(), x.detach(), idx, *params))


def _mnist_model(nn):
    return torch.nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3, padding="same"), nn.ReLU(), nn.MaxPool2d(2),
        torch.nn.Flatten(), nn.Linear(16 * 5 * 5, 10))


def test_compile_fullgraph_matches_eager(device):
    torch.manual_seed(0)
    model = _mnist_model(torchcnn.nn).to(device)
    loss_fn = torchcnn.nn.CrossEntropyLoss()
    x = torch.randn(4, 1, 12, 12, device=device)
    y = torch.randint(0, 10, (4,), device=device)

    def step(m):
        loss = loss_fn(m(x), y)
        grads = torch.autograd.grad(loss, list(m.parameters()))
        return loss, grads

    compiled = torch.compile(model, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    loss_eager, grads_eager = step(model)
    loss_compiled, grads_compiled = step(compiled)
    torch.testing.assert_close(loss_compiled, loss_eager)
    for a, b in zip(grads_compiled, grads_eager):
        torch.testing.assert_close(a, b)


def test_compile_inductor_with_dynamic_batch():
    model = _mnist_model(torchcnn.nn)
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    for batch in (2, 5):
        x = torch.randn(batch, 1, 12, 12)
        torch.testing.assert_close(compiled(x), model(x))
