"""The CPU kernels at each instruction-set tier (csrc/cpu/simd.h).

The tier is torch's CPU capability, so ATEN_CPU_CAPABILITY caps both libraries at once. Here: the
tier reported is torch's; every tier this CPU can run computes what torch computes (CI runs the
whole CPU op suite again at avx2 and default); and no function of the library uses instructions
wider than its name says, so a narrower CPU never meets them (the linker cannot hand an AVX-512
copy of a shared function to baseline code, as it can with an inline function compiled with
-mavx512f in one file)."""

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import torchcnn
from torchcnn.testing import CPU_CAPABILITIES, cpu_capability

TORCH_TIER = {"AVX512": "avx512", "AVX2": "avx2", "DEFAULT": "default"}


def test_the_tier_is_torchs_cpu_capability():
    assert cpu_capability() == TORCH_TIER.get(torch.backends.cpu.get_cpu_capability(), "default")


def _tiers_below_this_cpu():
    here = CPU_CAPABILITIES.index(cpu_capability())
    return list(CPU_CAPABILITIES[here:])


# Each op at one tier, against torch at the same tier, in a process capped before torch loads:
# conv (the GEMM, Winograd and depthwise paths), the fused layer and its sparse backward, the
# 2×2 pool, ReLU, and the loss, forward and backward.
_CHECK = r"""
import sys
import torch
import torch.nn.functional as F
import torchcnn
import torchcnn.functional as tf
from torchcnn.testing import cpu_capability

assert cpu_capability() == sys.argv[1], (cpu_capability(), sys.argv[1])
torch.manual_seed(0)

def close(a, b, what):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m: f"{what}: {m}")

def grads(fn, *xs):
    xs = [x.detach().clone().requires_grad_() for x in xs]
    y = fn(*xs)
    y.backward(torch.linspace(-1, 1, y.numel()).reshape(y.shape))
    return [y.detach()] + [x.grad for x in xs]

for name, x, w, kw in [
    ("gemm", torch.randn(4, 16, 13, 11), torch.randn(40, 16, 5, 5), dict(padding=2)),
    ("winograd", torch.randn(4, 32, 14, 14), torch.randn(48, 32, 3, 3), dict(padding=1)),
    ("depthwise", torch.randn(3, 24, 17, 15), torch.randn(24, 1, 3, 3), dict(padding=1, groups=24)),
    ("strided", torch.randn(2, 8, 15, 15), torch.randn(16, 8, 3, 3), dict(stride=2)),
]:
    for a, b in zip(grads(lambda x, w: tf.conv2d(x, w, **kw), x, w), grads(lambda x, w: F.conv2d(x, w, **kw), x, w)):
        close(a, b, name)

x, w, bias = torch.randn(8, 32, 14, 14), torch.randn(64, 32, 3, 3), torch.randn(64)
fused = grads(lambda x, w, b: tf.conv2d_relu_max_pool2d(x, w, b, padding=1), x, w, bias)
plain = grads(lambda x, w, b: F.max_pool2d(F.relu(F.conv2d(x, w, b, padding=1)), 2), x, w, bias)
for a, b in zip(fused, plain):
    close(a, b, "conv2d_relu_max_pool2d")

x = torch.randn(4, 64, 24, 26)
for a, b in zip(grads(lambda x: tf.max_pool2d(x, 2), x), grads(lambda x: F.max_pool2d(x, 2), x)):
    close(a, b, "max_pool2d")
for a, b in zip(grads(tf.relu, x), grads(F.relu, x)):
    close(a, b, "relu")

z, t = torch.randn(70, 37) * 4, torch.randint(0, 37, (70,))
for kw in (dict(), dict(label_smoothing=0.1, weight=torch.rand(37))):
    ours = grads(lambda z: tf.cross_entropy(z, t, **kw), z)
    ref = grads(lambda z: F.cross_entropy(z, t, **kw), z)
    for a, b in zip(ours, ref):
        close(a, b, f"cross_entropy {kw}")
print("ok", cpu_capability())
"""


@pytest.mark.parametrize("tier", CPU_CAPABILITIES)
def test_every_tier_computes_what_torch_does(tier):
    if tier not in _tiers_below_this_cpu():
        pytest.skip(f"this CPU runs at most the {cpu_capability()!r} tier")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=tier)
    result = subprocess.run([sys.executable, "-c", _CHECK, tier], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith(f"ok {tier}")


def test_an_unknown_gemm_name_and_the_avx512_gemm_below_its_tier_are_refused():
    with pytest.raises(ValueError, match="expected name to be 'avx512' or 'blas'"):
        torch.ops.torchcnn._cpu_set_gemm("neon")
    if cpu_capability() != "avx512":
        with pytest.raises(ValueError, match="needs the avx512 tier"):
            torch.ops.torchcnn._cpu_set_gemm("avx512")


# Instructions by the widest instruction set they need: AVX-512 (zmm registers, mask registers,
# the upper 16 vector registers), else AVX or AVX2 (VEX-encoded: every mnemonic starting in v, the
# ymm registers).
_AVX512 = re.compile(r"%zmm|%k[0-7]\b|%[xy]mm(1[6-9]|2[0-9]|3[01])\b")
_AVX = re.compile(r"%ymm|^\s*[0-9a-f]+:\s+v[a-z0-9]+\s")


def _loaded_libraries():
    """The torchcnn libraries mapped into this process (the extension, whichever build it is)."""
    with open("/proc/self/maps") as maps:
        paths = {line.split()[-1] for line in maps if line.rstrip().endswith(".so")}
    return sorted(p for p in paths if "torchcnn" in os.path.basename(os.path.dirname(p)) + os.path.basename(p))


def _functions_by_width(library):
    """{function name: "avx512" | "avx2" | None} over the library's code, from objdump."""
    listing = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", library], capture_output=True, text=True,
                             check=True, timeout=600).stdout
    widths, name = {}, None
    for line in listing.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            name = header.group(1)
            widths.setdefault(name, None)
        elif name is not None:
            if _AVX512.search(line):
                widths[name] = "avx512"
            elif widths[name] is None and _AVX.search(line):
                widths[name] = "avx2"
    return widths


@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("objdump") is None,
                    reason="reads the ELF library with objdump")
@pytest.mark.skipif(not re.match(r"x86_64|i.86", os.uname().machine), reason="x86 instruction sets")
def test_no_function_uses_wider_instructions_than_its_tier():
    torchcnn.load()
    libraries = _loaded_libraries()
    assert libraries, "the torchcnn library is not mapped into this process"
    for library in libraries:
        widths = _functions_by_width(library)
        tiered = {name: width for name, width in widths.items() if width is not None}
        # The tiers' own copies are there (a build that vectorised nothing would pass the rest).
        assert any("_avx512" in name for name in tiered), f"{library}: no AVX-512 code at all"
        assert any("_avx2" in name and width == "avx2" for name, width in tiered.items()), f"{library}: no AVX2 code"
        wrong = sorted(
            f"{width}: {name}" for name, width in tiered.items()
            if not ("_avx512" in name or (width == "avx2" and "_avx2" in name))
        )
        assert not wrong, f"{library}: functions whose instructions need more than their tier:\n" + "\n".join(wrong)
