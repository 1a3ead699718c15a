"""The emulated CUDA library itself: that it is csrc/cuda's code, with torchcnn's op contract, and that
the `emulated` test device really runs it. (The op tests, run on that device, check its results.)"""

import glob
import os
import re
import shlex
import subprocess

import pytest
import torch
import torch.nn.functional as TF

import torchcnn.functional as F
import torchcnn.testing

CUDA_SOURCES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc", "cuda")
OPS = ["conv2d", "conv2d_backward_input", "conv2d_backward_weight", "max_pool2d_with_indices", "max_pool2d_backward"]


def test_emulated_library_registers_a_kernel_for_every_op():
    torchcnn.testing.emulated_cuda_ops()
    for name in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"torchcnn_emulated::{name}", "CPU"), name


def test_emulated_cuda_routes_every_op_to_the_emulated_kernels():
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    with torchcnn.testing.emulated_cuda() as calls, torch.profiler.profile() as prof:
        y = F.max_pool2d(F.conv2d(x, w, padding=1), 2)
        y.backward(torch.ones_like(y))
    assert calls == {name: 1 for name in OPS}
    ran = {e.name for e in prof.events()}
    assert {f"torchcnn_emulated::{name}" for name in OPS} <= ran
    expected = TF.max_pool2d(TF.conv2d(x, w, padding=1), 2)
    torch.testing.assert_close(y, expected)


def test_a_process_holds_one_of_the_two_builds():
    loaded = torchcnn.testing._sanitize_requested()
    torchcnn.testing.emulated_cuda_ops()
    with pytest.raises(RuntimeError, match="can hold only one of the two"):
        torchcnn.testing.emulated_cuda_ops(sanitize=not loaded)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(CUDA_SOURCES, "*.cu"))), ids=os.path.basename)
def test_kernels_reach_the_device_only_through_launch_cuh(path):
    """What lets the emulated build be the same code: no <<<…>>>, no CUDA header, no runtime call
    in the kernel files; launch.cuh holds each of those, with its emulated form."""
    source = open(path).read()
    assert "<<<" not in source
    assert not re.search(r"#include\s*<(c10/cuda|ATen/cuda|cuda)", source)
    assert not re.search(r"\b(cuda[A-Z]\w*|at::cuda::|c10::cuda::)", source)
    assert '#include "launch.cuh"' in source


SELFTEST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "emulator", "selftest.cpp")


@pytest.mark.parametrize("sanitize", [False, True], ids=["plain", "asan-ubsan"])
def test_the_emulator_runs_barriers_and_shared_memory_and_reports_their_misuse(tmp_path, sanitize):
    """tests/emulator/selftest.cpp, built without torch: tiles reversed through shared memory with
    barriers right in every launch and wrong without them, a barrier part of a block skipped and
    two barriers at once reported, unwritten shared memory NaN, a kernel's exception kept — with
    AddressSanitizer watching the fibers' stacks too."""
    compiler = shlex.split(os.environ.get("CXX") or "c++")
    flags = ["-std=c++17", "-O1", "-g", "-Wall"]
    if sanitize:
        flags += ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
    binary = str(tmp_path / "selftest")
    build = subprocess.run(compiler + flags + [SELFTEST, "-o", binary], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}  # the sanitized suite preloads ASan
    run = subprocess.run([binary], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("\nok ") + run.stdout.startswith("ok ") == 11 and "FAILED" not in run.stdout
