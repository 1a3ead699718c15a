"""How torchcnn's C++/CUDA extension is built: sources, flags and the CUDA toolkit.

Shared by ``setup.py`` (ahead-of-time build) and :mod:`torchcnn._extension` (just-in-time
build with ``torch.utils.cpp_extension.load``), so both build the same thing. This module must
not import torchcnn itself: setup.py loads it by path.

CUDA is used when ``TORCHCNN_CUDA`` says so (``1`` forces it, ``0`` forbids it) or, by default,
when torch is a CUDA build and a toolkit with nvcc and the CUDA headers can be found. A GPU is
never needed to compile.
"""

from __future__ import annotations

import glob
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")

# The oldest torch CI builds and tests against (.ci/run): what a just-in-time install requires.
TORCH_FLOOR = "2.13"

# A100, RTX 30 / 40 and H100/H200, plus PTX for newer GPUs; TORCH_CUDA_ARCH_LIST overrides it.
DEFAULT_CUDA_ARCH_LIST = "8.0;8.6;8.9;9.0+PTX"

CXX_FLAGS = ["-O3"]
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]

# The emulated-CUDA test library: csrc/cuda compiled by the C++ compiler (csrc/cuda/emulation.h).
EMULATION_FLAGS = ["-O2", "-DTORCHCNN_EMULATE_CUDA"]
# ... and its memcheck: out-of-bounds accesses, misaligned loads and integer overflow abort.
SANITIZER_FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g"]


def torch_build_tag(version: str | None = None) -> str:
    """torch's version (``torch.__version__`` unless given) as one C++ preprocessing token that
    spells it exactly: its bytes in hex after ``0x`` (``2.13.0+cpu`` → ``0x322e31332e302b637075``),
    a number the preprocessor only turns into a string. csrc/module.cpp records it in the library,
    and torchcnn._extension checks it before loading a prebuilt one; in the just-in-time build's
    flags it also makes a new torch rebuild the cached library."""
    if version is None:
        import torch

        version = torch.__version__
    return "0x" + str(version).encode().hex()


def torch_version_of_tag(tag: str) -> str:
    """The version a :func:`torch_build_tag` spells."""
    return bytes.fromhex(tag.removeprefix("0x")).decode(errors="replace")


def torch_build_flag() -> str:
    return f"-DTORCHCNN_TORCH_BUILD={torch_build_tag()}"


_openmp: list[str] | None = None


def openmp_flags() -> list[str]:
    """``["-fopenmp"]`` where the C++ compiler takes it (GCC, clang with libomp), else nothing (Apple's
    clang): at::parallel_for, inlined into the kernels, then splits their work with OpenMP as torch's
    own kernels do; without it the kernels run on the calling thread alone. Asked once."""
    global _openmp
    if _openmp is None:
        compiler = shlex.split(os.environ.get("CXX") or "c++")  # CXX may be a command: "ccache g++"
        probe = "#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n"
        try:
            result = subprocess.run(compiler + ["-x", "c++", "-fopenmp", "-", "-o", os.devnull], input=probe,
                                    capture_output=True, text=True, timeout=120)
            _openmp = ["-fopenmp"] if result.returncode == 0 else []
        except (OSError, subprocess.SubprocessError):
            _openmp = []
        if not _openmp:
            print(f"torchcnn: {' '.join(compiler)} does not take -fopenmp: the CPU kernels will split no work "
                  "between threads", file=sys.stderr)
    return list(_openmp)


@dataclass
class BuildConfig:
    sources: list[str]
    with_cuda: bool
    cuda_home: str | None = None
    include_dirs: list[str] = field(default_factory=list)
    reason: str = ""
    # TORCH_CUDA_ARCH_LIST unless set: None lets torch build for the GPUs of this machine only.
    arch_list: str | None = DEFAULT_CUDA_ARCH_LIST

    cxx_flags: list[str] = field(default_factory=lambda: CXX_FLAGS + openmp_flags() + [torch_build_flag()])
    nvcc_flags: list[str] = field(default_factory=lambda: list(NVCC_FLAGS))


def sources(with_cuda: bool) -> list[str]:
    """Every translation unit: the module, the C++ Autograd kernels, the CPU kernels and, with CUDA,
    the CUDA kernels."""
    files = [os.path.join(CSRC, "module.cpp")] + sorted(glob.glob(os.path.join(CSRC, "autograd", "*.cpp")))
    files += sorted(glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))
    files += sorted(glob.glob(os.path.join(CSRC, "cpu", "algorithms", "*.cpp")))
    if with_cuda:
        files += sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
    return files


def emulated_sources(build_dir: str) -> list[str]:
    """The emulated-CUDA library's translation units: for each csrc/cuda/*.cu, a one-line .cpp in
    `build_dir` that includes it, so that the C++ compiler (not nvcc) builds it."""
    wrappers = []
    os.makedirs(build_dir, exist_ok=True)
    for cu in sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu"))):
        name = os.path.splitext(os.path.basename(cu))[0]
        wrapper = os.path.join(build_dir, f"emulated_{name}.cpp")
        text = f'// Generated by torchcnn/_build.py: {name}.cu for the CPU (csrc/cuda/emulation.h).\n#include "cuda/{name}.cu"\n'
        if not os.path.exists(wrapper) or open(wrapper).read() != text:
            with open(wrapper, "w") as f:
                f.write(text)
        wrappers.append(wrapper)
    return wrappers


def _is_toolkit(path: str | None) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and bool(
        _find_header(path, "cuda_runtime.h")
    )


def _find_header(root: str, header: str) -> str | None:
    """The include directory under a toolkit or package root that holds `header`."""
    for inc in ("include", os.path.join("targets", "x86_64-linux", "include"),
                os.path.join("targets", "sbsa-linux", "include")):
        if os.path.isfile(os.path.join(root, inc, header)):
            return os.path.join(root, inc)
    return None


def _toolkit_of_nvcc(nvcc: str) -> str | None:
    """The toolkit an nvcc really runs from. `nvcc --dryrun` prints `TOP=<toolkit>/bin/..`, which
    sees through wrapper scripts and symlinks (torch would guess the wrapper's parent folder)."""
    try:
        out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-E", os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    if match:
        return os.path.realpath(match.group(1).strip())
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def find_cuda_home() -> str | None:
    """A CUDA toolkit (nvcc + cuda_runtime.h): $CUDA_HOME/$CUDA_PATH, the nvcc on PATH, conda,
    then the usual system folders."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(_toolkit_of_nvcc(nvcc))
    if os.environ.get("CONDA_PREFIX"):
        candidates.append(os.environ["CONDA_PREFIX"])
    candidates += ["/usr/local/cuda", "/opt/cuda", "/usr"]
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    return next((c for c in candidates if _is_toolkit(c)), None)


def _site_packages() -> list[str]:
    paths = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    paths.update(p for p in sys.path if p.endswith("site-packages"))
    return sorted(p for p in paths if os.path.isdir(p))


def extra_cuda_include_dirs(cuda_home: str) -> list[str]:
    """Include folders for the CUDA libraries that ATen's CUDA headers include (cuBLAS, cuSPARSE,
    cuSOLVER, cuRAND, cuFFT) when the toolkit itself lacks them: NVIDIA's pip wheels that come
    with torch carry them (nvidia/cu13/include, or nvidia/<library>/include for CUDA 12)."""
    dirs: list[str] = []
    for header in ("cublas_v2.h", "cusparse.h", "cusolverDn.h", "curand.h", "cufft.h"):
        if _find_header(cuda_home, header):
            continue
        for site in _site_packages():
            hits = sorted(glob.glob(os.path.join(site, "nvidia", "*", "include", header)))
            if hits:
                inc = os.path.dirname(hits[-1])
                if inc not in dirs:
                    dirs.append(inc)
                break
    return dirs


def config(torch_module=None, *, just_in_time: bool = False) -> BuildConfig:
    """Decide what to build. `TORCHCNN_CUDA=1` includes the CUDA kernels (a missing toolkit is then
    an error), `TORCHCNN_CUDA=0` leaves them out. Otherwise the ahead-of-time build (setup.py)
    compiles them whenever a toolkit is found, and the just-in-time build only when there is also a
    GPU to run them: without one they would cost minutes of compiling and never run."""
    import torch

    torch_module = torch_module or torch
    forced = os.environ.get("TORCHCNN_CUDA", "").strip().lower()
    if forced in ("0", "false", "no", "off"):
        return BuildConfig(sources(False), False, reason="TORCHCNN_CUDA=0")
    if torch_module.version.cuda is None:
        if forced:
            raise RuntimeError("TORCHCNN_CUDA=1 but this torch is a CPU-only build")
        return BuildConfig(sources(False), False, reason="torch is a CPU-only build")
    if just_in_time and not forced and not torch_module.cuda.is_available():
        return BuildConfig(sources(False), False, reason="no GPU here; TORCHCNN_CUDA=1 compiles the CUDA kernels too")
    cuda_home = find_cuda_home()
    if cuda_home is None:
        if forced:
            raise RuntimeError("TORCHCNN_CUDA=1 but no CUDA toolkit (nvcc and cuda_runtime.h) was found; "
                               "set CUDA_HOME to the toolkit's folder")
        return BuildConfig(sources(False), False, reason="no CUDA toolkit found (set CUDA_HOME)")
    includes = extra_cuda_include_dirs(cuda_home)
    # Just in time on a machine with a GPU, its own architecture is all that can run.
    arch_list = None if just_in_time and torch_module.cuda.is_available() else DEFAULT_CUDA_ARCH_LIST
    return BuildConfig(sources(True), True, cuda_home, includes, reason=f"CUDA toolkit at {cuda_home}",
                       arch_list=arch_list)


def prepare_environment(cfg: BuildConfig) -> None:
    """Point torch.utils.cpp_extension at the toolkit found, before or after it was imported."""
    if not cfg.with_cuda:
        return
    os.environ["CUDA_HOME"] = cfg.cuda_home
    if cfg.arch_list is not None:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", cfg.arch_list)
    if "torch.utils.cpp_extension" in sys.modules:
        sys.modules["torch.utils.cpp_extension"].CUDA_HOME = cfg.cuda_home
