"""torch.compile and torch.export of models built from torchcnn layers, in-place ReLU included
(every torchvision ResNet has it). torch.library.opcheck of every op is in test_compile.py."""

import pytest
import torch

import torchcnn
from models import ResNetBlock, twins

pytestmark = pytest.mark.no_emulation


def test_compile_fullgraph_with_inplace_relu(device):
    model, _ = twins(ResNetBlock, device, dtype=torch.float32)
    x = torch.randn(2, 3, 12, 12, device=device)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    expected = model(x)
    got = compiled(x)
    torch.testing.assert_close(got, expected)
    grads = torch.autograd.grad(got.sum(), list(model.parameters()))
    expected_grads = torch.autograd.grad(model(x).sum(), list(model.parameters()))
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e)


def test_compiled_inplace_relu_keeps_the_design_notes_gradient(device):
    relu = torchcnn.nn.ReLU(inplace=True)

    def f(x):
        y = x * 1  # a non-leaf, as in a network
        return relu(y)

    x = torch.tensor([-1.0, 0.0, 2.0], device=device, requires_grad=True)
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    (g,) = torch.autograd.grad(out.sum(), x)
    assert g.tolist() == [0.0, 1.0, 1.0]  # the gradient passes at z = 0


def test_torch_export_runs_and_matches(device):
    model, _ = twins(ResNetBlock, device, dtype=torch.float32)
    x = torch.randn(2, 3, 12, 12, device=device)
    exported = torch.export.export(model, (x,))
    names = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert "torchcnn.conv2d.default" in names and "torchcnn.max_pool2d_with_indices.default" in names
    torch.testing.assert_close(exported.module()(x), model(x))
