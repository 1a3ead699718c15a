"""Every op of torch.ops.torchcnn called directly, over its samples (tests/samples.py): first and
second derivatives by finite differences, on each device's kernels. The ops' values against torch
are in test_conv2d.py and test_max_pool2d.py; their registrations in test_compile.py (opcheck)."""

import pytest
import torch

from samples import SAMPLE_INPUTS


def _distinct(t):
    """Values of t's shape, all different and well apart, so that no finite-difference step moves
    a pooling window's maximum."""
    values = torch.randperm(t.numel(), dtype=t.dtype, device=t.device).view(t.shape) / max(t.numel(), 1)
    return values.requires_grad_(t.requires_grad)


@pytest.mark.parametrize("op", SAMPLE_INPUTS)
def test_gradcheck_and_gradgradcheck(op, device):
    function = getattr(torch.ops.torchcnn, op)
    checked = 0
    for args in SAMPLE_INPUTS[op](device, torch.float64, requires_grad=True):
        args = list(args)
        if op == "max_pool2d_with_indices":
            args[0] = _distinct(args[0])
        slots = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]
        if any(args[i].numel() == 0 for i in slots):
            continue

        def call(*tensors, args=args, slots=slots):
            full = list(args)
            for i, t in zip(slots, tensors):
                full[i] = t
            out = function(*full)
            return out[0] if isinstance(out, tuple) else out  # the other outputs are indices and masks

        inputs = tuple(args[i] for i in slots)
        assert torch.autograd.gradcheck(call, inputs, fast_mode=True), args
        assert torch.autograd.gradgradcheck(call, inputs, fast_mode=True), args
        checked += 1
    assert checked >= 5
