"""How the formulas call the ops, and when autograd must record a call.

The formulas (conv2d.py, max_pool2d.py, relu.py, cross_entropy.py) are written with the ops
themselves, through :func:`call`, so that gradients of any order run torchcnn's kernels; a
Function's ``forward`` runs its op below autograd (:func:`below_autograd`).
"""

from __future__ import annotations

import torch
from torch.autograd import forward_ad

from .autocast import AUTOCAST_OPS, autocast
from .schemas import ops

# op name -> (its Function, how many leading tensor arguments it takes, its parameter class):
# filled in by registration.register when the package sets the ops up.
FUNCTIONS: dict[str, tuple] = {}


def call(name, *args):
    """Run op `name` on its full argument list: the op itself, or, while torch.func transforms are
    active, its Function (with the Autocast key's casts, which applying a Function bypasses)."""
    if not torch._C._are_functorch_transforms_active():
        return getattr(ops, name)(*args)
    function, tensors, params = FUNCTIONS[name]
    inputs = args[:tensors]
    if name in AUTOCAST_OPS:
        inputs = autocast(*inputs)
    return function.apply(*inputs, params(*args[tensors:]))


def below_autograd(op, *args):
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def tracks_derivatives(tensors) -> bool:
    """Whether autograd must record the call: a gradient is wanted, or a tangent is attached."""
    present = [t for t in tensors if isinstance(t, torch.Tensor)]
    if torch.is_grad_enabled() and any(t.requires_grad for t in present):
        return True
    return any(forward_ad.unpack_dual(t).tangent is not None for t in present)


def sum_present(*terms, zeros):
    """The sum of the terms that are not None; `zeros()` if all are (the tangent of an output
    that depends only on arguments whose tangents are not given, e.g. a gradient op's shape-only
    argument in forward-over-reverse AD)."""
    present = [t for t in terms if t is not None]
    if not present:
        return zeros()
    total = present[0]
    for t in present[1:]:
        total = total + t
    return total
