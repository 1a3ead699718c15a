import contextlib
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torchcnn  # noqa: E402,F401
import torchcnn.testing  # noqa: E402

# Every op test runs on the CPU kernels, on the CUDA kernels when a GPU is present, and on the
# CUDA kernels emulated on the CPU (csrc/cuda compiled as C++: torchcnn.testing), whose test ids
# say "emulated": `pytest -k emulated` runs the CUDA code without a GPU.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) + ["emulated"]

# The references must be exact to the dtype: torch's CUDA convolutions (cuDNN) would otherwise run
# float32 in TF32, and cuBLAS may reduce half-type partial sums in half precision.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False


def pytest_configure(config):
    config.addinivalue_line("markers", "no_emulation: the test exercises no kernel (tracing, torch-only "
                                       "layers): run it on real devices only")
    config.addinivalue_line("markers", "cuda_kernels: the test is about csrc/cuda: run it on cuda and emulated only")


def pytest_generate_tests(metafunc):
    if "device" in metafunc.fixturenames:
        devices = DEVICES
        if metafunc.definition.get_closest_marker("no_emulation"):
            devices = [d for d in devices if d != "emulated"]
        if metafunc.definition.get_closest_marker("cuda_kernels"):
            devices = [d for d in devices if d != "cpu"]
        metafunc.parametrize("device", devices, indirect=True)


def cuda_ops(request):
    """The op namespace of the CUDA kernels the test runs: torchcnn's, or the emulated library's."""
    if request.node.callspec.params["device"] == "emulated":
        return torchcnn.testing.emulated_cuda_ops()
    torchcnn.load()  # the CUDA kernels' private ops (_cuda_set_chunk_budget) come with them
    return torch.ops.torchcnn


@contextlib.contextmanager
def cuda_route(ops, route="", bits64=False):
    """The CUDA forward forced onto `route` ("direct", "tiled" or "gemm"; "" the rule) wherever it
    applies, and every kernel onto 64-bit indices if `bits64`, for the length of the block."""
    previous_route = ops._cuda_conv2d_force_route(route)
    previous_bits = ops._cuda_force_64bit_indices(bits64)
    try:
        yield
    finally:
        ops._cuda_conv2d_force_route(previous_route)
        ops._cuda_force_64bit_indices(previous_bits)


@pytest.fixture
def device(request):
    """The device to put tensors on. For "emulated" that is the CPU, with every torchcnn op routed
    to the emulated CUDA kernels for the length of the test."""
    if request.param == "emulated":
        with torchcnn.testing.emulated_cuda():
            yield "cpu"
    else:
        yield request.param


@pytest.fixture
def kernels(request, device):
    """Which kernels the test's device runs: "cpu" (csrc/cpu) or "cuda" (csrc/cuda, emulated or not)."""
    return "cpu" if request.node.callspec.params["device"] == "cpu" else "cuda"


@pytest.fixture(scope="session")
def built():
    """The kernels compiled (if need be) and loaded before a test starts processes that run them, so
    that no wait of the test on such a process includes a cold build."""
    return torchcnn.load()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
