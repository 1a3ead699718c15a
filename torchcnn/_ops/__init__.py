"""The ops of ``torch.ops.torchcnn`` and everything PyTorch needs to know about them, set up here.

- :mod:`.schemas`: the op definitions and fake kernels (shapes, for tracing), and the trigger that
  loads the compiled kernels on first use (:mod:`torchcnn._extension`);
- :mod:`.params`: each op's arguments other than tensors, as one object;
- the formulas, one ``torch.autograd.Function`` per op — :mod:`.conv2d`, :mod:`.max_pool2d`,
  :mod:`.relu`, :mod:`.cross_entropy` — and :mod:`.routing`, how they call the ops;
- :mod:`.registration`: the ops' Autograd kernels, which run those Functions;
- :mod:`.vmap`: batching rules for ``torch.func.vmap``;
- :mod:`.autocast`: torch's autocast policy for convolutions and the loss;
- :mod:`.decompositions`: the forward ops in torch's ops, for ``torch.onnx.export``.

There is one route to every formula. Calling an op (``torch.ops.torchcnn.conv2d``, which is what
:mod:`torchcnn.functional` and :mod:`torchcnn.nn` do) reaches its Autograd kernel; when a gradient
or a forward-mode tangent is needed there, it runs the op's Function, whose ``forward`` runs the
op's kernels below autograd and whose ``backward`` and ``jvp`` are written with the ops
themselves — the gradient of a convolution is again a convolution, the pooling gradient's is a
gather by the same indices — so gradients of any order, forward-mode AD and their mixes all run
torchcnn's kernels, and ``torch.compile`` traces the same route. ``generate_vmap_rule`` lets
``torch.func`` run a Function under vmap by the ops' own vmap rules.
``Conv2dFunction.apply(x, w, b, Conv2dParams(...))`` is the same computation as the op.

On CPU and CUDA tensors the forward ops' Autograd kernels are C++ nodes (csrc/autograd), which
take precedence over these Python kernels: the same backward formulas, at a fraction of the
per-call cost. Forward-mode tangents and torch.func's transforms still reach the Python kernels
and their Functions, and so does the first call in a process (the one that loads the kernels).

One exception to the single route: torch.func's differentiating transforms (grad, jvp, jacrev,
...) can take a Function only where it is applied from Python, not from inside a dispatcher
kernel, so while any torch.func transform is active :mod:`torchcnn.functional` applies the
Function itself (:func:`.routing.call`). The formulas are the same either way.

Importing this package compiles nothing.
"""

import torch

from . import autocast, decompositions, registration, schemas, vmap  # noqa: F401  (registered on import)
from .conv2d import (Conv2dBackwardInputFunction, Conv2dBackwardWeightFunction, Conv2dFunction, Conv2dReLUFunction,
                     Conv2dReLUMaxPool2dFunction)
from .cross_entropy import CrossEntropyFunction
from .max_pool2d import MaxPool2dBackwardFunction, MaxPool2dFunction
from .params import Conv2dParams, Conv2dPoolParams, CrossEntropyParams, MaxPool2dParams
from .schemas import ops

__all__ = ["ops", "Conv2dFunction", "Conv2dBackwardInputFunction", "Conv2dBackwardWeightFunction",
           "Conv2dReLUFunction", "Conv2dReLUMaxPool2dFunction", "CrossEntropyFunction", "MaxPool2dFunction",
           "MaxPool2dBackwardFunction", "Conv2dParams", "Conv2dPoolParams", "CrossEntropyParams", "MaxPool2dParams"]

_KERNELS = torch.library.Library(schemas.NAMESPACE, "IMPL")  # this package's kernel registrations
registration.register(_KERNELS)
for name in autocast.AUTOCAST_OPS:
    autocast.register(_KERNELS, name)
autocast.register(_KERNELS, "cross_entropy", float32=True)
schemas.install_loader()
