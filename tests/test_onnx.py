"""ONNX export: torch.onnx.export, as it is, turns torchcnn's layers into standard ONNX operators
that onnxruntime runs with PyTorch's results; the decompositions it uses give every output of the
ops they stand for."""

import pytest
import torch

import torchcnn
from models import ResNetBlock, SmallCNN, twins

STANDARD = {"Conv", "MaxPool", "Gemm", "MatMul", "Add", "Relu", "LessOrEqual", "Where", "ReduceMean", "Reshape",
            "Flatten"}


def _export_and_run(model, x, tmp_path):
    """The model exported by torch.onnx.export with no extra argument, its ONNX ops, and onnxruntime's output."""
    pytest.importorskip("onnxscript", reason="ONNX export needs onnxscript (pip install onnx onnxscript)")
    ort = pytest.importorskip("onnxruntime", reason="running the exported model needs onnxruntime")
    program = torch.onnx.export(model, (x,), dynamo=True, verbose=False)
    nodes = program.model_proto.graph.node
    assert not any(node.domain.startswith("torchcnn") for node in nodes)
    path = tmp_path / "model.onnx"
    program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return {node.op_type for node in nodes}, torch.from_numpy(out)


@pytest.mark.parametrize("model_class,shape", [(SmallCNN, (3, 1, 10, 10)), (ResNetBlock, (2, 3, 16, 16))])
def test_torch_onnx_export_runs_in_onnxruntime(model_class, shape, tmp_path):
    model, _ = twins(model_class, dtype=torch.float32)
    model.eval()
    x = torch.randn(shape)
    ops, out = _export_and_run(model, x, tmp_path)
    assert {"Conv", "MaxPool"} <= ops and ops <= STANDARD, ops
    with torch.no_grad():
        torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-5)


def test_fused_layers_export_to_conv_relu_maxpool(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torchcnn.nn.Conv2dReLUMaxPool2d(1, 4, 3, padding=1, ceil_mode=True),
                                torchcnn.nn.Conv2dReLU(4, 6, 3), torch.nn.Flatten(), torch.nn.Linear(6 * 3 * 3, 5))
    x = torch.randn(2, 1, 9, 9)
    ops, out = _export_and_run(model.eval(), x, tmp_path)
    assert {"Conv", "Relu", "MaxPool"} <= ops, ops
    with torch.no_grad():
        torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-5)


def test_deprecated_torchcnn_onnx_export_still_exports():
    pytest.importorskip("onnxscript", reason="ONNX export needs onnxscript (pip install onnx onnxscript)")
    import torchcnn.onnx

    model, _ = twins(SmallCNN, dtype=torch.float32)
    with pytest.warns(DeprecationWarning, match="torch.onnx.export"):
        program = torchcnn.onnx.export(model.eval(), (torch.randn(2, 1, 10, 10),), verbose=False)
    assert "Conv" in {node.op_type for node in program.model_proto.graph.node}
    with pytest.warns(DeprecationWarning, match="needs no translation table"):
        assert torchcnn.onnx.translation_table() == {}


def assert_same(got, expected):
    """Equal outputs: float values to float64's tolerance (the convolution's sums may be ordered
    differently), masks and indices exactly; NaN where NaN."""
    for g, e in zip(got, expected, strict=True) if isinstance(expected, tuple) else [(got, expected)]:
        exact = not e.is_floating_point()
        torch.testing.assert_close(g, e, equal_nan=True, **({"rtol": 0, "atol": 0} if exact else {}))


def _with_ties(x):
    """Zeros, ties within windows and a NaN: where the pass mask and the indices are decided."""
    x = x.clone()
    x[..., 0, :] = 0.0
    x[..., 1, 1] = x[..., 1, 0]
    x[0, 0, 2, 2] = float("nan")
    return x


@pytest.mark.parametrize("ceil_mode", [False, True])
def test_decompositions_give_every_output_of_their_op(ceil_mode):
    """Each decomposition, run on real tensors, returns what its op returns: values, the pass masks
    (where Z ≥ 0) and the pooling indices, NaN and ties included."""
    from torchcnn._ops import decompositions as d

    ops = torch.ops.torchcnn
    torch.manual_seed(0)
    x = _with_ties(torch.randn(2, 3, 9, 7, dtype=torch.float64))
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    w[0] = 0.0  # an output plane of zeros: Z = b, a plane where every window ties
    b = torch.randn(4, dtype=torch.float64)
    b[0] = 0.0
    conv = ((2, 1), (1, 2), (1, 1), 1)
    assert_same(d.conv2d(x, w, b, *conv), ops.conv2d(x, w, b, *conv))
    assert_same(d.conv2d_relu(x, w, b, *conv), ops.conv2d_relu(x, w, b, *conv))
    assert_same(d.conv2d_relu_max_pool2d(x, w, b, (1, 1), (1, 1), (1, 1), 1, ceil_mode),
                ops.conv2d_relu_max_pool2d(x, w, b, (1, 1), (1, 1), (1, 1), 1, ceil_mode))
    assert_same(d.relu(x), ops.relu(x))
    pool = ((3, 2), (2, 1), (1, 0), (1, 2), ceil_mode)
    assert_same(d.max_pool2d_with_indices(x, *pool), ops.max_pool2d_with_indices(x, *pool))


def test_the_decompositions_leave_torch_export_and_fake_tensors_alone():
    """torch.export keeps torchcnn's ops; under symbolic shapes, fake tensors get the ops' own fake
    kernels (not the decompositions), so a dynamic-shape compile traces the same layouts."""
    model, _ = twins(ResNetBlock, dtype=torch.float32)
    exported = torch.export.export(model, (torch.randn(2, 3, 16, 16),),
                                   dynamic_shapes=({0: torch.export.Dim("batch")},)).run_decompositions()
    names = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert {"torchcnn.conv2d.default", "torchcnn.max_pool2d_with_indices.default"} <= names

    def fused(x, w):
        return torch.ops.torchcnn.conv2d_relu_max_pool2d(x, w, None, [1, 1], [1, 1], [1, 1], 1, True)

    compiled = torch.compile(fused, dynamic=True, backend="aot_eager", fullgraph=True)
    w = torch.randn(4, 3, 3, 3).to(memory_format=torch.channels_last)
    for n in (2, 3):
        x = torch.randn(n, 3, 9, 7)
        for got, expected in zip(compiled(x, w), fused(x, w)):
            assert got.stride() == expected.stride()
            torch.testing.assert_close(got, expected, equal_nan=True)
