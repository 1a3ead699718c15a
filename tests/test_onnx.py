"""ONNX export (torch.onnx.export with dynamo=True and torchcnn.onnx's translations): a standard
ONNX graph that onnxruntime runs with PyTorch's results."""

import pytest
import torch

pytest.importorskip("onnxscript", reason="ONNX export needs onnxscript (pip install onnx onnxscript)")
ort = pytest.importorskip("onnxruntime", reason="running the exported model needs onnxruntime")

import torchcnn.onnx  # noqa: E402
from models import ResNetBlock, SmallCNN, twins  # noqa: E402

STANDARD = {"Conv", "MaxPool", "Gemm", "MatMul", "Add", "Relu", "LessOrEqual", "Where", "ReduceMean", "Reshape",
            "Flatten"}


@pytest.mark.parametrize("model_class,shape", [(SmallCNN, (3, 1, 10, 10)), (ResNetBlock, (2, 3, 16, 16))])
def test_export_runs_in_onnxruntime(model_class, shape, tmp_path):
    model, _ = twins(model_class, dtype=torch.float32)
    model.eval()
    x = torch.randn(shape)
    program = torchcnn.onnx.export(model, (x,), verbose=False)
    ops = {node.op_type for node in program.model_proto.graph.node}
    assert {"Conv", "MaxPool"} <= ops and ops <= STANDARD, ops
    assert not any(node.domain.startswith("torchcnn") for node in program.model_proto.graph.node)
    path = tmp_path / "model.onnx"
    program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), model(x), rtol=1e-4, atol=1e-5)


def test_fused_layers_export_to_conv_relu_maxpool(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torchcnn.nn.Conv2dReLUMaxPool2d(1, 4, 3, padding=1, ceil_mode=True),
                                torchcnn.nn.Conv2dReLU(4, 6, 3), torch.nn.Flatten(), torch.nn.Linear(6 * 3 * 3, 5))
    x = torch.randn(2, 1, 9, 9)
    program = torchcnn.onnx.export(model.eval(), (x,), verbose=False)
    ops = {node.op_type for node in program.model_proto.graph.node}
    assert {"Conv", "Relu", "MaxPool"} <= ops, ops
    assert not any(node.domain.startswith("torchcnn") for node in program.model_proto.graph.node)
    path = tmp_path / "fused.onnx"
    program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), model(x), rtol=1e-4, atol=1e-5)


def test_translation_table_covers_the_forward_ops():
    table = torchcnn.onnx.translation_table()
    ops = torch.ops.torchcnn
    assert set(table) == {ops.relu.default, ops.conv2d.default, ops.conv2d_relu.default,
                          ops.conv2d_relu_max_pool2d.default, ops.max_pool2d_with_indices.default}
