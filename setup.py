"""Builds torchcnn._C: a CUDAExtension when a CUDA toolkit is usable, else a CppExtension.

TORCHCNN_CUDA=1 forces the CUDA build (failing if no toolkit is found), TORCHCNN_CUDA=0 the CPU
build. Compiling CUDA code needs no GPU. See torchcnn/_build.py for how the toolkit is found.

TORCHCNN_JIT=1 builds nothing: the package (an editable install, `pip install -e .`) then compiles
its kernels just in time, on first use, from the checkout's csrc/.
"""

import importlib.util
import os
import sys

from setuptools import setup

_spec = importlib.util.spec_from_file_location(
    "torchcnn_build", os.path.join(os.path.dirname(os.path.abspath(__file__)), "torchcnn", "_build.py")
)
_build = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = _build  # dataclasses look their module up while the file executes
_spec.loader.exec_module(_build)


def extensions():
    """torchcnn._C, or nothing with TORCHCNN_JIT=1; with the torch the package then requires."""
    if os.environ.get("TORCHCNN_JIT") == "1":
        print("torchcnn: TORCHCNN_JIT=1, nothing compiled now: the kernels are built on first use")
        return [], {}, [f"torch>={_build.TORCH_FLOOR}"]
    cfg = _build.config()
    _build.prepare_environment(cfg)
    print(f"torchcnn: building with{'' if cfg.with_cuda else 'out'} CUDA ({cfg.reason})")

    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    Extension = CUDAExtension if cfg.with_cuda else CppExtension
    extension = Extension(
        name="torchcnn._C",
        sources=[os.path.relpath(s, _build.ROOT) for s in cfg.sources],
        include_dirs=[_build.CSRC] + cfg.include_dirs,
        # Python's own CFLAGS carry -g, which setuptools passes on: debug information would double the
        # compile time and the library's size. The just-in-time build never had it.
        extra_compile_args={"cxx": cfg.cxx_flags + ["-g0"], "nvcc": cfg.nvcc_flags},
        extra_link_args=_build.openmp_flags(),
    )
    # The library loads only into the torch it is compiled against: the package says so to pip, which
    # then neither installs it beside another torch nor upgrades torch under it.
    import torch

    return [extension], {"build_ext": BuildExtension.with_options(use_ninja=True)}, [
        f"torch=={torch.__version__.split('+')[0]}"]


ext_modules, cmdclass, torch_requirement = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass, install_requires=torch_requirement + ["ninja"])
