"""Autocast for the ops: torch's policy for convolutions — inside torch.autocast, conv2d (and the
fused ops that start with it) runs in the autocast dtype (its floating inputs cast to it, float64
left alone); cross_entropy runs in float32, as torch's; max_pool2d has no autocast rule and runs in
its input's dtype, as torch's does. The casts happen above autograd, so the
gradients flow back through them to the original dtypes."""

from __future__ import annotations

import torch

from .schemas import ops

# The ops that start with a convolution, and so take torch's policy for one.
AUTOCAST_OPS = ("conv2d", "conv2d_relu", "conv2d_relu_max_pool2d")


def autocast(*tensors):
    """conv2d's tensors (the first one given, None allowed after it) as the autocast of their device
    has them: cast to its dtype where it is enabled, as they are elsewhere. For the callers that
    bypass the dispatcher's Autocast key (a Function applied directly)."""
    device_type = tensors[0].device.type
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return tensors
    return _cast(tensors, torch.get_autocast_dtype(device_type))


def _cast(values, dtype):
    """Floating tensors to `dtype`, except float64, which autocast leaves alone (as torch's does)."""
    return [v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dtype != torch.float64 else v
            for v in values]


def register(library: torch.library.Library, name: str, float32: bool = False) -> None:
    """Op `name` under autocast: in the autocast dtype, or, with `float32`, in float32 (torch's policy
    for losses such as cross_entropy)."""
    op = getattr(ops, name).default
    for device_type in ("cpu", "cuda"):
        key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        exclude = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

        def kernel(*args, _device_type=device_type, _exclude=exclude):
            dtype = torch.float32 if float32 else torch.get_autocast_dtype(_device_type)
            with torch._C._ExcludeDispatchKeyGuard(_exclude):
                return op(*_cast(args, dtype))

        op.py_impl(getattr(torch._C.DispatchKey, key))(kernel)
        library.impl(name, lambda _keyset, *args, _kernel=kernel: _kernel(*args), key, with_keyset=True)

