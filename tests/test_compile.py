"""torch.library.opcheck and torch.compile(fullgraph=True) of every op over its samples, and of
torchcnn models."""

import pytest
import torch

import torchcnn
from samples import SAMPLE_INPUTS

# Tracing and the fake kernels, not the kernels: the emulated CUDA kernels add nothing here.
pytestmark = pytest.mark.no_emulation


def _needs_expecttest():
    pytest.importorskip("expecttest", reason="torch.library.opcheck imports expecttest (pip install expecttest)")


@pytest.mark.parametrize("op", SAMPLE_INPUTS)
def test_opcheck(op, device):
    """Schema, fake kernel, autograd registration and AOT dispatch of each op over its samples
    (the gradient ops are differentiable too)."""
    _needs_expecttest()
    for args in SAMPLE_INPUTS[op](device, torch.float64, requires_grad=True):
        if args[0].numel() == 0 or (op == "max_pool2d_backward" and args[1].numel() == 0):
            continue  # opcheck's gradient checks need an element
        torch.library.opcheck(getattr(torch.ops.torchcnn, op).default, args)


@pytest.mark.parametrize("op", SAMPLE_INPUTS)
def test_compiled_op_matches_eager(op, device):
    """Each op under torch.compile(fullgraph=True), over the first of its samples: values and
    gradients as in eager mode (the fake kernel shapes the graph, the Autograd kernel its backward)."""
    function = getattr(torch.ops.torchcnn, op)
    for args in list(SAMPLE_INPUTS[op](device, torch.float64, requires_grad=True))[:4]:
        torch._dynamo.reset()  # a fresh graph per sample: recompilations past the cache limit would run eagerly
        leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad and a.numel()]
        compiled = torch.compile(lambda *a: function(*a), fullgraph=True, backend="aot_eager")
        out, expected = compiled(*args), function(*args)
        out, expected = (out[0], expected[0]) if isinstance(out, tuple) else (out, expected)
        torch.testing.assert_close(out, expected)
        if leaves:
            grad = torch.randn_like(expected)
            torch.testing.assert_close(torch.autograd.grad(out, leaves, grad, allow_unused=True, materialize_grads=True),
                                       torch.autograd.grad(expected, leaves, grad, allow_unused=True,
                                                           materialize_grads=True))


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


def test_compile_inductor_where_the_environment_says_ci(built, tmp_path):
    """With ``CI`` set (GitHub Actions sets it) inductor refuses an implicit fallback to an op that
    has a decomposition; torchcnn's ops (decomposed for ONNX) are registered as its fallbacks when
    inductor loads, and importing torchcnn does not load inductor. A fresh process and a cold cache,
    so that nothing registered or compiled before decides it."""
    import os
    import subprocess
    import sys

    script = """if True:
        import sys
        import torch
        import torchcnn
        assert "torch._inductor.lowering" not in sys.modules, "import torchcnn imported inductor"
        sys.path.insert(0, sys.argv[1])
        from test_compile import _mnist_model
        model = _mnist_model(torchcnn.nn)
        compiled = torch.compile(model, fullgraph=True, dynamic=True)
        for batch in (2, 5):
            x = torch.randn(batch, 1, 12, 12)
            torch.testing.assert_close(compiled(x), model(x))
        print("compiled")
    """
    env = {**os.environ, "CI": "true", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path), "TORCHINDUCTOR_FX_GRAPH_CACHE": "0"}
    result = subprocess.run([sys.executable, "-c", script, os.path.dirname(os.path.abspath(__file__))],
                            capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]
