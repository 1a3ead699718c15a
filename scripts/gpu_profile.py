"""Kernel profile of the MNIST training step: torchcnn's model (fused) and torch.nn's, a few steps
each under torch.profiler, after a warm-up. Prints, per model, the kernels launched per step and
the kernels that take the most device time (on a CPU, for a rehearsal of scripts/gpu_check.sh: the
ops instead).

    python scripts/gpu_profile.py --device cuda --batch 256 --steps 5
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout works without installing
import torchcnn  # noqa: E402
from torchcnn.mnist.model import MnistNet, loss_function  # noqa: E402


def train_step(backend: str, batch: int, device: str):
    torch.manual_seed(0)
    model = MnistNet(backend).to(device)
    loss_fn = loss_function(backend)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    images = torch.randn(batch, 1, 28, 28, device=device)
    labels = torch.randint(0, 10, (batch,), device=device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(images), labels).backward()
        optimizer.step()

    return step


def profile_steps(step, device: str, steps: int):
    for _ in range(3):  # warm-up: allocator, cuBLAS/cuDNN handles and algorithm choice
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
    return prof


def kernel_rows(prof, device: str) -> list[tuple[str, int, float]]:
    """(name, calls, microseconds) per kernel (CUDA) or per op (CPU), most time first."""
    rows = []
    for event in prof.key_averages():
        if device == "cuda":
            if event.device_type != torch.autograd.DeviceType.CUDA or event.device_time_total <= 0:
                continue
            rows.append((event.key, event.count, event.device_time_total))
        elif event.key.startswith(("aten::", "torchcnn::")):
            rows.append((event.key, event.count, event.self_cpu_time_total))
    return sorted(rows, key=lambda r: -r[2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--top", type=int, default=12, help="kernels listed per model")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    torchcnn.load()
    what = "kernels" if args.device == "cuda" else "ops (CPU rehearsal: no kernels to count)"
    for backend in ("torchcnn", "torch"):
        rows = kernel_rows(profile_steps(train_step(backend, args.batch, args.device), args.device, args.steps),
                           args.device)
        launches = sum(calls for _, calls, _ in rows) / args.steps
        total = sum(us for _, _, us in rows) / args.steps
        print(f"\n{backend}: MNIST step at batch {args.batch}, {launches:.0f} {what} per step, "
              f"{total / 1e3:.3f} ms of their time per step")
        print("| kernel | per step | µs per step | share |")
        print("|---|---:|---:|---:|")
        for name, calls, us in rows[:args.top]:
            print(f"| {name[:90]} | {calls / args.steps:g} | {us / args.steps:.1f} | {us / max(total * args.steps, 1e-9):.0%} |")


if __name__ == "__main__":
    main()
