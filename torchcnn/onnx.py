"""ONNX export of models built from torchcnn's layers.

torchcnn's ops are custom ops, which ONNX does not know; :func:`translation_table` maps each one to
the standard ONNX operators of its torch.nn namesake (``Conv``, ``MaxPool``; the fused ops to
``Conv``, ``Relu`` and ``MaxPool``) through onnxscript's translations of torch's own ops, whose
arguments torchcnn's ops share. Pass it to
``torch.onnx.export(..., dynamo=True, custom_translation_table=...)``, or call :func:`export`.
Needs the ``onnx`` and ``onnxscript`` packages (and ``onnxruntime`` to run the result).
"""

from __future__ import annotations

import torch

from . import _ops  # noqa: F401  (defines torch.ops.torchcnn)


def translation_table() -> dict:
    """``{torchcnn op: onnxscript function}`` for ``torch.onnx.export``'s ``custom_translation_table``."""
    try:
        from onnxscript import ir
        from onnxscript import opset18 as op
        from onnxscript.function_libs.torch_lib.ops import core, nn
    except ImportError as e:
        raise ImportError("torchcnn.onnx: exporting to ONNX needs onnxscript (pip install onnx onnxscript)") from e

    def passes(y):
        """Where the design notes' ReLU passes its gradient: not (Y < 0)."""
        return op.Not(op.Less(y, op.CastLike(op.Constant(value_float=0.0), y)))

    def conv2d_relu(input, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1):
        y = core.aten_conv2d(input, weight, bias, stride, padding, dilation, groups)
        return op.Relu(y), passes(y)

    def conv2d_relu_max_pool2d(input, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1,
                               ceil_mode=False):
        y = core.aten_conv2d(input, weight, bias, stride, padding, dilation, groups)
        activations = op.Relu(y)
        activations.shape = ir.Shape([None] * 4)  # the pool's translation reads the rank: (N, K, H, W)
        pooled, indices = nn.aten_max_pool2d_with_indices(activations, (2, 2), (2, 2), (0, 0), (1, 1), ceil_mode)
        planes = op.Constant(value_ints=[0, 0, -1])  # (N, K, H·W): indices are flat within a plane
        at_max = op.GatherElements(op.Reshape(y, planes), op.Reshape(indices, planes), axis=2)
        return pooled, indices, passes(op.Reshape(at_max, op.Shape(pooled)))

    def relu(input):
        return op.Relu(input), passes(input)

    return {
        torch.ops.torchcnn.relu.default: relu,
        torch.ops.torchcnn.conv2d.default: core.aten_conv2d,
        torch.ops.torchcnn.conv2d_relu.default: conv2d_relu,
        torch.ops.torchcnn.conv2d_relu_max_pool2d.default: conv2d_relu_max_pool2d,
        torch.ops.torchcnn.max_pool2d_with_indices.default: nn.aten_max_pool2d_with_indices,
    }


def export(model: torch.nn.Module, args: tuple, **kwargs):
    """``torch.onnx.export(model, args, dynamo=True, ...)`` with torchcnn's translations added to
    any ``custom_translation_table`` given. Returns the ``torch.onnx.ONNXProgram``."""
    table = {**translation_table(), **(kwargs.pop("custom_translation_table", None) or {})}
    return torch.onnx.export(model, args, dynamo=True, custom_translation_table=table, **kwargs)
