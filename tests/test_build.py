"""The build: toolkit discovery, CUDA on/off, building on first use, and which prebuilt library is
loaded. (Loading a prebuilt torchcnn._C end to end is .ci/run's step after `pip install -e .`.)"""

import importlib.machinery
import importlib.util
import io
import os
import re
import shutil
import stat
import subprocess
import sys
import time

import pytest
import torch

import torchcnn
from torchcnn import _build, _extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPS = ["conv2d", "conv2d_backward_input", "conv2d_backward_weight", "max_pool2d_with_indices", "max_pool2d_backward"]


def test_ops_live_in_torch_ops_torchcnn():
    torchcnn.load()
    for name in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"torchcnn::{name}", "CPU"), name


def test_torchcnn_cuda_env_var_forces_cpu_build(monkeypatch):
    monkeypatch.setenv("TORCHCNN_CUDA", "0")
    cfg = _build.config()
    assert not cfg.with_cuda and all(s.endswith(".cpp") for s in cfg.sources)


@pytest.mark.skipif(torch.version.cuda is None or _build.find_cuda_home() is None,
                    reason="needs a CUDA build of torch and a CUDA toolkit")
def test_just_in_time_build_leaves_cuda_out_without_a_gpu(monkeypatch):
    """Ahead of time, a toolkit is enough to compile the CUDA kernels; just in time, they are
    compiled only where a GPU can run them, or when TORCHCNN_CUDA=1 asks for them."""
    monkeypatch.delenv("TORCHCNN_CUDA", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _build.config().with_cuda
    cfg = _build.config(just_in_time=True)
    assert not cfg.with_cuda and "TORCHCNN_CUDA=1" in cfg.reason
    monkeypatch.setenv("TORCHCNN_CUDA", "1")
    assert _build.config(just_in_time=True).with_cuda
    monkeypatch.delenv("TORCHCNN_CUDA")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _build.config(just_in_time=True).with_cuda


def test_a_build_reports_that_it_is_working():
    stream = io.StringIO()
    with _extension.reporting_progress("the CPU kernels", stream=stream, every=0.05):
        deadline = time.monotonic() + 300  # the ticker's first word, however busy the machine is
        while "still compiling" not in stream.getvalue() and time.monotonic() < deadline:
            time.sleep(0.01)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "torchcnn: compiling the CPU kernels ..."
    assert any(line.startswith("torchcnn: still compiling (") for line in lines[1:-1])
    assert lines[-1].startswith("torchcnn: compiled in ")


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


def test_nothing_is_compiled_or_loaded_until_an_op_runs(tmp_path):
    """A checkout with nothing built: importing the library, building a model and tracing it with
    fake tensors compile nothing and import no application package; the first op call compiles
    the kernels (once) and runs them."""
    cache = tmp_path / "extensions"
    env = dict(os.environ, TORCHCNN_JIT="1", TORCH_EXTENSIONS_DIR=str(cache), PYTHONPATH=ROOT, TORCHCNN_CUDA="0")
    code = """
import sys
import torch
before = set(sys.modules)
import torchcnn, torchcnn.nn, torchcnn.functional
from torch._subclasses.fake_tensor import FakeTensorMode
with FakeTensorMode():
    model = torch.nn.Sequential(torchcnn.nn.Conv2d(1, 4, 3), torchcnn.nn.ReLU(), torchcnn.nn.MaxPool2d(2))
    print(tuple(model(torch.empty(2, 1, 8, 8)).shape))
added = {m.split(".")[0] for m in set(sys.modules) - before}
print(sorted(added & {"tqdm", "matplotlib", "torchvision", "PIL", "onnx", "onnxscript"}))
print(torchcnn._extension.loaded(), os.path.exists(sys.argv[1]))
print(torch.ops.torchcnn.conv2d(torch.ones(1, 1, 3, 3), torch.ones(1, 1, 3, 3)).item())
print(torchcnn._extension.loaded().origin, os.path.exists(sys.argv[1]))
"""
    out = subprocess.run([sys.executable, "-c", "import os\n" + code, str(cache)], env=env, capture_output=True,
                         text=True, timeout=1800)  # a guard against a hang: a cold build under load takes minutes
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["(2, 4, 3, 3)", "[]", "None False", "9.0", "jit True"]
    assert "torchcnn: compiling the CPU kernels only (TORCHCNN_CUDA=0)" in out.stderr


@pytest.mark.skipif(not _build.config(just_in_time=True).with_cuda,
                    reason="this environment builds the extension without CUDA")
def test_cuda_kernels_are_compiled_in():
    """With a GPU or TORCHCNN_CUDA=1 (as in CI) every .cu file is compiled and registers its kernels."""
    assert torchcnn.load().with_cuda
    for name in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"torchcnn::{name}", "CUDA"), name


def _pretend_prebuilt(monkeypatch, path):
    spec = importlib.machinery.ModuleSpec("torchcnn._C", None, origin=str(path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: spec if name == "torchcnn._C" else real(name, *a))


def test_a_prebuilt_library_of_the_old_layout_is_refused_by_name(tmp_path, monkeypatch):
    """torchcnn 0.1.0's _C defined the op schemas itself: loaded beside ours it would fail half-way."""
    old = tmp_path / "_C.cpython-311-x86_64-linux-gnu.so"
    old.write_bytes(b"\x7fELF..." + _extension._OLD_LAYOUT_MARK + b"...")
    _pretend_prebuilt(monkeypatch, old)
    with pytest.raises(ImportError, match=f"{old} was built by an older torchcnn .* delete it"):
        _extension._prebuilt()


@pytest.mark.skipif(sys.platform != "linux" or shutil.which("cc") is None, reason="needs ELF and a C compiler")
def test_the_old_layout_check_reads_only_the_string_constants(tmp_path, monkeypatch):
    """A CUDA build is ~50 MB, its string constants (ELF's .rodata) ~60 kB: the check at every load
    reads those alone, and still finds the old layout's schema there."""
    source = tmp_path / "old.c"
    source.write_text(f'const char *schema = "{_extension._OLD_LAYOUT_MARK.decode()}, int[2] stride)";\n'
                      "char data[1 << 20] = {1};\n")  # a megabyte that is not a constant
    old = tmp_path / "_C.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-o", str(old), str(source)], check=True)
    constants = _extension._string_constants(str(old))
    assert _extension._OLD_LAYOUT_MARK in constants and len(constants) < old.stat().st_size / 2
    _pretend_prebuilt(monkeypatch, old)
    with pytest.raises(ImportError, match="was built by an older torchcnn"):
        _extension._prebuilt()
    # Section headers it cannot follow (stripped, or numbered the extended way): the whole file.
    for offset, value in ((0x28, bytes(8)), (0x28, b"\xff" * 8), (0x3C, bytes(2)), (0x3E, b"\xff\xff")):
        data = bytearray(old.read_bytes())
        data[offset:offset + len(value)] = value
        odd = tmp_path / f"odd_{offset:x}_{value[0]}.so"
        odd.write_bytes(data)
        assert _extension._string_constants(str(odd)) == bytes(data)


def _record(version):
    """csrc/module.cpp's record of the torch a library was built for, as the library holds it."""
    return b"torchcnn built for torch " + _build.torch_build_tag(version).encode() + b"\0"


def test_a_prebuilt_library_older_than_the_sources_is_named(tmp_path, monkeypatch):
    stale = tmp_path / "_C.so"
    stale.write_bytes(b"\x7fELF" + _record(torch.__version__))
    os.utime(stale, (0, 0))
    _pretend_prebuilt(monkeypatch, stale)
    with pytest.warns(UserWarning, match="older than the sources .* TORCHCNN_JIT=1"):
        assert _extension._prebuilt() == str(stale)


@pytest.mark.parametrize("other", ["2.13.0+cpu", "2.99.0", "2.14.1+cu126", "2.14.0a0+git1234", "2.13.0rc1",
                                   "2.14.0.dev20250101+cu128"])
def test_a_prebuilt_library_built_for_another_torch_is_refused_naming_both(tmp_path, monkeypatch, other):
    """Loaded into another torch, an extension fails in the dynamic loader ("undefined symbol"), or
    worse; torchcnn reads the library's record first and says which two versions met."""
    if _build.torch_build_tag(other) == _build.torch_build_tag():
        pytest.skip("this is that torch")
    library = tmp_path / "_C.cpython-311-x86_64-linux-gnu.so"
    library.write_bytes(b"\x7fELF..." + _record(other) + b"...")
    _pretend_prebuilt(monkeypatch, library)
    with pytest.raises(ImportError, match=rf"{library} was built for torch {re.escape(other)}, but this is torch "
                                          rf"{re.escape(torch.__version__)}.*Rebuild it against this torch"):
        _extension._prebuilt()


def test_a_prebuilt_library_without_a_record_is_refused(tmp_path, monkeypatch):
    library = tmp_path / "_C.so"
    library.write_bytes(b"\x7fELF...")
    _pretend_prebuilt(monkeypatch, library)
    with pytest.raises(ImportError, match="does not say which torch it was built for .*TORCHCNN_JIT=1"):
        _extension._prebuilt()


def test_the_built_library_records_this_torch():
    """The library this process loaded (prebuilt or just in time) holds the record the check reads."""
    extension = torchcnn.load()
    if extension.origin == "prebuilt":
        path = importlib.util.find_spec("torchcnn._C").origin
    else:
        name = "torchcnn_C_cuda" if extension.with_cuda else "torchcnn_C_cpu"
        path = os.path.join(_extension.build_directory(name), f"{name}.so")
    record = _extension._BUILT_FOR.search(_extension._string_constants(path))
    assert record is not None, path
    assert _build.torch_version_of_tag(record.group(1).decode()) == torch.__version__


def _build_backend():
    spec = importlib.util.spec_from_file_location("torchcnn_build_backend", os.path.join(ROOT, "tools",
                                                                                         "build_backend.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_build_backend_builds_against_the_environments_torch(tmp_path, monkeypatch):
    """Under build isolation torch is not importable; the backend finds the activated environment's
    torch ($VIRTUAL_ENV) — here one installed from source, through a .pth file — and builds against it,
    asking pip for no torch of its own."""
    backend = _build_backend()
    env = tmp_path / "venv"
    site = backend.sysconfig.get_paths(vars={"base": str(env), "platbase": str(env)})["purelib"]
    source = tmp_path / "pytorch"  # a source checkout, installed editable
    os.makedirs(source / "torch")
    (source / "torch" / "__init__.py").write_text("")
    os.makedirs(site)
    with open(os.path.join(site, "torch.pth"), "w") as f:
        f.write(f"import os  # an import line, not run\n{source}\n")
    monkeypatch.setenv("VIRTUAL_ENV", str(env))
    for variable in ("CONDA_PREFIX", "TORCHCNN_TORCH_SITE"):
        monkeypatch.delenv(variable, raising=False)
    _isolate(backend, tmp_path, monkeypatch)
    assert backend._requires(lambda settings: ["wheel"], None) == ["wheel"]
    assert sys.path[-2:] == [site, str(source)]


def _isolate(backend, tmp_path, monkeypatch):
    """The interpreter's own folders as a build environment without torch, and torch not importable."""
    isolated = str(tmp_path / "isolated")
    os.makedirs(isolated, exist_ok=True)
    get_paths = backend.sysconfig.get_paths
    monkeypatch.setattr(backend.sysconfig, "get_paths",
                        lambda vars=None: get_paths(vars=vars) if vars else {"purelib": isolated, "platlib": isolated})
    monkeypatch.setattr(backend.site, "getsitepackages", lambda: [isolated])
    monkeypatch.setattr(backend.site, "getusersitepackages", lambda: isolated)
    monkeypatch.setattr(backend.importlib.util, "find_spec", lambda name, *a: None)
    monkeypatch.setattr(sys, "path", list(sys.path))


def test_the_build_backend_refuses_to_build_against_a_torch_of_its_own(tmp_path, monkeypatch):
    """With no torch to be found it stops and says what to do, rather than let pip install the newest
    torch and build a package that will not load beside the user's."""
    backend = _build_backend()
    for variable in ("VIRTUAL_ENV", "CONDA_PREFIX", "TORCHCNN_TORCH_SITE"):
        monkeypatch.delenv(variable, raising=False)
    _isolate(backend, tmp_path, monkeypatch)
    with pytest.raises(RuntimeError, match="no torch found to build against.*--no-build-isolation"):
        backend._requires(lambda settings: ["wheel"], None)
    with pytest.raises(RuntimeError, match="no torch found"):
        backend.build_wheel(str(tmp_path))
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)
    assert "torch" not in " ".join(project["build-system"]["requires"])
    assert "dependencies" in project["project"]["dynamic"]  # setup.py pins the torch built against
