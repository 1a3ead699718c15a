"""The ops of ``torch.ops.torchcnn`` and everything PyTorch needs to know about them.

- :mod:`.schemas`: the op definitions and fake kernels (shapes, for tracing), and the trigger that
  loads the compiled kernels on first use (:mod:`torchcnn._extension`);
- :mod:`.autograd`: one ``torch.autograd.Function`` per op and the op's Autograd kernel — reverse
  and forward-mode AD of any order;
- :mod:`.vmap`: batching rules for ``torch.func.vmap``;
- :mod:`.autocast`: torch's autocast policy for convolutions.

Importing this package compiles nothing.
"""

import torch

from . import autocast, autograd, schemas, vmap  # noqa: F401  (vmap registers its rules on import)
from .autograd import (Conv2dBackwardInputFunction, Conv2dBackwardWeightFunction, Conv2dFunction, Conv2dParams,
                       Conv2dPoolParams, Conv2dReLUFunction, Conv2dReLUMaxPool2dFunction, CrossEntropyFunction,
                       CrossEntropyParams, MaxPool2dBackwardFunction, MaxPool2dFunction, MaxPool2dParams)
from .schemas import ops

__all__ = ["ops", "Conv2dFunction", "Conv2dBackwardInputFunction", "Conv2dBackwardWeightFunction",
           "Conv2dReLUFunction", "Conv2dReLUMaxPool2dFunction", "CrossEntropyFunction", "MaxPool2dFunction",
           "MaxPool2dBackwardFunction", "Conv2dParams", "Conv2dPoolParams", "CrossEntropyParams", "MaxPool2dParams"]

_KERNELS = torch.library.Library(schemas.NAMESPACE, "IMPL")  # this package's kernel registrations
autograd.register(_KERNELS)
for name in autocast.AUTOCAST_OPS:
    autocast.register(_KERNELS, name)
autocast.register(_KERNELS, "cross_entropy", float32=True)
schemas.install_loader()
