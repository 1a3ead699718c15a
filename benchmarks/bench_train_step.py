"""Times one training step of the MNIST model (train.py's default) built from torchcnn's layers
against the identical model built from torch.nn's, on the same batch.

    python benchmarks/bench_train_step.py                 # CPU
    python benchmarks/bench_train_step.py --device cuda   # GPU (torch uses cuDNN)

A step is forward, loss, backward and an Adam update, as in train.py. Each figure is the median
of ``torch.utils.benchmark`` blocked runs (it synchronizes the GPU); ratio = torchcnn / torch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ops import describe, setup  # noqa: E402  (imports torchcnn before torch.utils.benchmark)
from torch.utils import benchmark  # noqa: E402

from torchcnn.mnist.model import MnistNet, loss_function  # noqa: E402


def step_ms(backend: str, batch: int, device: str, min_run_time: float) -> float:
    torch.manual_seed(0)
    model = MnistNet(backend).to(device)
    loss_fn = loss_function(backend)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 1, 28, 28, generator=gen).to(device)
    labels = torch.randint(0, 10, (batch,), generator=gen).to(device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(images), labels).backward()
        optimizer.step()

    for _ in range(3):  # warm-up: allocator, cuBLAS/cuDNN handles and algorithm choice
        step()
    timer = benchmark.Timer(stmt="step()", globals={"step": step})
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def main() -> None:
    args = setup(__doc__)
    rows = []
    for batch in args.batch_sizes:
        t = step_ms("torch", batch, args.device, args.min_run_time)
        c = step_ms("torchcnn", batch, args.device, args.min_run_time)
        rows.append({"case": "MNIST train step (Adam)", "batch": batch, "torch_ms": t, "torchcnn_ms": c})
    print(f"device: {describe(args.device)}")
    print("| case | batch | torch ms | torchcnn ms | ratio | torchcnn img/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['case']} | {r['batch']} | {r['torch_ms']:.3f} | {r['torchcnn_ms']:.3f} | "
              f"{r['torchcnn_ms'] / r['torch_ms']:.2f}× | {r['batch'] / r['torchcnn_ms'] * 1e3:,.0f} |")
    if args.json:
        args.json.write_text(json.dumps({"device": describe(args.device), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
