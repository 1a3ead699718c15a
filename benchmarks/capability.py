"""``--cpu-capability avx512|avx2|default``: every benchmark here runs torch and torchcnn capped to one
instruction-set tier, as on a CPU that has no more. It has to act before torch loads (torch, oneDNN
and MKL each read their cap once), so each benchmark calls :func:`cap_from_argv` before it imports
torch; the option is declared again on the benchmark's own parser for --help and checking.

The caps, per tier:

- ``ATEN_CPU_CAPABILITY``: torch's own kernels, and so torchcnn's (its tier is torch's capability);
- ``ONEDNN_MAX_CPU_ISA``: oneDNN, torch's CPU convolutions;
- ``MKL_ENABLE_INSTRUCTIONS``: MKL, torch's matrix products (and torchcnn's where it takes BLAS).

No torch import here."""

from __future__ import annotations

import os
import sys

CAPS = {
    "avx512": {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX", "MKL_ENABLE_INSTRUCTIONS": "AVX512"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "default": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
}
OPTION = "--cpu-capability"
HELP = ("cap torch (ATEN_CPU_CAPABILITY), oneDNN and MKL, and so torchcnn, to this tier, as on a CPU that has no "
        "more (default: no cap)")


def requested(argv: list[str]) -> str | None:
    """The tier named by --cpu-capability X or --cpu-capability=X in argv, if any (unchecked)."""
    for i, arg in enumerate(argv):
        if arg == OPTION and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(OPTION + "="):
            return arg.split("=", 1)[1]
    return None


def cap_from_argv(argv: list[str] | None = None) -> str | None:
    """Sets the caps of the tier the command line names, before torch is imported; returns it. An
    unknown tier is left to the benchmark's argparse to refuse."""
    tier = requested(sys.argv[1:] if argv is None else argv)
    if tier not in CAPS:
        return None
    if all(os.environ.get(k) == v for k, v in CAPS[tier].items()):
        return tier  # applied already (a benchmark importing another)
    if "torch" in sys.modules:
        raise RuntimeError(f"{OPTION} must be applied before torch is imported")
    os.environ.update(CAPS[tier])
    return tier


def add_argument(parser) -> None:
    parser.add_argument(OPTION, choices=sorted(CAPS), default=None, help=HELP)


def check(tier: str | None) -> str:
    """After torch loaded: the tier torch and torchcnn run at (the cap took, or the CPU has less), as
    the benchmarks print it."""
    import torch

    from torchcnn.testing import cpu_capability

    ours = cpu_capability()
    if tier is not None and ours != tier:
        raise SystemExit(f"{OPTION} {tier}: the kernels run at '{ours}' (torch: "
                         f"{torch.backends.cpu.get_cpu_capability()}); this CPU may not have {tier}")
    caps = f", capped: {', '.join(f'{k}={v}' for k, v in CAPS[tier].items())}" if tier else ""
    return f"CPU tier {ours}{caps}"
