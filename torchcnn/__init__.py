"""torchcnn: convolutional-network layers as custom PyTorch operators in C++ and CUDA.

- ``torch.ops.torchcnn``: the compiled operators (conv2d and its gradients, max_pool2d with
  indices and its gradient), loaded on import (built once on first import in a source checkout).
- ``torchcnn.functional``: functions with torch.nn.functional's names and signatures.
- ``torchcnn.nn``: layers that are drop-ins for torch.nn's.
- ``torchcnn.onnx``: ONNX export of models built from them (needs onnxscript).
- ``torchcnn.testing``: the CUDA kernels compiled for and run on the CPU, for the test suite.
- ``torchcnn.mnist``, ``torchcnn.models``, ``torchcnn.training``, ``torchcnn.checkpoint``,
  ``torchcnn.plots``: the pieces train.py and predict.py are built from (import them explicitly;
  they need torchvision, tqdm and matplotlib).
"""

from . import _ops, functional, nn  # noqa: F401  (_ops registers autograd and fake kernels)
from ._extension import LOADED_FROM, WITH_CUDA

__version__ = "0.1.0"

__all__ = ["functional", "nn", "LOADED_FROM", "WITH_CUDA", "__version__"]
