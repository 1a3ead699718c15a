"""ONNX export of models built from torchcnn's layers.

torchcnn's ops are custom ops, which ONNX does not know; :func:`translation_table` maps each one to
the standard ONNX operators of its torch.nn namesake (``Conv``, ``MaxPool``) through onnxscript's
translations of torch's own ops, whose arguments torchcnn's ops share. Pass it to
``torch.onnx.export(..., dynamo=True, custom_translation_table=...)``, or call :func:`export`.
Needs the ``onnx`` and ``onnxscript`` packages (and ``onnxruntime`` to run the result).
"""

from __future__ import annotations

import torch

from . import _ops  # noqa: F401  (defines torch.ops.torchcnn)


def translation_table() -> dict:
    """``{torchcnn op: onnxscript function}`` for ``torch.onnx.export``'s ``custom_translation_table``."""
    try:
        from onnxscript.function_libs.torch_lib.ops import core, nn
    except ImportError as e:
        raise ImportError("torchcnn.onnx: exporting to ONNX needs onnxscript (pip install onnx onnxscript)") from e
    return {
        torch.ops.torchcnn.conv2d.default: core.aten_conv2d,
        torch.ops.torchcnn.max_pool2d_with_indices.default: nn.aten_max_pool2d_with_indices,
    }


def export(model: torch.nn.Module, args: tuple, **kwargs):
    """``torch.onnx.export(model, args, dynamo=True, ...)`` with torchcnn's translations added to
    any ``custom_translation_table`` given. Returns the ``torch.onnx.ONNXProgram``."""
    table = {**translation_table(), **(kwargs.pop("custom_translation_table", None) or {})}
    return torch.onnx.export(model, args, dynamo=True, custom_translation_table=table, **kwargs)
