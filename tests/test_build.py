"""The build: toolkit discovery, CUDA on/off, and both ways of loading the extension."""

import os
import shutil
import stat
import subprocess
import sys

import pytest
import torch

import torchcnn
from torchcnn import _build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPS = ["conv2d", "conv2d_backward_input", "conv2d_backward_weight", "max_pool2d_with_indices", "max_pool2d_backward"]


def test_ops_live_in_torch_ops_torchcnn():
    for name in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"torchcnn::{name}", "CPU"), name


def test_torchcnn_cuda_env_var_forces_cpu_build(monkeypatch):
    monkeypatch.setenv("TORCHCNN_CUDA", "0")
    cfg = _build.config()
    assert not cfg.with_cuda and all(s.endswith(".cpp") for s in cfg.sources)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on PATH")
def test_wrapper_nvcc_resolves_to_the_real_toolkit(tmp_path, monkeypatch):
    real = shutil.which("nvcc")
    wrapper = tmp_path / "bin" / "nvcc"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec "{real}" "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    toolkit = _build._toolkit_of_nvcc(str(wrapper))
    assert toolkit != str(tmp_path) and _build._is_toolkit(toolkit)
    monkeypatch.setenv("PATH", f"{wrapper.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    assert _build.find_cuda_home() == toolkit


@pytest.mark.skipif(torch.version.cuda is None or _build.find_cuda_home() is None,
                    reason="needs a CUDA build of torch and a CUDA toolkit")
def test_cuda_build_finds_library_headers(monkeypatch):
    monkeypatch.delenv("TORCHCNN_CUDA", raising=False)
    cfg = _build.config()
    assert cfg.with_cuda
    for header in ("cuda_runtime.h", "cublas_v2.h", "cusparse.h"):
        assert any(os.path.isfile(os.path.join(d, header))
                   for d in cfg.include_dirs + [os.path.join(cfg.cuda_home, "include")]), header


def test_just_in_time_build_loads_the_ops():
    """A checkout with nothing built: `import torchcnn` compiles (or reuses) the extension."""
    env = dict(os.environ, TORCHCNN_JIT="1", PYTHONPATH=ROOT)
    code = ("import torch, torchcnn; print(torchcnn.LOADED_FROM); "
            "print(torch.ops.torchcnn.conv2d(torch.ones(1, 1, 3, 3), torch.ones(1, 1, 3, 3)).item())")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["jit", "9.0"]


def test_loaded_from_is_reported():
    assert torchcnn.LOADED_FROM in ("prebuilt", "jit")


@pytest.mark.skipif(not _build.config().with_cuda, reason="this environment builds the extension without CUDA")
def test_cuda_kernels_are_compiled_in():
    """With a CUDA toolkit (as in CI) every .cu file is compiled and registers its kernels."""
    assert torchcnn.WITH_CUDA
    for name in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"torchcnn::{name}", "CUDA"), name
