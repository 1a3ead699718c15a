"""The ops' Autograd kernels: the op's arguments are its Function's tensors followed by its other
arguments spelled out. Without a gradient or tangent to track, the call goes straight on to the
kernels below autograd, as torch.library.register_autograd's kernels do (that API has no jvp).
On CPU and CUDA tensors the forward ops' C++ kernels (csrc/autograd) come first; these serve the
gradient ops, forward-mode tangents, torch.func's transforms and other devices.
"""

from __future__ import annotations

import torch

from . import routing
from .conv2d import (Conv2dBackwardInputFunction, Conv2dBackwardWeightFunction, Conv2dFunction, Conv2dReLUFunction,
                     Conv2dReLUMaxPool2dFunction)
from .cross_entropy import CrossEntropyFunction, cross_entropy_gradient
from .max_pool2d import MaxPool2dBackwardFunction, MaxPool2dFunction
from .params import Conv2dParams, Conv2dPoolParams, CrossEntropyParams, MaxPool2dParams, NoParams
from .relu import ReLUBackwardFunction, ReLUFunction
from .routing import tracks_derivatives
from .schemas import ops

FUNCTIONS = {  # op name -> (Function, number of leading tensor arguments, parameter class)
    "conv2d": (Conv2dFunction, 3, Conv2dParams),
    "conv2d_relu": (Conv2dReLUFunction, 3, Conv2dParams),
    "conv2d_relu_max_pool2d": (Conv2dReLUMaxPool2dFunction, 3, Conv2dPoolParams),
    "conv2d_backward_input": (Conv2dBackwardInputFunction, 3, Conv2dParams),
    "conv2d_backward_weight": (Conv2dBackwardWeightFunction, 3, Conv2dParams),
    "max_pool2d_with_indices": (MaxPool2dFunction, 1, MaxPool2dParams),
    "max_pool2d_backward": (MaxPool2dBackwardFunction, 3, MaxPool2dParams),
    "cross_entropy": (CrossEntropyFunction, 3, CrossEntropyParams),
    "relu": (ReLUFunction, 1, NoParams),
    "relu_backward": (ReLUBackwardFunction, 2, NoParams),
}


def _in_kernel(function):
    """`function` as the Autograd kernel runs it: the same forward, backward and jvp, with the
    context set up inside forward. Inside a dispatcher kernel torch.func's transforms are already
    being applied level by level, and a Function with a separate setup_context would hand itself to
    them again (torch.func's custom_function_call); this form is plain autograd at each level, as
    the kernels that torch.library.register_autograd makes are."""

    def forward(ctx, *inputs):
        output = function.forward(*inputs)
        function.setup_context(ctx, inputs, output)
        return output

    return type(function.__name__ + "Kernel", (torch.autograd.Function,), {
        "forward": staticmethod(forward),
        "backward": staticmethod(function.backward),
        "jvp": staticmethod(function.jvp),
    })


def _pairs(values):
    """An int[2] argument as the dispatcher may hand it over (a list) as a tuple."""
    return tuple(values) if isinstance(values, (list, tuple)) else values


def register(library: torch.library.Library) -> None:
    """Register every op's Autograd kernel in ``library``, and tell :func:`routing.call` the Functions."""
    routing.FUNCTIONS.update(FUNCTIONS)
    after_autograd = torch._C._after_autograd_keyset
    for name, (function, tensors, params_class) in FUNCTIONS.items():
        op = getattr(ops, name).default
        defaults = [a.default_value for a in op._schema.arguments]
        in_kernel = _in_kernel(function)

        def kernel(keyset, *args, _op=op, _name=name, _function=in_kernel, _tensors=tensors,
                   _params=params_class, _defaults=defaults):
            if not tracks_derivatives(args[:_tensors]):
                with torch._C._AutoDispatchBelowAutograd():
                    return _op.redispatch(keyset & after_autograd, *args)
            if torch._C._are_functorch_transforms_active():
                raise NotImplementedError(
                    f"torch.ops.torchcnn.{_name} called directly inside torch.func.grad/jvp/jacrev/...: "
                    f"call it through torchcnn.functional (or a torchcnn.nn layer), or apply its Function "
                    f"(torchcnn._ops.{FUNCTIONS[_name][0].__name__}), which torch.func can differentiate; "
                    f"torch.func.vmap alone works on the op")
            args = (*args, *_defaults[len(args):])  # arguments left at their defaults are not passed
            params = _params(*(_pairs(a) for a in args[_tensors:]))
            return _function.apply(*args[:_tensors], params)

        library.impl(name, kernel, "Autograd", with_keyset=True)

    def cross_entropy_backward(keyset, *args):
        if tracks_derivatives(args[:5]):
            raise NotImplementedError(
                "torch.ops.torchcnn.cross_entropy_backward is not differentiable itself: differentiate "
                "torchcnn.functional.cross_entropy with create_graph=True, whose backward then uses a "
                "differentiable formula")
        with torch._C._AutoDispatchBelowAutograd():
            return ops.cross_entropy_backward.default.redispatch(keyset & after_autograd, *args)

    library.impl("cross_entropy_backward", cross_entropy_backward, "Autograd", with_keyset=True)

    def gradient(grad_loss, input, target, weight, total_weight, reduction, ignore_index, label_smoothing):
        params = CrossEntropyParams(reduction, ignore_index, label_smoothing)
        return cross_entropy_gradient(grad_loss, input, target, weight, total_weight, params)

    library.impl("_cross_entropy_gradient", gradient, "CompositeImplicitAutograd")
