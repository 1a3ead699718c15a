"""The C++ Autograd kernels (csrc/autograd): which calls take them, what their outputs look like,
and that torch.compile traces them. Their gradients are the rest of the suite's business: every
gradient test that goes through torchcnn.functional or torch.ops.torchcnn on CPU or CUDA tensors
runs these nodes. (With create_graph their backward calls the gradient ops through autograd,
whose Python kernels record them; tangents and torch.func take the Python kernels throughout.)"""

from __future__ import annotations

import platform

import pytest
import torch
import torch.nn.functional as TF

import torchcnn
import torchcnn.functional as F
import torchcnn.testing

ops = torch.ops.torchcnn


def _conv_inputs():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 6, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, generator=gen, dtype=torch.float64, requires_grad=True)
    return x, w, b


# (op name, call on (x, w, b), the node's name in C++)
CALLS = [
    ("relu", lambda x, w, b: ops.relu(x), "ReLU"),
    ("conv2d", lambda x, w, b: (ops.conv2d(x, w, b, [1, 1], [1, 1]),), "Conv2d"),
    ("conv2d_relu", lambda x, w, b: ops.conv2d_relu(x, w, b, [1, 1], [1, 1]), "Conv2dReLU"),
    ("conv2d_relu_max_pool2d", lambda x, w, b: ops.conv2d_relu_max_pool2d(x, w, b, [1, 1], [1, 1]),
     "Conv2dReLUMaxPool2d"),
    ("max_pool2d_with_indices", lambda x, w, b: ops.max_pool2d_with_indices(x, [2, 2], [2, 2]), "MaxPool2d"),
    ("cross_entropy", lambda x, w, b: ops.cross_entropy(x.flatten(1), torch.tensor([1, 0])), "CrossEntropy"),
]


@pytest.mark.parametrize("name, fn, node", CALLS, ids=[c[0] for c in CALLS])
def test_a_gradient_takes_the_cpp_node_and_the_other_outputs_are_plain(name, fn, node):
    """The differentiable output's grad_fn is the C++ node; the outputs that take no gradient
    (masks, indices, log Σ exp) are plain tensors, as torch's own max-pool indices are."""
    torchcnn.load()
    first, *others = fn(*_conv_inputs())
    assert first.requires_grad and first.grad_fn.name().endswith(f"::{node}>")
    assert all(not t.requires_grad and t.grad_fn is None for t in others)


@pytest.mark.parametrize("name, fn, node", CALLS, ids=[c[0] for c in CALLS])
def test_without_a_gradient_no_node_is_made(name, fn, node):
    torchcnn.load()
    with torch.no_grad():
        outputs = fn(*_conv_inputs())
    assert all(t.grad_fn is None and not t.requires_grad for t in outputs)
    detached = fn(*(t.detach() for t in _conv_inputs()))
    assert all(t.grad_fn is None for t in detached)


def test_only_the_arguments_that_ask_get_a_gradient():
    """The node computes ∂L/∂X, ∂L/∂W and ∂L/∂b only for what asks (the rest come back None from
    autograd.grad's allow_unused), with and without a bias."""
    x, w, b = _conv_inputs()
    for bias in (b, None):
        out = F.conv2d(x, w.detach(), bias, padding=1)
        grads = torch.autograd.grad(out.sum(), (x,) if bias is None else (x, bias))
        want = torch.autograd.grad(TF.conv2d(x, w.detach(), bias, padding=1).sum(),
                                   (x,) if bias is None else (x, bias))
        for got, expected in zip(grads, want):
            torch.testing.assert_close(got, expected)
    out = F.conv2d_relu_max_pool2d(x.detach(), w, None, padding=1)
    (grad_w,) = torch.autograd.grad(out.sum(), (w,))
    expected = torch.autograd.grad(TF.max_pool2d(TF.relu(TF.conv2d(x.detach(), w, None, padding=1)), 2).sum(), (w,))[0]
    torch.testing.assert_close(grad_w, expected)


def test_the_fused_backward_takes_the_sparse_op_only_where_the_rule_says():
    """The rule lives in the C++ node: forcing a route outside its reach (a differentiated
    backward) is ignored, and a forced route is undone on leaving the block."""
    from torchcnn.testing import forced_fused_backward_route

    torchcnn.load()  # before the first call: the C++ nodes serve only calls after it
    x = torch.randn(2, 32, 8, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, 32, 3, 3, dtype=torch.float64, requires_grad=True)

    def sparse_taken(create_graph=False):
        out = F.conv2d_relu_max_pool2d(x, w, None, padding=1)
        with torch.profiler.profile() as prof:
            torch.autograd.grad(out.sum(), (x, w), create_graph=create_graph)
        return any(e.name.endswith("_cpu_conv2d_relu_max_pool2d_backward") for e in prof.events())

    # The rule's own choice: the sparse op, but at x86's baseline tier, where it is the slower route.
    rule = not (torchcnn.testing.cpu_capability() == "default" and platform.machine() in ("x86_64", "AMD64"))
    assert sparse_taken() == rule
    with forced_fused_backward_route("dense"):
        assert not sparse_taken()
    with forced_fused_backward_route("sparse"):
        assert sparse_taken() and not sparse_taken(create_graph=True)
    assert sparse_taken() == rule
    with pytest.raises(ValueError, match="'sparse' or 'dense'"):
        forced_fused_backward_route("fast")


LAYERS = {
    "conv2d": lambda x, w: F.conv2d(x, w, None, padding=1),
    "conv2d_relu": lambda x, w: F.conv2d_relu(x, w, None, padding=1),
    "conv2d_relu_max_pool2d": lambda x, w: F.conv2d_relu_max_pool2d(x, w, None, padding=1),
    "max_pool2d": lambda x, w: F.max_pool2d(x, 3, 2, ceil_mode=True),
    "relu": lambda x, w: F.relu(x),
}


@pytest.mark.parametrize("layer", LAYERS)
def test_dynamic_shapes_stay_symbolic_through_the_backward(layer):
    """torch.compile(dynamic=True) over batches and planes of several sizes: one graph, whose
    backward (the C++ node's, sizes read as SymInts) gives eager's gradients. A size read as a
    plain int would specialise the graph and recompile for every shape."""
    from torch._dynamo.utils import counters

    torchcnn.load()
    fn = LAYERS[layer]
    w = torch.randn(8, 32, 3, 3, dtype=torch.float64, requires_grad=True)  # 32 channels: the CPU's sparse route

    def loss_of(x):
        return fn(x, w).square().sum()

    torch._dynamo.reset()
    counters.clear()
    try:
        compiled = torch.compile(loss_of, dynamic=True, backend="aot_eager")
        for n, size in ((2, 10), (3, 13), (5, 11)):  # no size that equals another (duck sizing would tie them)
            x = torch.randn(n, 32, size, size, dtype=torch.float64, requires_grad=True)
            got = torch.autograd.grad(compiled(x), (x, w), allow_unused=True, materialize_grads=True)
            want = torch.autograd.grad(loss_of(x), (x, w), allow_unused=True, materialize_grads=True)
            for g, e in zip(got, want):
                torch.testing.assert_close(g, e)
        assert counters["stats"]["unique_graphs"] == 1
    finally:
        torch._dynamo.reset()


def test_compiled_autograd_traces_the_cpp_nodes():
    """torch.compile's compiled autograd traces each C++ node's backward into its graph (the nodes
    are traceable: no graph break, so fullgraph holds), and a model of every layer gets the
    gradients eager autograd gives."""
    from torch._dynamo import compiled_autograd
    from torch._dynamo.utils import counters

    torchcnn.load()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 1, 12, 12, generator=gen)
    target = torch.randint(0, 10, (4,), generator=gen)
    w1 = torch.randn(4, 1, 3, 3, generator=gen, requires_grad=True)
    w2 = torch.randn(6, 4, 3, 3, generator=gen, requires_grad=True)
    w3 = torch.randn(8, 6, 3, 3, generator=gen, requires_grad=True)
    dense = torch.randn(10, 8, generator=gen, requires_grad=True)
    leaves = (w1, w2, w3, dense)

    def loss_of(x):
        h = F.conv2d_relu_max_pool2d(x, w1, None, padding=1)  # 4 × 6 × 6
        h = F.relu(F.conv2d(h, w2, None, padding=1))
        h = F.conv2d_relu(F.max_pool2d(h, 3, 2, ceil_mode=True), w3, None)  # 3 × 3, then 1 × 1
        return F.cross_entropy(F.linear(h.flatten(1), dense), target)

    torch._dynamo.reset()
    counters.clear()
    try:
        loss = loss_of(x)
        with compiled_autograd._enable(torch.compile(backend="eager", fullgraph=True)):
            loss.backward()
        assert counters["compiled_autograd"]["captures"] == 1
    finally:
        torch._dynamo.reset()
    compiled = [t.grad.clone() for t in leaves]
    expected = torch.autograd.grad(loss_of(x), leaves)
    for got, want in zip(compiled, expected):
        torch.testing.assert_close(got, want)
