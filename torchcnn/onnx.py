"""ONNX export: ``torch.onnx.export`` exports models with torchcnn's layers as it is.

``torch.onnx.export(model, (x,))`` needs nothing from this module: torchcnn's forward ops carry
decompositions into torch's own ops (:mod:`torchcnn._ops.decompositions`), which torch's exporter
applies to ops it cannot translate, so the graph holds the standard ``Conv``, ``Relu`` and
``MaxPool``. :func:`export` and :func:`translation_table` remain, deprecated, for code written
against earlier versions of torchcnn.
"""

from __future__ import annotations

import warnings

import torch

from . import _ops  # noqa: F401  (defines torch.ops.torchcnn and its decompositions)


def translation_table() -> dict:
    """Deprecated: an empty table. ``torch.onnx.export`` needs no ``custom_translation_table`` for
    torchcnn's ops any more (their decompositions do it), and an empty one changes nothing."""
    warnings.warn("torchcnn.onnx.translation_table is deprecated: torch.onnx.export needs no translation table "
                  "for torchcnn's layers", DeprecationWarning, stacklevel=2)
    return {}


def export(model: torch.nn.Module, args: tuple, **kwargs):
    """Deprecated: ``torch.onnx.export(model, args, dynamo=True, **kwargs)``, which it calls.
    Returns the ``torch.onnx.ONNXProgram``."""
    warnings.warn("torchcnn.onnx.export is deprecated: torch.onnx.export(model, args) exports torchcnn's layers "
                  "as they are", DeprecationWarning, stacklevel=2)
    return torch.onnx.export(model, args, dynamo=True, **kwargs)
