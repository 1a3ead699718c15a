"""torchcnn: convolutional-network layers as custom PyTorch operators in C++ and CUDA.

- ``torch.ops.torchcnn``: the operators (conv2d and its gradients, max_pool2d with indices and its
  gradient). They exist as soon as torchcnn is imported; their compiled kernels are loaded on
  first use — and, in a source checkout where nothing was built, compiled then, once.
- ``torchcnn.functional``: functions with torch.nn.functional's names and signatures.
- ``torchcnn.nn``: layers that are drop-ins for torch.nn's.
- ``torchcnn.onnx``: deprecated; ``torch.onnx.export`` exports torchcnn's layers as they are.
- ``torchcnn.testing``: the CUDA kernels compiled for and run on the CPU, for the test suite.

``torchcnn.mnist`` is not part of the library: it is the MNIST application that train.py and
predict.py are built from (it needs torchvision, tqdm and matplotlib, and nothing here imports it).
"""

from . import _ops, functional, nn  # noqa: F401  (_ops defines the ops and their rules)
from ._extension import load

__version__ = "0.1.0"

__all__ = ["functional", "nn", "load", "__version__"]
