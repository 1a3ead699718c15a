"""The CPU kernels at each instruction-set tier (csrc/cpu/simd.h).

The tier is torch's CPU capability, so ATEN_CPU_CAPABILITY caps both libraries at once. Here: the
tier reported is torch's; every tier this CPU can run computes what torch computes (CI runs the
whole CPU op suite again at avx2 and default); on a CPU without AVX-512 (valgrind's) no AVX-512
instruction runs; and no function of the library uses instructions wider than its name says, so
a narrower CPU never meets them (no inline function shared with baseline code is compiled for a
wider instruction set, the trap of compiling one file with -mavx512f)."""

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


# tests/tier_check.py in a process capped before torch loads.
TIER_CHECK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tier_check.py")


@pytest.mark.skipif("ATEN_CPU_CAPABILITY" in os.environ, reason="the uncapped run tries every tier")
@pytest.mark.parametrize("tier", CPU_CAPABILITIES)
def test_every_tier_computes_what_torch_does(tier):
    if tier not in _tiers_below_this_cpu():
        pytest.skip(f"this CPU runs at most the {cpu_capability()!r} tier")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=tier)
    result = subprocess.run([sys.executable, TIER_CHECK, tier], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith(f"ok {tier}")


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
@pytest.mark.skipif("ATEN_CPU_CAPABILITY" in os.environ, reason="a minute under valgrind: once, in the uncapped run")
@pytest.mark.skipif(not re.match(r"x86_64|i.86", os.uname().machine), reason="x86 instruction sets")
def test_on_a_cpu_without_avx512_no_avx512_instruction_runs():
    # valgrind's virtual CPU has AVX2 and no AVX-512, and stops the program at an instruction it does
    # not know: torch and torchcnn must step down to the avx2 tier and run every op there.
    expected = CPU_CAPABILITIES[max(CPU_CAPABILITIES.index("avx2"), CPU_CAPABILITIES.index(cpu_capability()))]
    result = subprocess.run(["valgrind", "--tool=none", "--quiet", sys.executable, TIER_CHECK, expected],
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    assert result.stdout.strip().endswith(f"ok {expected}")


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
    """The extension's library as mapped into this process, whichever build it is: torchcnn/_C*.so
    (setup.py) or torchcnn_C_*.so (just in time); not the emulated CUDA library, which has no tiers."""
    with open("/proc/self/maps") as maps:
        paths = {line.split()[-1] for line in maps if line.rstrip().endswith(".so")}
    return sorted(p for p in paths if os.path.basename(p).startswith("torchcnn_C")
                  or (os.path.basename(p).startswith("_C") and os.path.basename(os.path.dirname(p)) == "torchcnn"))


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
