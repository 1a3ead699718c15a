"""Each op at one instruction-set tier against torch at the same tier, in this process:

    ATEN_CPU_CAPABILITY=avx2 python tests/tier_check.py avx2

conv (the GEMM, Winograd, depthwise and direct paths), the fused layer and its sparse backward, the 2×2
pool, ReLU and the loss, forward and backward, on float32. Exits non-zero if the kernels run at
another tier than the one named, or if any result differs; prints "ok TIER" at the end. Run by
tests/test_cpu_tiers.py (each tier, capped), under valgrind (a CPU without AVX-512) and under
qemu-aarch64 (scripts/check_aarch64.sh)."""

import sys

import torch
import torch.nn.functional as F

import torchcnn.functional as tf
from torchcnn.testing import cpu_capability


def close(a, b, what):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m: f"{what}: {m}")


def grads(fn, *xs):
    """fn's output and the gradients of its inputs, for a fixed ∂L/∂output."""
    xs = [x.detach().clone().requires_grad_() for x in xs]
    y = fn(*xs)
    y.backward(torch.linspace(-1, 1, y.numel()).reshape(y.shape))
    return [y.detach()] + [x.grad for x in xs]


def same(ours, theirs, what):
    for a, b in zip(ours, theirs):
        close(a, b, what)


def main(tier: str) -> None:
    if cpu_capability() != tier:
        raise SystemExit(f"tier_check: the kernels run at {cpu_capability()!r}, not {tier!r}")
    torch.manual_seed(0)
    for name, x, w, kw in [
        ("gemm", torch.randn(4, 32, 9, 9), torch.randn(40, 32, 3, 3), dict(padding=2, dilation=2)),
        ("direct", torch.randn(4, 16, 13, 11), torch.randn(40, 16, 5, 5), dict(padding=2)),
        ("direct, grouped", torch.randn(3, 16, 12, 10), torch.randn(16, 4, 3, 3), dict(padding=1, groups=4)),
        ("winograd", torch.randn(4, 32, 14, 14), torch.randn(48, 32, 3, 3), dict(padding=1)),
        ("depthwise", torch.randn(3, 24, 17, 15), torch.randn(24, 1, 3, 3), dict(padding=1, groups=24)),
        ("strided", torch.randn(2, 8, 15, 15), torch.randn(16, 8, 3, 3), dict(stride=2)),
    ]:
        same(grads(lambda x, w: tf.conv2d(x, w, **kw), x, w), grads(lambda x, w: F.conv2d(x, w, **kw), x, w), name)

    # Rows of 17 windows (the vector rows and a tail); 3 channels: a tap row of 9 values, whose
    # sparse backward has a tail of its own.
    for channels in (32, 3):
        x, w, b = torch.randn(4, channels, 14, 34), torch.randn(64, channels, 3, 3), torch.randn(64)
        same(grads(lambda x, w, b: tf.conv2d_relu_max_pool2d(x, w, b, padding=1), x, w, b),
             grads(lambda x, w, b: F.max_pool2d(F.relu(F.conv2d(x, w, b, padding=1)), 2), x, w, b),
             f"conv2d_relu_max_pool2d, {channels} channels")

    x = torch.randn(4, 64, 24, 26)
    same(grads(lambda x: tf.max_pool2d(x, 2), x), grads(lambda x: F.max_pool2d(x, 2), x), "max_pool2d")
    same(grads(tf.relu, x), grads(F.relu, x), "relu")

    z, t = torch.randn(70, 37) * 4, torch.randint(0, 37, (70,))
    for kw in (dict(), dict(label_smoothing=0.1, weight=torch.rand(37))):
        same(grads(lambda z: tf.cross_entropy(z, t, **kw), z), grads(lambda z: F.cross_entropy(z, t, **kw), z),
             f"cross_entropy {kw}")
    print("ok", tier)


if __name__ == "__main__":
    main(sys.argv[1])
